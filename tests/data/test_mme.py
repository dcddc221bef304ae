"""MME readers: both layouts give the same questions; every reader error is one clear line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmcredit.data.mme import CATEGORIES, MMEQuestion, load_mme_image, read_mme
from vlmcredit.data.mme_synth import write_synthetic_mme, write_synthetic_mme_parquet
from vlmcredit.errors import VlmCreditError


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mme")
    write_synthetic_mme(root, 2, seed=11)
    return root


def _copy(synth: Path, tmp_path: Path, categories: tuple[str, ...] = ("color",)) -> Path:
    root = tmp_path / "mme"
    for cat in categories:
        shutil.copytree(synth / cat, root / cat)
    return root


def _key(q: MMEQuestion) -> tuple:
    return (q.question_id, q.image_id, q.category, q.question, q.answer)


def _pixels(q: MMEQuestion) -> np.ndarray:
    return np.asarray(q.load_image())


def test_folders_and_parquet_read_the_same_questions(synth: Path, tmp_path: Path) -> None:
    folders = read_mme(synth)
    assert folders.layout == "folders" and folders.bad == []
    assert len(folders.questions) == 6 * 2 * 2
    assert folders.categories == ["existence", "count", "position", "color", "OCR",
                                  "numerical_calculation"]  # fmt: skip
    q0 = folders.questions[0]
    assert (q0.question_id, q0.image_id, q0.answer) == (
        "existence/0000.png#0",
        "existence/0000.png",
        "Yes",
    )
    assert isinstance(q0.image_ref, str) and Path(q0.image_ref).is_file()

    path = write_synthetic_mme_parquet(folders, tmp_path / "mme.parquet")
    parquet = read_mme(path)
    assert parquet.layout == "parquet" and parquet.bad == []
    assert [_key(q) for q in parquet.questions] == [_key(q) for q in folders.questions]
    assert isinstance(parquet.questions[0].image_ref, bytes)
    for a, b in zip(folders.questions[::7], parquet.questions[::7], strict=True):
        img = a.load_image()
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), _pixels(b))
    assert folders.image_ids == parquet.image_ids and len(parquet.image_ids) == 12


def test_parquet_shards_in_a_data_folder(synth: Path, tmp_path: Path) -> None:
    table = pq.read_table(write_synthetic_mme_parquet(synth, tmp_path / "all.parquet"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    # 5 rows per shard: some image pairs straddle two shards, as they may on the hub
    for i, start in enumerate(range(0, table.num_rows, 5)):
        pq.write_table(table.slice(start, 5), tmp_path / "hub" / "data" / f"test-{i:05d}.parquet")
    sharded = read_mme(tmp_path / "hub")
    assert [_key(q) for q in sharded.questions] == [_key(q) for q in read_mme(synth).questions]


def test_category_filter_is_case_insensitive_and_checked(synth: Path) -> None:
    mme = read_mme(synth, categories=["ocr", "Count"])
    assert mme.categories == ["count", "OCR"] and len(mme.questions) == 8
    with pytest.raises(
        VlmCreditError, match="unknown MME category 'celeb'; valid categories: existence"
    ):
        read_mme(synth, categories=["celeb"])
    with pytest.raises(VlmCreditError, match="no usable MME questions for categories scene"):
        read_mme(synth, categories=["scene"])


def test_split_folder_convention_and_wrapping_folder(synth: Path, tmp_path: Path) -> None:
    # scene keeps images/ and questions_answers_YN/ in MME; one wrapper folder above is fine
    scene = tmp_path / "MME_Benchmark_release_version" / "MME_Benchmark" / "scene"
    for src in sorted((synth / "color").iterdir()):
        sub = "images" if src.suffix == ".png" else "questions_answers_YN"
        (scene / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, scene / sub / src.name)
    mme = read_mme(tmp_path / "MME_Benchmark_release_version")
    color = read_mme(synth, categories=["color"])
    assert [q.image_id for q in mme.questions] == ["scene/0000.png"] * 2 + ["scene/0001.png"] * 2
    assert [q.question for q in mme.questions] == [q.question for q in color.questions]
    assert mme.questions[0].image_ref.endswith("scene/images/0000.png")


def test_missing_path_and_unrecognised_layout(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError, match="does not exist"):
        read_mme(tmp_path / "nope")
    (tmp_path / "other" / "cats").mkdir(parents=True)
    (tmp_path / "other" / "dogs").mkdir()
    with pytest.raises(VlmCreditError, match="no MME layout found"):
        read_mme(tmp_path / "other")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VlmCreditError, match=r"notes.txt: no MME layout found"):
        read_mme(tmp_path / "notes.txt")


def _break(root: Path, case: str) -> tuple[str, str]:
    """Damage a copied `color` folder one way; returns (file that is named, message pattern)."""
    cat = root / "color"
    if case == "broken image":
        (cat / "0000.png").write_bytes((cat / "0000.png").read_bytes()[:200])
        return "0000.png", "broken or unreadable image"
    if case == "image without answers":
        (cat / "0000.txt").unlink()
        return "0000.png", "image without answer file"
    if case == "unpaired question":
        shutil.copy(cat / "0000.txt", cat / "0007.txt")
        return "0007.txt", "unpaired question"
    if case == "no tab":
        (cat / "0000.txt").write_text("Is it red? Yes\nIs it blue?\tNo\n")
        return "0000.txt:1", "malformed line"
    if case == "not yes/no":
        (cat / "0000.txt").write_text("Is it red?\tYes\nIs it blue?\tMaybe\n")
        return "0000.txt:2", "malformed line"
    (cat / "0000.txt").write_text("Is it red?\tYes\nIs it blue?\tNo\nIs it green?\tNo\n")
    return "0000.txt", "3 question lines"


CASES = ["broken image", "image without answers", "unpaired question", "no tab", "not yes/no",
         "three lines"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_folder_errors_name_the_file_and_skip_bad_records_them(
    synth: Path, tmp_path: Path, case: str
) -> None:
    root = _copy(synth, tmp_path, ("color", "count"))
    name, pattern = _break(root, case)
    with pytest.raises(VlmCreditError, match=pattern) as err:
        read_mme(root)
    assert name in str(err.value) and "\n" not in str(err.value)
    mme = read_mme(root, skip_bad=True)
    assert len(mme.bad) == 1 and name in mme.bad[0][0] and pattern in mme.bad[0][1]
    kept = {q.image_id for q in mme.questions}
    assert "count/0000.png" in kept and "color/0001.png" in kept
    assert ("color/0000.png" in kept) == (case == "unpaired question")


def test_everything_bad_is_still_an_error_with_skip_bad(synth: Path, tmp_path: Path) -> None:
    root = _copy(synth, tmp_path)
    for png in (root / "color").glob("*.png"):
        png.write_bytes(b"\x89PNG garbage")
    with pytest.raises(VlmCreditError, match="no usable MME questions; 2 problem"):
        read_mme(root, skip_bad=True)


def _parquet(synth: Path, tmp_path: Path, edit) -> Path:
    table = pq.read_table(
        write_synthetic_mme_parquet(read_mme(synth, ["color"]), tmp_path / "a.parquet")
    )
    rows = table.to_pylist()
    rows = edit(rows)
    out = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
    return out


def _set(i: int, **values):
    def edit(rows):
        rows[i].update(values)
        return rows

    return edit


PARQUET_CASES = {
    "unknown category": (_set(0, category="colour"), "row 0: unknown category 'colour'"),
    "bad answer": (_set(1, answer="maybe"), "row 1: malformed answer 'maybe'"),
    "path-only image": (
        _set(1, image={"bytes": None, "path": "x.png"}),
        "row 1: image has no bytes",
    ),
    "broken image": (
        lambda rows: [
            {**r, "image": {"bytes": b"junk", "path": "0.png"}} if i < 2 else r
            for i, r in enumerate(rows)
        ],
        "row 0: broken or unreadable image",
    ),
    "single question": (lambda rows: rows[1:], "image color/0000.png has 1 question rows"),
}


@pytest.mark.parametrize("case", list(PARQUET_CASES))
def test_parquet_errors_and_skip_bad(synth: Path, tmp_path: Path, case: str) -> None:
    edit, pattern = PARQUET_CASES[case]
    path = _parquet(synth, tmp_path, edit)
    with pytest.raises(VlmCreditError, match=pattern) as err:
        read_mme(path)
    assert "b.parquet" in str(err.value) and "\n" not in str(err.value)
    mme = read_mme(path, skip_bad=True)
    assert len(mme.bad) == 1 and mme.image_ids == ["color/0001.png"]
    if case != "unknown category":  # rows of categories not asked for are not looked at
        with pytest.raises(VlmCreditError, match="no usable MME questions for categories OCR"):
            read_mme(path, categories=["OCR"])


def test_parquet_missing_columns_and_non_parquet(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"question_id": ["a/b.png"], "question": ["q"]}), tmp_path / "x.parquet"
    )
    with pytest.raises(VlmCreditError, match=r"missing column.*image, answer, category"):
        read_mme(tmp_path / "x.parquet")
    (tmp_path / "x.parquet").write_bytes(b"nope")
    with pytest.raises(VlmCreditError, match="not a readable parquet"):
        read_mme(tmp_path / "x.parquet")


def test_load_image_errors_are_ours(synth: Path) -> None:
    with pytest.raises(VlmCreditError, match=r"color/0000.png: broken or unreadable image"):
        load_mme_image(b"not an image", where="color/0000.png")
    img = load_mme_image(str(synth / "OCR" / "0000.png"))
    assert img.mode == "RGB" and img.size == (336, 280)
    assert "OCR" in CATEGORIES
