"""Official MME scoring: answer parsing, acc / acc+, totals, prediction files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmcredit.data.mme import CATEGORIES, read_mme
from vlmcredit.data.mme_score import (
    MMEPrediction,
    parse_answer,
    read_predictions,
    score_predictions,
    write_predictions,
)
from vlmcredit.data.mme_synth import write_synthetic_mme
from vlmcredit.errors import VlmCreditError


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("YES, there is a dog.", "yes"),
        ("No", "no"),
        ("No, there is not", "no"),
        ("no.", "no"),
        ("Yesterday", "yes"),  # "yes" within the first 4 characters
        ("Nothing like that", "no"),  # "no" within the first 4 characters
        ("Not sure", "no"),
        ("I think so", "other"),
        ("", "other"),
        ("The answer is yes", "other"),  # only the first 4 characters count
        (" yes", "yes"),
        ("  yes", "other"),  # the official tool does not strip
        ("yes\n", "yes"),  # trailing whitespace never changes the label
        ("y", "other"),  # lmms-eval would say yes; the official tool does not
        ("Answer: no", "other"),
    ],
)
def test_parse_answer_follows_the_official_rule(text: str, label: str) -> None:
    assert parse_answer(text) == label


def _row(image: str, category: str, gt: str, pred: str, q: str = "Q?") -> MMEPrediction:
    return MMEPrediction(f"{category}/{image}", category, q, gt, pred)


def test_known_acc_and_acc_plus() -> None:
    rows = [
        # existence: 2 images, 4 questions, 3 right, one image both right -> 0.75, 0.5, 125
        _row("a.jpg", "existence", "Yes", "Yes"),
        _row("a.jpg", "existence", "No", "No."),
        _row("b.jpg", "existence", "Yes", "Yes", "Q2"),
        _row("b.jpg", "existence", "No", "I cannot tell", "Q3"),
        # code_reasoning: 1 image, both right -> 1.0, 1.0, 200
        _row("0001.png", "code_reasoning", "Yes", "yes"),
        _row("0001.png", "code_reasoning", "No", "no"),
        # OCR: 1 image, one right -> 0.5, 0.0, 50
        _row("x.jpg", "OCR", "Yes", "No"),
        _row("x.jpg", "OCR", "No", "No"),
    ]
    scores = score_predictions(rows)
    ex = scores.subtasks["existence"]
    assert (ex.acc, ex.acc_plus, ex.score) == (0.75, 0.5, 125.0)
    assert (ex.n_questions, ex.n_images, ex.n_correct, ex.n_images_both, ex.n_other) == (
        4, 2, 3, 1, 1,
    )  # fmt: skip
    assert scores.score("code_reasoning") == 200.0
    assert scores.score("OCR") == 50.0
    assert scores.perception == 175.0 and scores.cognition == 200.0 and scores.total == 375.0
    # absent subtasks are reported as absent, not as zero
    assert scores.score("celebrity") is None and "celebrity" in scores.absent
    assert len(scores.absent) == 11
    table = scores.table()
    assert [r["category"] for r in table] == list(CATEGORIES)
    assert table[CATEGORIES.index("celebrity")]["score"] is None
    assert table[0]["score"] == 125.0 and table[0]["group"] == "perception"


def test_pairing_by_image_or_by_consecutive_lines() -> None:
    rows = [
        {"image_id": "count/1.jpg", "category": "count", "question": "q", "answer": "No",
         "prediction": "no"},
        {"image_id": "count/2.jpg", "category": "count", "question": "q", "answer": "Yes",
         "prediction": "yes"},
        {"image_id": "count/1.jpg", "category": "count", "question": "p", "answer": "Yes",
         "prediction": "no"},
        {"image_id": "count/2.jpg", "category": "count", "question": "p", "answer": "No",
         "prediction": "No"},
    ]  # fmt: skip
    by_image = score_predictions(rows, pair_by="image")
    sub = by_image.subtasks["count"]
    assert (sub.acc, sub.acc_plus, sub.score) == (0.75, 0.5, 125.0)
    # the official script pairs rows 1-2 and 3-4 (both right, then one right): acc+ 1/2 too, but
    # from different images; each pair holds two images, and that is counted
    lines = score_predictions(rows)
    assert lines.pair_by == "lines" and lines.mixed_pairs == by_image.mixed_pairs == 2
    assert lines.subtasks["count"].acc_plus == 0.5
    rows[1], rows[2] = rows[2], rows[1]  # now 1.jpg, 1.jpg, 2.jpg, 2.jpg: MME's order
    assert score_predictions(rows).mixed_pairs == 0
    assert score_predictions(rows).subtasks["count"] == sub


def test_scoring_rejects_unpaired_images_and_bad_rows() -> None:
    with pytest.raises(VlmCreditError, match=r"existence has 1 questions, an odd number"):
        score_predictions([_row("a.jpg", "existence", "Yes", "Yes")])
    with pytest.raises(VlmCreditError, match=r"existence/a.jpg .* has 1 questions"):
        score_predictions([_row("a.jpg", "existence", "Yes", "Yes")], pair_by="image")
    with pytest.raises(VlmCreditError, match=r"--pair-by pairs: choose one of lines, image"):
        score_predictions([], pair_by="pairs")
    with pytest.raises(VlmCreditError, match="unknown MME category 'colour'"):
        score_predictions([_row("a.jpg", "colour", "Yes", "Yes")])
    with pytest.raises(VlmCreditError, match="row 0: ground truth 'maybe'"):
        score_predictions([_row("a.jpg", "color", "Maybe", "Yes")])


def test_perfect_predictions_on_synthetic_mme_score_200_each(tmp_path: Path) -> None:
    write_synthetic_mme(tmp_path, 3, seed=0)
    mme = read_mme(tmp_path)
    rows = [
        MMEPrediction(q.image_id, q.category, q.question, q.answer, q.answer) for q in mme.questions
    ]
    scores = score_predictions(rows)
    assert scores.perception == 1000.0 and scores.cognition == 200.0
    assert all(s.score == 200.0 for s in scores.subtasks.values())
    flipped = list(rows)
    flipped[0] = MMEPrediction(rows[0].image_id, rows[0].category, rows[0].question, "Yes", "No")
    assert score_predictions(flipped).score("existence") == pytest.approx(100 * (5 / 6 + 2 / 3))


def _sample_rows() -> list[MMEPrediction]:
    return [
        _row("10002.jpg", "artwork", "Yes", "Yes, it is.\n\nThe painting shows"),
        _row("10002.jpg", "artwork", "No", "no\tindeed"),
        _row("0020.png", "code_reasoning", "Yes", "No"),
        _row("0020.png", "code_reasoning", "No", ""),
    ]


def test_official_text_round_trip(tmp_path: Path) -> None:
    rows = _sample_rows()
    out = write_predictions(rows, tmp_path / "results", fmt="official")
    lines = (out / "artwork.txt").read_text().split("\n")
    assert lines[0] == "10002.jpg\tQ?\tYes\tYes, it is.  The painting shows"
    assert sorted(p.name for p in out.iterdir()) == ["artwork.txt", "code_reasoning.txt"]
    back = read_predictions(out)
    assert [(r.image_id, r.category, r.question, r.answer) for r in back] == [
        (r.image_id, r.category, r.question, r.answer) for r in rows
    ]
    # flattening tabs / newlines keeps each answer's label
    assert [parse_answer(r.prediction) for r in back] == [parse_answer(r.prediction) for r in rows]
    assert score_predictions(back) == score_predictions(rows)
    single = read_predictions(out / "code_reasoning.txt")
    assert len(single) == 2 and single[1].prediction == ""


def test_parquet_round_trip(tmp_path: Path) -> None:
    rows = _sample_rows()
    path = write_predictions(rows, tmp_path / "preds.parquet", fmt="parquet")
    assert read_predictions(path) == rows
    scores = score_predictions(read_predictions(path))
    assert scores.score("artwork") == 200.0 and scores.score("code_reasoning") == 0.0


def test_hand_written_official_results_folder(tmp_path: Path) -> None:
    (tmp_path / "color.txt").write_text(
        "000000006723.jpg\tIs there a blue court?\tYes\tYes\n"
        "000000006723.jpg\tIs there a purple court?\tNo\tNo\n"
        "000000008277.jpg\tIs there a white plate?\tYes\tYes\n"
        "000000008277.jpg\tIs there a yellow plate?\tNo\tYes\n"
        "\n"
    )
    rows = read_predictions(tmp_path)
    assert rows[0].image_id == "color/000000006723.jpg" and rows[0].answer == "Yes"
    assert score_predictions(rows).score("color") == 125.0


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("color.txt", "a.jpg\tQ?\tYes\n", r"color.txt:1: malformed line \(3 tab-separated"),
        ("color.txt", "a.jpg\tQ?\tYes\tYes\na.jpg\tQ?\tNo\tno\textra\n", r"color.txt:2: malformed"),
        ("color.txt", "a.jpg\tQ?\tMaybe\tYes\n", r"color.txt:1: ground truth .* is 'Maybe'"),
        ("colour.txt", "a.jpg\tQ?\tYes\tYes\n", r"colour.txt: file name is not an MME category"),
    ],
)
def test_malformed_official_files(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(VlmCreditError, match=pattern) as err:
        read_predictions(tmp_path)
    assert "\n" not in str(err.value)


def test_bad_prediction_paths_and_parquets(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError, match="does not exist"):
        read_predictions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmCreditError, match="not MME predictions"):
        read_predictions(tmp_path / "empty")
    pq.write_table(
        pa.table({"image_id": ["x/a.jpg"], "prediction": ["yes"]}), tmp_path / "a.parquet"
    )
    with pytest.raises(VlmCreditError, match=r"missing column.*category, question, answer"):
        read_predictions(tmp_path / "a.parquet")
    cols = {"image_id": ["color/a.jpg"], "category": ["color"], "question": ["q"],
            "answer": ["Yes"], "prediction": pa.array([None], pa.string())}  # fmt: skip
    pq.write_table(pa.table(cols), tmp_path / "b.parquet")
    with pytest.raises(VlmCreditError, match=r"b.parquet row 0: null prediction"):
        read_predictions(tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not parquet")
    with pytest.raises(VlmCreditError, match="not a readable parquet"):
        read_predictions(tmp_path / "c.parquet")
