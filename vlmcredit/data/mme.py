"""MME readers: the lmms-lab parquet distribution and the original one-folder-per-category layout.

Both readers yield the same `MMEQuestion`s for the same content: `image_id` is
"category/filename" in either layout, `question_id` is `image_id` + "#0" / "#1" (the line or row
order within the image), and questions are ordered by category (official order), then image
filename, then that within-image order.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmcredit.errors import VlmCreditError

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CATEGORIES = PERCEPTION + COGNITION
# Categories whose images sit in CAT/images/ and answers in CAT/questions_answers_YN/.
SPLIT_FOLDER_CATEGORIES = ("artwork", "celebrity", "landmark", "posters", "scene")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PARQUET_COLUMNS = ("question_id", "image", "question", "answer", "category")


@dataclass(frozen=True)
class MMEQuestion:
    """One MME yes/no question. `image_ref` is a file path (folders) or encoded bytes (parquet)."""

    question_id: str
    image_id: str
    category: str
    question: str
    answer: str  # "Yes" or "No"
    image_ref: str | bytes = field(repr=False)

    def load_image(self) -> Any:
        """The question's image as a loaded RGB PIL image."""
        return load_mme_image(self.image_ref, where=self.image_id)


@dataclass
class MMESet:
    """What `read_mme` found: questions, skipped problems (where, error) and the layout read."""

    questions: list[MMEQuestion]
    bad: list[tuple[str, str]]
    layout: Literal["parquet", "folders"]

    @property
    def categories(self) -> list[str]:
        """Categories present, in the official order."""
        present = {q.category for q in self.questions}
        return [c for c in CATEGORIES if c in present]

    @property
    def image_ids(self) -> list[str]:
        """Distinct image ids in question order."""
        return list(dict.fromkeys(q.image_id for q in self.questions))


def load_mme_image(ref: str | bytes, where: str = "") -> Any:
    """Open a path or encoded bytes as a fully decoded RGB PIL image (bad image -> our error)."""
    name = where or (ref if isinstance(ref, str) else "image bytes")
    try:
        return _decode(ref)
    except _Bad as exc:
        raise VlmCreditError(f"{name}: {exc.msg}") from None


class _Bad(Exception):
    """A problem with one image or answer file; read_mme raises or records it (skip_bad)."""

    def __init__(self, where: str, msg: str) -> None:
        super().__init__(f"{where}: {msg}")
        self.where, self.msg = where, msg


def _decode(ref: str | bytes) -> Any:
    from PIL import Image

    from vlmcredit.data.images import size_problem

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below
            with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
                refused = size_problem(*img.size)
                if refused is None:
                    img.load()  # decode now so a truncated file fails here, not in a probe
                    return img.convert("RGB")
    # PIL signals corrupt or hostile data with these types
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        msg = f"broken or unreadable image ({exc}); replace the file or pass --skip-bad"
        raise _Bad("", msg) from None
    raise _Bad("", f"image {refused}; or pass --skip-bad")


def canonical_name(name: str) -> str | None:
    """The official spelling of a category name given in any case, or None if unknown."""
    return {c.lower(): c for c in CATEGORIES}.get(name.strip().lower())


def canonical_categories(categories: Iterable[str] | None) -> list[str]:
    """Map user-given names (case-insensitive) to official category names; unknown -> error."""
    if categories is None:
        return list(CATEGORIES)
    out = []
    for name in categories:
        canon = canonical_name(name)
        if canon is None:
            raise VlmCreditError(
                f"unknown MME category {name!r}; valid categories: {', '.join(CATEGORIES)}"
            )
        if canon not in out:
            out.append(canon)
    return out


