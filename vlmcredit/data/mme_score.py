"""Official MME scoring: answer parsing, acc / acc+ per subtask, perception and cognition totals.

Mirrors `eval_tool/calculation.py` of the MME release (BradyFU/Awesome-Multimodal-Large-
Language-Models, Evaluation branch). Predictions are read from the official results folder
(`<category>.txt`, lines `img<TAB>question<TAB>gt<TAB>prediction`) or from our parquet (columns
image_id, category, question, answer, prediction).

Pairing for acc+: the official script splits each category's lines, in file order, into chunks
of two (lines 1-2, 3-4, ...) and counts a chunk as one image, without looking at image names.
That is the default here (`pair_by="lines"`; a parquet's rows count in row order per category).
On a file whose two questions of an image are not adjacent the official acc+ pairs questions of
different images; `pair_by="image"` pairs by image name instead, and the number of such mixed
pairs is reported either way (`MMEScores.mixed_pairs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmcredit.data.mme import CATEGORIES, COGNITION, PERCEPTION
from vlmcredit.errors import VlmCreditError

PREDICTION_COLUMNS = ("image_id", "category", "question", "answer", "prediction")
PAIRINGS = ("lines", "image")
_FLATTEN = {ord(ch): " " for ch in "\t\r\n"}  # what would break an official results line


def parse_answer(text: str) -> Literal["yes", "no", "other"]:
    """Map a model's answer to "yes" / "no" / "other" exactly as MME's calculation.py does.

    Rule: lowercase (nothing else: no strip, no punctuation removal); if the result is exactly
    "yes" or "no" return it; else if "yes" occurs in its first 4 characters -> "yes"; else if
    "no" occurs there -> "no"; else "other" (always scored wrong). So "Yes." -> yes,
    "No, there is not" -> no, "Yesterday" -> yes, "Nothing" / "Not sure" -> no, "I think so" ->
    other, "" -> other. Trailing whitespace never changes the label (the official tool even
    keeps the line's "\\n"); leading whitespace is not removed, so "  yes" -> other, as there.
    lmms-eval's variant (strip, drop ".", accept "y"/"n") is deliberately not used.
    """
    pred = text.lower()
    if pred in ("yes", "no"):
        return pred  # type: ignore[return-value]
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


@dataclass(frozen=True)
class MMEPrediction:
    """One scored row: the question, its ground truth ("Yes"/"No") and the model's raw text."""

    image_id: str  # "category/filename", as read_mme gives it
    category: str
    question: str
    answer: str
    prediction: str


@dataclass(frozen=True)
class SubtaskScore:
    """acc = share of questions right; acc_plus = share of images with both right."""

    category: str
    acc: float
    acc_plus: float
    score: float  # 100 * (acc + acc_plus), max 200
    n_questions: int
    n_images: int
    n_correct: int
    n_images_both: int
    n_other: int  # answers parsed as "other" (counted wrong)


@dataclass
class MMEScores:
    """Scores of the subtasks present. Absent subtasks are listed in `absent`, not scored 0;
    the totals sum only what is present (a partial run's totals are partial sums)."""

    subtasks: dict[str, SubtaskScore]
    perception: float
    cognition: float
    total: float
    absent: list[str] = field(default_factory=list)
    pair_by: str = "lines"
    # consecutive-line pairs holding two different images (the file is not in MME's order);
    # with pair_by="image" it is still counted, on the file as given
    mixed_pairs: int = 0

    def score(self, category: str) -> float | None:
        """A subtask's score, or None when it was not in the predictions."""
        sub = self.subtasks.get(category)
        return None if sub is None else sub.score

    def table(self) -> list[dict[str, Any]]:
        """One dict per official subtask, in order; absent ones carry None scores."""
        rows = []
        for cat in CATEGORIES:
            sub = self.subtasks.get(cat)
            group = "perception" if cat in PERCEPTION else "cognition"
            if sub is None:
                rows.append({"category": cat, "group": group, "acc": None, "acc_plus": None,
                             "score": None})  # fmt: skip
            else:
                rows.append({**asdict(sub), "group": group})
        return rows


def _field(row: Any, name: str) -> Any:
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def score_predictions(
    rows: Iterable[MMEPrediction | Mapping[str, Any]], pair_by: str = "lines"
) -> MMEScores:
    """Score predictions the official way (rows: MMEPrediction or mappings with its fields).

    `pair_by="lines"` (the official script): each category's rows, in order, pair as 1-2, 3-4,
    ... for acc+; an odd count is an error, as the official tool asserts. `pair_by="image"`:
    rows pair by image name, and every image must carry exactly two questions.
    """
    if pair_by not in PAIRINGS:
        raise VlmCreditError(f"--pair-by {pair_by}: choose one of {', '.join(PAIRINGS)}")
    by_image: dict[tuple[str, str], list[bool]] = {}
    in_order: dict[str, list[tuple[str, bool]]] = {}
    other: dict[str, int] = {}
    canon = {c.lower(): c for c in CATEGORIES}
    for i, row in enumerate(rows):
        category = canon.get(str(_field(row, "category")).lower())
        if category is None:
            raise VlmCreditError(
                f"prediction row {i}: unknown MME category {_field(row, 'category')!r}; "
                f"valid categories: {', '.join(CATEGORIES)}"
            )
        gt = str(_field(row, "answer")).strip().lower()
        if gt not in ("yes", "no"):
            raise VlmCreditError(f"prediction row {i}: ground truth {gt!r} is not Yes/No")
        label = parse_answer(str(_field(row, "prediction")))
        other[category] = other.get(category, 0) + (label == "other")
        image = str(_field(row, "image_id"))
        by_image.setdefault((category, image), []).append(label == gt)
        in_order.setdefault(category, []).append((image, label == gt))
    subtasks: dict[str, SubtaskScore] = {}
    mixed = 0
    for cat in CATEGORIES:
        lines = in_order.get(cat, [])
        if not lines:
            continue
        pairs = [lines[k : k + 2] for k in range(0, len(lines), 2)]
        mixed += sum(len(p) == 2 and p[0][0] != p[1][0] for p in pairs)
        if pair_by == "lines":
            if len(lines) % 2:
                raise VlmCreditError(
                    f"predictions: {cat} has {len(lines)} questions, an odd number; the official "
                    "script pairs consecutive lines (two questions per image), so predict both "
                    "questions of every image"
                )
            images = [(f"{cat} lines {2 * k + 1}-{2 * k + 2}", [a[1], b[1]])
                      for k, (a, b) in enumerate(pairs)]  # fmt: skip
        else:
            images = [(img, ok) for (c, img), ok in by_image.items() if c == cat]
        for img, ok in images:
            if len(ok) != 2:
                raise VlmCreditError(
                    f"predictions: image {img} ({cat}) has {len(ok)} questions; MME scores "
                    f"exactly two per image, so predict both or neither"
                )
        n_q = 2 * len(images)
        n_correct = sum(sum(ok) for _, ok in images)
        n_both = sum(all(ok) for _, ok in images)
        acc, acc_plus = n_correct / n_q, n_both / len(images)
        subtasks[cat] = SubtaskScore(
            cat, acc, acc_plus, 100.0 * (acc + acc_plus), n_q, len(images), n_correct, n_both,
            other.get(cat, 0),
        )  # fmt: skip
    perception = sum(s.score for c, s in subtasks.items() if c in PERCEPTION)
    cognition = sum(s.score for c, s in subtasks.items() if c in COGNITION)
    absent = [c for c in CATEGORIES if c not in subtasks]
    return MMEScores(
        subtasks, perception, cognition, perception + cognition, absent, pair_by, mixed
    )


def read_predictions(path: str | Path) -> list[MMEPrediction]:
    """Read predictions: an official results folder (or one `<category>.txt`) or our parquet."""
    root = Path(path)
    if not root.exists():
        raise VlmCreditError(f"{root}: predictions path does not exist")
    rows: list[MMEPrediction] | None = None
    if root.is_file() and root.suffix == ".parquet":
        rows = _read_prediction_parquet(root)
    elif root.is_file() and root.suffix == ".txt":
        rows = _read_official_txt(root)
    elif root.is_dir():
        files = sorted(root.glob("*.txt"))
        if files:
            rows = [row for f in files for row in _read_official_txt(f)]
    if rows == []:  # scoring nothing would print a total of 0.00 and exit 0
        raise VlmCreditError(f"{root}: holds no predictions (empty); score a filled results file")
    if rows is not None:
        return rows
    raise VlmCreditError(
        f"{root}: not MME predictions; expected a folder of <category>.txt files (official "
        f"format) or a .parquet with columns {', '.join(PREDICTION_COLUMNS)}"
    )


def _read_official_txt(txt: Path) -> list[MMEPrediction]:
    category = {c.lower(): c for c in CATEGORIES}.get(txt.stem.lower())
    if category is None:
        raise VlmCreditError(
            f"{txt}: file name is not an MME category; name it <category>.txt, one of "
            f"{', '.join(CATEGORIES)}"
        )
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise VlmCreditError(f"{txt}: cannot read predictions ({exc})") from None
    rows = []
    # Split on "\n" only (after universal-newline decoding), as the official readlines() does.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise VlmCreditError(
                f"{txt}:{n}: malformed line ({len(parts)} tab-separated fields); expected "
                f"'image<TAB>question<TAB>Yes|No<TAB>prediction' with no tabs in the prediction"
            )
        if parts[2].strip().lower() not in ("yes", "no"):
            raise VlmCreditError(
                f"{txt}:{n}: ground truth (third field) is {parts[2].strip()!r}; MME's answers "
                "are Yes or No"
            )
        img, question, gt, pred = parts
        rows.append(
            MMEPrediction(f"{category}/{img.strip()}", category, question, gt.strip(), pred)
        )
    return rows


