"""`vlmcredit probe-heads` end to end on a tiny yes/no checkpoint and a synthetic MME set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlmcredit.cli.main import app
from vlmcredit.data.mme import read_mme
from vlmcredit.data.mme_score import parse_answer, read_predictions, score_predictions
from vlmcredit.data.sample import Sample
from vlmcredit.formats.run import Run
from vlmcredit.models.inputs import encode_samples
from vlmcredit.models.loading import load_checkpoint
from vlmcredit.pipelines.skeleton import CRASH_ENV
from vlmcredit.probes.ablation import o_proj_modules
from vlmcredit.probes.mme_answer import yes_no_tokens
from vlmcredit.probes.tiny_answerer import yes_no_checkpoint

runner = CliRunner()
FAMILY = "qwen3-vl"  # deepstack features go through the cache end to end
THRESHOLD = 300  # between the harmless and the critical heads of this checkpoint


@pytest.fixture(scope="module")
def mme(tmp_path_factory) -> Path:
    """Synthetic MME written by the CLI: 2 images x 6 categories = 24 questions (+ parquet)."""
    root = tmp_path_factory.mktemp("mme")
    args = ["mme-synth", "--out", str(root / "set"), "--images-per-category", "2", "--seed", "4"]
    result = runner.invoke(app, [*args, "--parquet", str(root / "set.parquet")])
    assert result.exit_code == 0, result.output
    return root / "set"


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, mme, tmp_path_factory) -> str:
    return str(yes_no_checkpoint(tiny_ckpt(FAMILY), tmp_path_factory.mktemp("ck") / "yn", mme))


def _probe(ckpt: str, mme: Path, out: Path, *extra: str):
    args = ["probe-heads", "--ckpt", ckpt, "--mme", str(mme), "--out", str(out), "--quiet"]
    return runner.invoke(app, [*args, "--threshold", str(THRESHOLD), *extra])


@pytest.fixture(scope="module")
def full_run(ckpt, mme, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    result = _probe(ckpt, mme, out, "--batch-size", "5")
    assert result.exit_code == 0, result.output
    return out


def _reference_answers(ckpt: str, mme: Path, head: int) -> list[str]:
    """Independent path: o_proj weight columns of `head` zeroed in every layer, the processor's
    pixel values, one ordinary forward per question; the full-vocabulary argmax token decoded
    and read as the official parser reads a text starting with it (yes/no variant: its label;
    4+ characters: the parse of its text; shorter: undecided -> other)."""
    ck = load_checkpoint(ckpt, dtype="fp32")
    d = ck.geometry.head_dim
    with torch.no_grad():
        for m in o_proj_modules(ck).values():
            m.weight[:, head * d : (head + 1) * d] = 0
    tokens = yes_no_tokens(ck.tokenizer)
    answers = []
    for q in read_mme(mme).questions:
        batch = encode_samples(ck.processor, ck.geometry, [Sample([q.load_image()], q.question)])
        ck.model.model.rope_deltas = None
        with torch.no_grad():
            top = int(ck.model(**batch.inputs).logits[0, -1].argmax())
        text = ck.tokenizer.decode([top], skip_special_tokens=True)
        if text in tokens.yes_text or text in tokens.no_text or len(text) >= 4:
            label = parse_answer(text)
        else:
            label = "other"
        answers.append({"yes": "Yes", "no": "No", "other": "(other)"}[label])
    return answers


def test_probe_heads_end_to_end(ckpt, mme, full_run) -> None:
    report = json.loads((full_run / "heads.json").read_text())
    assert report["mode"] == "head-index" and report["ablation"] == "zero"
    assert report["answering"] == "logits" and report["metric"] == "total"
    assert report["num_questions"] == 24 and len(report["categories"]) == 6
    assert report["checkpoint"]["family"] == FAMILY
    assert len(report["checkpoint"]["weights_sha1"]) == 40
    assert [(h["layer"], h["head"]) for h in report["heads"]] == [(None, h) for h in range(4)]
    # baseline = official scoring of the stored baseline predictions (also via mme-score)
    scored = runner.invoke(app, ["mme-score", str(full_run / "predictions/baseline.parquet"),
                                 "--json"])  # fmt: skip
    assert json.loads(scored.stdout)["total"] == report["baseline"]["total"]
    for h in report["heads"]:
        path = full_run / "predictions" / f"head-{h['head']}.parquet"
        ablated = score_predictions(read_predictions(path))
        assert h["scores"]["total"] == ablated.total
        assert h["drop"]["total"] == report["baseline"]["total"] - ablated.total
        assert h["critical"] == (h["drop"]["total"] > THRESHOLD)
    drops = [h["drop"]["total"] for h in report["heads"]]
    assert max(drops) > THRESHOLD >= min(drops)  # this checkpoint has critical and other heads
    assert report["critical_heads"] == [h["head"] for h in report["heads"] if h["critical"]]
    # one configuration against the independent weight-edit path
    worst = max(report["heads"], key=lambda h: h["drop"]["total"])["head"]
    stored = pd.read_parquet(full_run / "predictions" / f"head-{worst}.parquet")
    assert list(stored["prediction"]) == _reference_answers(ckpt, mme, worst)
    table = pd.read_parquet(full_run / "heads.parquet")
    assert list(table.columns[:9]) == [
        "layer", "head", "total", "perception", "cognition", "drop_total", "drop_perception",
        "drop_cognition", "critical",
    ]  # fmt: skip
    assert list(table["layer"]) == [-1] * 4 and list(table["critical"]) == [
        h["critical"] for h in report["heads"]
    ]
    assert {f"score_{c}" for c in report["categories"]} <= set(table.columns)
    # answer shares per configuration = the parsed column of its predictions
    for h, row in zip(report["heads"], table.itertuples(), strict=True):
        parsed = pd.read_parquet(full_run / "predictions" / f"head-{h['head']}.parquet")["parsed"]
        assert h["answers"]["other"] == row.share_other == (parsed == "other").mean()
        assert h["answers"]["constant"] == (parsed.iloc[0] if parsed.nunique() == 1 else None)
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    # once per image for 6 configurations, + once per gray image size (same size, same features)
    sizes = {q.load_image().size for q in read_mme(mme).questions}
    assert manifest["feature_cache"]["vision_runs"] == 12 + len(sizes)
    rows = pd.read_parquet(full_run / "samples.parquet")
    assert list(rows["id"]) == ["baseline", "gray-image", "head-0", "head-1", "head-2", "head-3"]


def test_layer_head_mean_ablation_on_parquet(ckpt, mme, tmp_path) -> None:
    out = tmp_path / "grid"
    result = _probe(ckpt, mme.parent / "set.parquet", out, "--mode", "layer-head", "--layers",
                    "1-2", "--heads", "0,3", "--ablation", "mean", "--max-questions", "12",
                    "--categories", "count,OCR,existence", "--threshold", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "heads.json").read_text())
    assert [(h["layer"], h["head"]) for h in report["heads"]] == [(1, 0), (1, 3), (2, 0), (2, 3)]
    assert report["ablation"] == "mean" and report["categories"] == ["existence", "count", "OCR"]
    assert report["num_questions"] == 12  # two images from each category
    means = Run.load(out).tensors("means")["value"]
    assert means.shape == (3, 4, 16) and torch.isfinite(means).all()
    # the verdict names (layer, head) pairs, not head indices that read as whole heads
    pairs = [f"L{c['layer']}.H{c['head']}" for c in report["critical"]]
    assert pairs  # some pair's ablation lowers the score at all (threshold 0)
    verdict = f"vision-critical (layer, head) pairs (drop in total > 0): {len(pairs)} of 4"
    assert f"{verdict}: {', '.join(pairs)};" in result.stdout
    table = pd.read_parquet(out / "heads.parquet")
    assert list(table["layer"]) == [1, 1, 2, 2]


def test_generate_mode(ckpt, mme, tmp_path) -> None:
    out = tmp_path / "gen"
    result = _probe(ckpt, mme, out, "--generate", "--max-questions", "6", "--heads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "heads.json").read_text())
    assert report["answering"] == "generate" and report["num_questions"] == 6
    preds = pd.read_parquet(out / "predictions" / "baseline.parquet")
    assert preds["prediction"].str.len().max() > 3  # decoded text, parsed officially
    assert set(preds["parsed"]) <= {"yes", "no", "other"}


def test_resume_after_kill_gives_the_same_heads_json(ckpt, mme, full_run, tmp_path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vlmcredit.cli.main", "probe-heads", "--ckpt", ckpt, "--mme",
           str(mme), "--out", str(out), "--quiet", "--threshold", str(THRESHOLD),
           "--batch-size", "5"]  # fmt: skip
    crash = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, CRASH_ENV: "2"})
    assert crash.returncode == 137, crash.stderr
    # --quiet from the start: the model loaded without transformers' "Loading weights" bar
    assert "Loading weights" not in crash.stderr and "it/s" not in crash.stderr, crash.stderr
    partial = Run.load(out)
    assert partial.manifest["status"] == "running"
    assert [r["id"] for r in partial.rows] == ["baseline", "gray-image"]
    assert not (out / "heads.json").exists()
    start = time.perf_counter()
    resumed = _probe(ckpt, mme, out, "--batch-size", "5", "--resume")
    resume_seconds = time.perf_counter() - start
    assert resumed.exit_code == 0, resumed.output
    # timing sums both invocations: the killed one's model loading and two configurations too
    manifest = json.loads((out / "manifest.json").read_text())
    timing = manifest["timing"]
    assert manifest["invocations"] == 2
    assert timing["total"] > resume_seconds
    assert timing["total"] >= sum(timing["configurations"].values())
    assert len(timing["configurations"]) == 6  # the killed invocation's two are kept
    a = json.loads((full_run / "heads.json").read_text())
    b = json.loads((out / "heads.json").read_text())
    assert a == b  # heads.json holds no timing fields
    for name in ("baseline", "gray-image", "head-0", "head-3"):
        pa, pb = (pd.read_parquet(r / "predictions" / f"{name}.parquet") for r in (full_run, out))
        assert pa.equals(pb), name
    # a finished run re-selects with another threshold without recomputing
    before = (out / "predictions" / "head-1.parquet").stat().st_mtime_ns
    again = _probe(ckpt, mme, out, "--batch-size", "5", "--resume", "--threshold", "0")
    assert again.exit_code == 0, again.output
    reselected = json.loads((out / "heads.json").read_text())
    assert reselected["threshold"] == 0.0
    assert reselected["critical_heads"] == [h["head"] for h in a["heads"] if h["drop"]["total"] > 0]
    assert (out / "predictions" / "head-1.parquet").stat().st_mtime_ns == before
    changed = _probe(ckpt, mme, out, "--batch-size", "4", "--resume")
    assert changed.exit_code == 2 and "different parameters (batch_size)" in changed.stderr


def test_bad_inputs_exit_2_with_one_line(ckpt, mme, tmp_path) -> None:
    out = tmp_path / "never"
    for args, fragment in [
        (["--mme", str(tmp_path / "missing")], "--mme " + str(tmp_path / "missing")),
        (["--threshold", "-5"], "--threshold -5.0: must be a finite number >= 0"),
        (["--threshold", "1200"], "no drop can exceed it"),
        (["--threshold-rule", "median"], "--threshold-rule median: choose one of absolute"),
        (["--threshold-rule", "relative", "--threshold", "50"], "with relative give --relative"),
        (["--threshold-rule", "absolute", "--relative-share", "0.5"], "with absolute give"),
        (["--relative-share", "0"], "--relative-share 0.0: must be in (0, 1]"),
        (["--categories", "count,nonsense"], "unknown MME category 'nonsense'"),
        (["--metric", "perception", "--categories", "numerical_calculation"], "--metric perc"),
        (["--mode", "grid"], "--mode grid"),
        (["--layers", "0"], "--mode layer-head"),
        (["--mode", "layer-head", "--layers", "7"], "--layers '7'"),
        (["--heads", "9"], "--heads '9'"),
        (["--max-questions", "1"], "--max-questions 1"),
        (["--ablation", "max"], "--ablation max"),
        (["--ckpt", str(tmp_path / "nockpt")], "no such folder"),
    ]:
        base = ["probe-heads", "--ckpt", ckpt, "--mme", str(mme), "--out", str(out)]
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        assert fragment in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists(), args


def test_skip_bad_records_broken_images(ckpt, mme, tmp_path) -> None:
    broken = tmp_path / "mme"
    shutil.copytree(mme, broken)
    (broken / "count" / "0001.png").write_bytes(b"not a png")
    strict = _probe(ckpt, broken, tmp_path / "strict", "--heads", "0")
    assert strict.exit_code == 2 and "0001.png" in strict.stderr
    assert not (tmp_path / "strict").exists()
    out = tmp_path / "lenient"
    args = ["--heads", "0", "--max-questions", "6", "--skip-bad", "--categories", "count"]
    args += ["--threshold", "50"]  # one category scores at most 200
    result = _probe(ckpt, broken, out, *args)
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(out / "samples.parquet")
    bad = rows[rows["status"] == "bad"]
    assert len(bad) == 1 and "0001.png" in bad["id"].iloc[0] and "broken" in bad["error"].iloc[0]
    assert json.loads((out / "heads.json").read_text())["num_questions"] == 2  # one good image


def _probe_default_rule(ckpt: str, mme: Path, out: Path, *extra: str):
    """probe-heads with no --threshold: the rule is probe-heads' own choice."""
    args = ["probe-heads", "--ckpt", ckpt, "--mme", str(mme), "--out", str(out), "--quiet"]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return result, json.loads((out / "heads.json").read_text())