def read_mme(
    path: str | Path,
    categories: list[str] | None = None,
    skip_bad: bool = False,
    check_images: bool = True,
) -> MMESet:
    """Read MME from a parquet file, a folder of parquet shards, or the original category folders.

    With `skip_bad`, problems (broken image, unpaired files, malformed lines) are recorded in
    `bad` and the affected image is skipped; otherwise the first one raises VlmCreditError.
    `check_images` decodes every image once so broken files surface here rather than mid-run.
    """
    root = Path(path)
    wanted = canonical_categories(categories)
    if not root.exists():
        raise VlmCreditError(f"{root}: MME path does not exist; pass the MME folder or parquet")
    bad: list[tuple[str, str]] = []
    shards = _parquet_shards(root)
    if shards:
        layout: Literal["parquet", "folders"] = "parquet"
        questions = _read_parquet(shards, wanted, skip_bad, check_images, bad)
    else:
        cat_root = _folder_root(root)
        if cat_root is None:
            raise VlmCreditError(
                f"{root}: no MME layout found (neither .parquet files nor category folders such "
                f"as existence/, OCR/); pass the lmms-lab parquet or the MME_Benchmark folder"
            )
        layout = "folders"
        questions = _read_folders(cat_root, wanted, skip_bad, check_images, bad)
    if not questions:
        scope = f" for categories {', '.join(wanted)}" if categories else ""
        skipped = f"; {len(bad)} problem(s) skipped, first: {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise VlmCreditError(f"{root}: no usable MME questions{scope}{skipped}")
    order = {c: i for i, c in enumerate(CATEGORIES)}
    questions.sort(key=lambda q: (order[q.category], q.image_id, q.question_id))
    return MMESet(questions=questions, bad=bad, layout=layout)


