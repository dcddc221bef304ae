"""`vlmcredit mme-score` and `vlmcredit mme-synth` end to end."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from vlmcredit.cli.main import app
from vlmcredit.data.mme import read_mme
from vlmcredit.data.mme_score import MMEPrediction, write_predictions

runner = CliRunner()

# Hand-scored: existence a both right, b one right -> acc 3/4, acc+ 1/2 -> 125;
# count c one right, one "other" -> 50; numerical d both right -> 200.
ROWS = [
    MMEPrediction("existence/a.png", "existence", "Is there a cat?", "Yes", "Yes"),
    MMEPrediction("existence/a.png", "existence", "Is there a dog?", "No", "No"),
    MMEPrediction("existence/b.png", "existence", "Is there a car?", "Yes", "No"),
    MMEPrediction("existence/b.png", "existence", "Is there a cup?", "No", "no."),
    MMEPrediction("count/c.png", "count", "Are there three?", "Yes", "yes, three"),
    MMEPrediction("count/c.png", "count", "Are there two?", "No", "I think so"),
    MMEPrediction("numerical_calculation/d.png", "numerical_calculation", "Is it 4?", "Yes", "Yes"),
    MMEPrediction("numerical_calculation/d.png", "numerical_calculation", "Is it 5?", "No", "No"),
]


@pytest.mark.parametrize("fmt", ["official", "parquet"])
def test_mme_score_official_and_parquet(tmp_path, fmt) -> None:
    path = tmp_path / ("results" if fmt == "official" else "preds.parquet")
    write_predictions(ROWS, path, fmt)  # type: ignore[arg-type]
    result = runner.invoke(app, ["mme-score", str(path), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["total"] == 375.0
    assert scores["perception"] == 175.0 and scores["cognition"] == 200.0
    ex = scores["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (0.75, 0.5, 125.0)
    assert scores["subtasks"]["count"]["score"] == 50.0
    assert scores["subtasks"]["count"]["n_other"] == 1
    assert "OCR" in scores["absent"] and "existence" not in scores["absent"]
    table = runner.invoke(app, ["mme-score", str(path)])
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[1].split() == ["existence", "perception", "75.00", "50.00", "125.00", "0"]
    assert lines[2].split() == ["count", "perception", "50.00", "0.00", "50.00", "1"]
    assert ["total", "375.00"] in [line.split() for line in lines]
    if fmt == "official":  # one category file alone
        one = runner.invoke(app, ["mme-score", str(path / "count.txt"), "--json"])
        assert json.loads(one.stdout)["total"] == 50.0


def test_mme_score_bad_inputs(tmp_path) -> None:
    missing = runner.invoke(app, ["mme-score", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "nope: predictions path does not exist" in missing.stderr
    bad = tmp_path / "existence.txt"
    bad.write_text("a.png\tIs there a cat?\tYes\n")
    malformed = runner.invoke(app, ["mme-score", str(bad)])
    assert malformed.exit_code == 2 and "existence.txt:1: malformed line" in malformed.stderr
    single = tmp_path / "single"
    write_predictions(ROWS[:3], single, "official")  # image b has one question only
    odd = runner.invoke(app, ["mme-score", str(single)])
    assert odd.exit_code == 2 and "has 1 questions" in odd.stderr
    for r in (missing, malformed, odd):
        assert len(r.stderr.strip().splitlines()) == 1


def test_mme_synth_folder_and_parquet(tmp_path) -> None:
    out, parquet = tmp_path / "mme", tmp_path / "mme.parquet"
    args = ["mme-synth", "--out", str(out), "--images-per-category", "2", "--seed", "5"]
    result = runner.invoke(app, [*args, "--categories", "count,ocr", "--parquet", str(parquet)])
    assert result.exit_code == 0, result.output
    assert "wrote 4 images (count 2, OCR 2)" in result.stdout
    folder = read_mme(out)
    assert folder.categories == ["count", "OCR"] and len(folder.questions) == 8
    table = pq.read_table(parquet)
    assert table.num_rows == 8 and set(table.column("category").to_pylist()) == {"count", "OCR"}
    from_parquet = read_mme(parquet)
    assert [(q.question_id, q.question, q.answer) for q in from_parquet.questions] == [
        (q.question_id, q.question, q.answer) for q in folder.questions
    ]
    # same seed -> same bytes
    again = tmp_path / "again"
    rerun = runner.invoke(app, ["mme-synth", "--out", str(again), "--images-per-category", "2",
                                "--seed", "5", "--categories", "count,ocr"])  # fmt: skip
    assert rerun.exit_code == 0
    assert (again / "count" / "0001.png").read_bytes() == (out / "count" / "0001.png").read_bytes()
    for bad_args, fragment in [
        (["--out", str(out)], "exists and is not empty"),
        (["--out", str(tmp_path / "x"), "--categories", "celebrity"], "cannot synthesise"),
        (["--out", str(tmp_path / "y"), "--images-per-category", "0"], ">= 1"),
    ]:
        r = runner.invoke(app, ["mme-synth", *bad_args])
        assert r.exit_code == 2 and fragment in r.stderr, bad_args
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