def _parsed(run: Path, unit: str) -> list[str]:
    return list(pd.read_parquet(run / "predictions" / f"{unit}.parquet")["parsed"])


def test_logits_and_generate_agree_when_ablation_breaks_the_answer_format(
    ckpt, mme, tmp_path
) -> None:
    """Layer 1 head 1 of this checkpoint makes some first tokens neither yes nor no: the logit
    path then says "other" exactly where decoding 16 tokens and parsing says it, so both paths
    give the same answers and the same drop."""
    grid = ["--mode", "layer-head", "--layers", "1", "--heads", "1"]
    _, by_logits = _probe_default_rule(ckpt, mme, tmp_path / "logits", *grid)
    _, by_decoding = _probe_default_rule(ckpt, mme, tmp_path / "generate", *grid, "--generate")
    unit = "layer-1-head-1"
    stored = pd.read_parquet(tmp_path / "logits" / "predictions" / f"{unit}.parquet")
    tokens = yes_no_tokens(load_checkpoint(ckpt, dtype="fp32").tokenizer)
    variants = set(tokens.yes) | set(tokens.no)
    other = stored[stored["parsed"] == "other"]
    assert len(other) >= 2 and not set(other["top_token"]) & variants  # the format broke
    assert set(stored["prediction"]) <= {"Yes", "No", "(other)"}
    for name in ("baseline", "gray-image", unit):
        assert _parsed(tmp_path / "logits", name) == _parsed(tmp_path / "generate", name), name
    head_l, head_g = by_logits["heads"][0], by_decoding["heads"][0]
    assert head_l["drop"] == head_g["drop"] and head_l["answers"]["other"] > 0
    assert head_l["answers"]["other"] == head_g["answers"]["other"] == len(other) / len(stored)
    for name in ("constant_yes", "constant_no", "gray_image"):
        assert by_logits["controls"][name]["total"] == by_decoding["controls"][name]["total"]
    # decoded answers have no "undecided" first tokens; logit answers count them
    assert by_decoding["baseline"]["answers"]["undecided"] is None
    assert by_logits["baseline"]["answers"]["undecided"] is not None