def _parquet_shards(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix == ".parquet" else []
    for folder in (root, root / "data"):  # the hub repo keeps its shards under data/
        shards = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if shards:
            return shards
    return []


def _folder_root(root: Path) -> Path | None:
    """The folder holding category folders: `root` itself or its single wrapping subfolder."""
    if not root.is_dir():
        return None
    lower = {c.lower() for c in CATEGORIES}
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    if any(p.name.lower() in lower for p in subdirs):
        return root
    if len(subdirs) == 1:  # e.g. MME_Benchmark_release_version/MME_Benchmark/
        inner = subdirs[0]
        if any(p.is_dir() and p.name.lower() in lower for p in inner.iterdir()):
            return inner
    return None


def _record(exc: _Bad, skip_bad: bool, bad: list[tuple[str, str]]) -> None:
    if not skip_bad:
        raise VlmCreditError(f"{exc.where}: {exc.msg}") from None
    bad.append((exc.where, exc.msg))


def _parse_answer_file(txt: Path) -> list[tuple[str, str]]:
    """The two (question, "Yes"|"No") pairs of one answer file; malformed -> _Bad."""
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Bad(str(txt), f"cannot read answer file ({exc}); re-extract MME") from None
    pairs = []
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for n, line in lines:
        question, sep, answer = line.rpartition("\t")
        answer = answer.strip()
        if not sep or not question.strip() or answer.lower() not in ("yes", "no"):
            raise _Bad(
                f"{txt}:{n}", f"malformed line {line[:60]!r}; expected 'question<TAB>Yes|No'"
            )
        pairs.append((question.strip(), answer.capitalize()))
    if len(pairs) != 2:
        raise _Bad(str(txt), f"malformed: {len(pairs)} question lines; MME files hold exactly two")
    return pairs


def _read_folders(
    cat_root: Path, wanted: list[str], skip_bad: bool, check_images: bool, bad: list
) -> list[MMEQuestion]:
    dirs = {p.name.lower(): p for p in cat_root.iterdir() if p.is_dir()}
    questions: list[MMEQuestion] = []
    for category in wanted:
        cat_dir = dirs.get(category.lower())
        if cat_dir is None:
            continue
        # MME puts some categories in images/ + questions_answers_YN/ and keeps the rest side by
        # side; follow what is on disk so either convention reads for any category.
        img_dir, txt_dir = cat_dir, cat_dir
        if (cat_dir / "images").is_dir():
            img_dir, txt_dir = cat_dir / "images", cat_dir / "questions_answers_YN"
        images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        answers = {p.stem: p for p in txt_dir.glob("*.txt")} if txt_dir.is_dir() else {}
        for stem in sorted(answers.keys() - images.keys()):
            msg = f"unpaired question: no image {stem}.jpg/.png in {img_dir}; add or delete it"
            _record(_Bad(str(answers[stem]), msg), skip_bad, bad)
        for stem in sorted(images):
            img_path = images[stem]
            try:
                if stem not in answers:
                    msg = f"image without answer file {txt_dir / (stem + '.txt')}; add or remove it"
                    raise _Bad(str(img_path), msg)
                pairs = _parse_answer_file(answers[stem])
                if check_images:
                    _check_image(str(img_path), str(img_path))
            except _Bad as exc:
                _record(exc, skip_bad, bad)
                continue
            image_id = f"{category}/{img_path.name}"
            for k, (question, answer) in enumerate(pairs):
                ref = str(img_path)
                questions.append(
                    MMEQuestion(f"{image_id}#{k}", image_id, category, question, answer, ref)
                )
    return questions


def _check_image(ref: str | bytes, where: str) -> None:
    try:
        _decode(ref)
    except _Bad as exc:
        raise _Bad(where, exc.msg) from None


def _read_parquet(
    shards: list[Path], wanted: list[str], skip_bad: bool, check_images: bool, bad: list
) -> list[MMEQuestion]:
    import pyarrow.parquet as pq

    # image_id -> (where, category, image bytes, [(question, answer)]); the bytes are kept once
    # per image because lmms-lab repeats the same encoded image on both rows of a pair.
    images: dict[str, tuple[str, str, bytes, list[tuple[str, str]]]] = {}
    # question_ids (lmms-lab: the image path, shared by both rows) of rows found bad, so their
    # partner row is dropped with them instead of being reported again as an unpaired question.
    broken: set[str] = set()
    raw_ids: dict[str, str] = {}
    unwanted = {c.lower() for c in CATEGORIES if c not in wanted}
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise VlmCreditError(f"{shard}: not a readable parquet file ({exc})") from None
        missing = [c for c in PARQUET_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise VlmCreditError(
                f"{shard}: missing column(s) {', '.join(missing)}; expected the lmms-lab MME "
                f"columns {', '.join(PARQUET_COLUMNS)}"
            )
        row0 = 0
        for batch in pf.iter_batches(batch_size=64, columns=list(PARQUET_COLUMNS)):
            for i, row in enumerate(batch.to_pylist()):
                where = f"{shard} row {row0 + i}"
                if str(row.get("category") or "").lower() in unwanted:
                    continue  # like the folder reader, look only at the categories asked for
                try:
                    image_id, category, blob, qa = _parquet_row(row, where)
                except _Bad as exc:
                    _record(exc, skip_bad, bad)
                    broken.add(str(row.get("question_id")))
                    continue
                images.setdefault(image_id, (where, category, blob, []))[3].append(qa)
                raw_ids[image_id] = str(row["question_id"])
            row0 += batch.num_rows
    questions: list[MMEQuestion] = []
    for image_id, (where, category, blob, pairs) in images.items():
        if raw_ids[image_id] in broken:
            continue
        try:
            if len(pairs) != 2:
                msg = f"image {image_id} has {len(pairs)} question rows; MME has two per image"
                raise _Bad(where, msg)
            if check_images:
                _check_image(blob, where)
        except _Bad as exc:
            _record(exc, skip_bad, bad)
            continue
        for k, (question, answer) in enumerate(pairs):
            questions.append(
                MMEQuestion(f"{image_id}#{k}", image_id, category, question, answer, blob)
            )
    return questions


def _parquet_row(row: dict, where: str) -> tuple[str, str, bytes, tuple[str, str]]:
    """Validate one lmms-lab row -> (image_id, category, bytes, (question, answer))."""
    category = {c.lower(): c for c in CATEGORIES}.get(str(row.get("category") or "").lower())
    answer = str(row.get("answer") or "").strip()
    image = row.get("image")
    blob = image.get("bytes") if isinstance(image, dict) else None
    if category is None:
        msg = f"unknown category {row.get('category')!r}; valid: {', '.join(CATEGORIES)}"
        raise _Bad(where, msg)
    if answer.lower() not in ("yes", "no"):
        raise _Bad(where, f"malformed answer {row.get('answer')!r}; expected Yes or No")
    if not row.get("question_id") or not row.get("question"):
        raise _Bad(where, "malformed row: empty question_id or question")
    if not blob:
        raise _Bad(where, "image has no bytes (path-only images are unsupported); embed bytes")
    filename = str(row["question_id"]).replace("\\", "/").rsplit("/", 1)[-1]
    image_id = f"{category}/{filename}"
    return image_id, category, bytes(blob), (str(row["question"]).strip(), answer.capitalize())