def _read_prediction_parquet(path: Path) -> list[MMEPrediction]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise VlmCreditError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in PREDICTION_COLUMNS if c not in table.column_names]
    if missing:
        raise VlmCreditError(
            f"{path}: missing column(s) {', '.join(missing)}; predictions need "
            f"{', '.join(PREDICTION_COLUMNS)}"
        )
    rows = []
    for i, row in enumerate(table.select(list(PREDICTION_COLUMNS)).to_pylist()):
        if any(row[c] is None for c in PREDICTION_COLUMNS):
            empty = [c for c in PREDICTION_COLUMNS if row[c] is None]
            raise VlmCreditError(f"{path} row {i}: null {', '.join(empty)}; fill or drop the row")
        rows.append(MMEPrediction(**{c: str(row[c]) for c in PREDICTION_COLUMNS}))
    return rows


def write_predictions(
    rows: Iterable[MMEPrediction], path: str | Path, fmt: Literal["official", "parquet"]
) -> Path:
    """Write predictions as the official results folder (one `<category>.txt`) or as parquet.

    The official format cannot hold tabs or line breaks inside a prediction or question, so each
    is replaced by one space; that keeps every character position, so `parse_answer` gives the
    same label.
    """
    out = Path(path)
    rows = list(rows)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({c: [str(getattr(r, c)) for r in rows] for c in PREDICTION_COLUMNS})
        pq.write_table(table, out)
        return out
    if fmt != "official":
        raise VlmCreditError(f"unknown predictions format {fmt!r}; use 'official' or 'parquet'")
    out.mkdir(parents=True, exist_ok=True)
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        pred, question = r.prediction.translate(_FLATTEN), r.question.translate(_FLATTEN)
        img = r.image_id.rsplit("/", 1)[-1]
        by_cat.setdefault(r.category, []).append(f"{img}\t{question}\t{r.answer}\t{pred}\n")
    for cat, lines in by_cat.items():
        # newline="" keeps "\n" as is on every platform (the reader splits on "\n").
        (out / f"{cat}.txt").write_text("".join(lines), encoding="utf-8", newline="")
    return out