def _constant_reference(questions, answer: str) -> float:
    """Official scoring of one constant answer, written out: per category 100 (acc + acc+)."""
    total = 0.0
    for category in {q.category for q in questions}:
        qs = [q for q in questions if q.category == category]
        images = {q.image_id for q in qs}
        acc = sum(q.answer == answer for q in qs) / len(qs)
        both = sum(all(q.answer == answer for q in qs if q.image_id == i) for i in images)
        total += 100 * (acc + both / len(images))
    return total


def test_controls_and_the_relative_rule_on_a_subset(ckpt, mme, tmp_path) -> None:
    """No --threshold on 6 of 14 subtasks: the relative rule, computed from the run's own
    gray-image control; that control = a plain baseline on a copy of MME with gray images."""
    result, report = _probe_default_rule(ckpt, mme, tmp_path / "run", "--heads", "1,2")
    rule = report["threshold_rule"]
    assert rule["rule"] == "relative" and "partial MME (6 of 14" in rule["reason"]
    base, gray = report["baseline"]["total"], report["controls"]["gray_image"]["total"]
    assert base > gray and rule["share"] == 0.5
    assert report["threshold"] == rule["threshold"] == pytest.approx(0.5 * (base - gray))
    for h in report["heads"]:
        assert h["critical"] == (h["drop"]["total"] > 0.5 * (base - gray))
    assert "threshold rule: relative" in result.stdout and rule["formula"] in result.stdout
    questions = read_mme(mme).questions
    for answer in ("Yes", "No"):
        control = report["controls"][f"constant_{answer.lower()}"]
        assert control["total"] == pytest.approx(_constant_reference(questions, answer))
    # the gray-image control, independently: every image file replaced by a gray one
    gray_mme = tmp_path / "gray-mme"
    shutil.copytree(mme, gray_mme)
    for q in questions:
        path = Path(q.image_ref)
        size = Image.open(path).size
        Image.new("RGB", size, (128, 128, 128)).save(gray_mme / path.relative_to(mme))
    _, plain = _probe_default_rule(ckpt, gray_mme, tmp_path / "gray-run", "--heads", "0")
    assert plain["baseline"]["total"] == gray
    assert plain["baseline"]["answers"] == report["controls"]["gray_image"]["answers"]
    # the absolute rule on request, and a share of 1 = "worse than the gray image"
    again = _probe_default_rule(
        ckpt, mme, tmp_path / "run", "--heads", "1,2", "--resume", "--relative-share", "1"
    )[1]
    assert again["threshold"] == pytest.approx(base - gray)
    assert [h["critical"] for h in again["heads"]] == [
        h["scores"]["total"] < gray for h in again["heads"]
    ]
    absolute = _probe_default_rule(
        ckpt, mme, tmp_path / "run", "--heads", "1,2", "--resume", "--threshold-rule", "absolute"
    )[1]
    assert absolute["threshold"] == 100.0 and "partial MME" in absolute["threshold_rule"]["reason"]


