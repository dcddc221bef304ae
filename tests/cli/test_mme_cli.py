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
    assert odd.exit_code == 2 and "existence has 3 questions, an odd number" in odd.stderr
    by_image = runner.invoke(app, ["mme-score", str(single), "--pair-by", "image"])
    assert by_image.exit_code == 2 and "image existence/b.png" in by_image.stderr
    assert "has 1 questions" in by_image.stderr
    pairing = runner.invoke(app, ["mme-score", str(single), "--pair-by", "name"])
    assert pairing.exit_code == 2 and "--pair-by name: choose one of lines, image" in pairing.stderr
    for r in (missing, malformed, odd, by_image, pairing):
        assert len(r.stderr.strip().splitlines()) == 1


def _official_calculation(results_dir) -> dict:
    """An independent transcription of MME's eval_tool/calculation.py (BradyFU, Evaluation
    branch): per task file, readlines(), chunks of 2 consecutive lines = one image, the official
    parse_pred_ans, acc = accuracy over questions, acc+ = share of chunks with both right."""
    import os

    eval_type_dict = {
        "Perception": ["existence", "count", "position", "color", "posters", "celebrity",
                       "scene", "landmark", "artwork", "OCR"],
        "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation",
                      "code_reasoning"],
    }  # fmt: skip

    def parse_pred_ans(pred_ans):
        if pred_ans in ["yes", "no"]:
            return pred_ans
        prefix_pred_ans = pred_ans[:4]
        if "yes" in prefix_pred_ans:
            return "yes"
        if "no" in prefix_pred_ans:
            return "no"
        return "other"

    out = {"subtasks": {}}
    for eval_type, task_name_list in eval_type_dict.items():
        scores = 0.0
        for task_name in task_name_list:
            task_txt = os.path.join(results_dir, task_name + ".txt")
            if not os.path.exists(task_txt):
                continue
            with open(task_txt) as f:
                lines = f.readlines()
            chunk_lines = [lines[i : i + 2] for i in range(0, len(lines), 2)]
            acc_plus_correct_num = 0
            gts, preds = [], []
            for img_items in chunk_lines:
                assert len(img_items) == 2
                img_correct_num = 0
                for img_item in img_items:
                    _img_name, _question, gt_ans, pred_ans = img_item.split("\t")
                    gt_ans, pred_ans = gt_ans.lower(), parse_pred_ans(pred_ans.lower())
                    gts.append(gt_ans)
                    preds.append(pred_ans)
                    img_correct_num += gt_ans == pred_ans
                acc_plus_correct_num += img_correct_num == 2
            acc = sum(g == p for g, p in zip(gts, preds, strict=True)) / len(gts)
            acc_plus = acc_plus_correct_num / len(chunk_lines)
            out["subtasks"][task_name] = acc * 100 + acc_plus * 100
            scores += acc * 100 + acc_plus * 100
        out[eval_type.lower()] = scores
    out["total"] = out["perception"] + out["cognition"]
    return out


def test_mme_score_pairs_consecutive_lines_as_the_official_script(tmp_path) -> None:
    """On a shuffled results folder, mme-score = the official calculation; by image it differs
    (and equals the official calculation of the unshuffled file)."""
    import random

    from vlmcredit.data.mme_synth import write_synthetic_mme

    write_synthetic_mme(tmp_path / "mme", 6, seed=3)
    mme = read_mme(tmp_path / "mme")
    rng = random.Random(7)
    answers = ["Yes", "No", "yes, it is", "Not at all", "maybe", "Nothing"]
    rows = [
        MMEPrediction(q.image_id, q.category, q.question, q.answer, rng.choice(answers))
        for q in mme.questions
    ]
    ordered = write_predictions(rows, tmp_path / "ordered", "official")
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for txt in ordered.iterdir():
        lines = txt.read_text().splitlines(keepends=True)
        rng.shuffle(lines)
        (shuffled / txt.name).write_text("".join(lines))
    official = _official_calculation(shuffled)
    result = runner.invoke(app, ["mme-score", str(shuffled), "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)
    assert ours["pair_by"] == "lines" and ours["mixed_pairs"] > 0
    assert "pair(s) of consecutive lines hold two different images" in result.stderr
    for key in ("total", "perception", "cognition"):
        assert ours[key] == pytest.approx(official[key], abs=1e-9)
    assert {c: s["score"] for c, s in ours["subtasks"].items()} == pytest.approx(
        official["subtasks"]
    )
    by_image = json.loads(
        runner.invoke(app, ["mme-score", str(shuffled), "--json", "--pair-by", "image"]).stdout
    )
    assert by_image["total"] == pytest.approx(_official_calculation(ordered)["total"])
    assert by_image["total"] != pytest.approx(ours["total"])
    # in MME's own order both pairings agree and nothing is mixed
    in_order = json.loads(runner.invoke(app, ["mme-score", str(ordered), "--json"]).stdout)
    assert in_order["mixed_pairs"] == 0 and in_order["total"] == by_image["total"]


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