def test_layer_head_shortcut_equals_full_forwards_and_resumes(ckpt, mme, tmp_path) -> None:
    """--mode layer-head skips the layers below the ablated one (inputs recorded by each
    layer's first configuration): the same predictions, logits and heads.json as one full
    forward per question (--no-share-prefix), also across a kill and --resume."""
    grid = ["--mode", "layer-head", "--layers", "1-2", "--heads", "0,1,3", "--batch-size", "5"]
    fast = tmp_path / "fast"
    assert _probe(ckpt, mme, fast, *grid).exit_code == 0
    plain = tmp_path / "plain"
    assert _probe(ckpt, mme, plain, *grid, "--no-share-prefix").exit_code == 0
    stored = json.loads((fast / "manifest.json").read_text())["layer_inputs"]
    assert stored["hits"] > 0 and stored["recorded"] > 0 and stored["unsupported"] is None
    units = ["baseline", "gray-image"] + [f"layer-{a}-head-{h}" for a in (1, 2) for h in (0, 1, 3)]

    def same_as_plain(run: Path) -> None:
        assert json.loads((run / "heads.json").read_text()) == json.loads(
            (plain / "heads.json").read_text()
        )
        for name in units:
            a, b = (pd.read_parquet(r / "predictions" / f"{name}.parquet") for r in (run, plain))
            assert list(a["prediction"]) == list(b["prediction"]), name
            assert list(a["top_token"]) == list(b["top_token"]), name
            for column in ("yes_logit", "no_logit"):
                diff = (a[column].astype(float) - b[column].astype(float)).abs().max()
                assert diff < 1e-4, (name, column, diff)  # float rounding of logits ~6

    same_as_plain(fast)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vlmcredit.cli.main", "probe-heads", "--ckpt", ckpt, "--mme",
           str(mme), "--out", str(killed), "--quiet", "--threshold", str(THRESHOLD),
           *grid]  # fmt: skip
    crash = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, CRASH_ENV: "4"})
    assert crash.returncode == 137, crash.stderr
    assert len(Run.load(killed).rows) == 4  # baseline, gray, layer-1-head-0, layer-1-head-1
    assert _probe(ckpt, mme, killed, *grid, "--resume").exit_code == 0
    same_as_plain(killed)  # layer 1's last head starts with no recorded inputs: recorded anew
