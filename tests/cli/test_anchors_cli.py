"""`vlmcredit anchors` end to end on a tiny checkpoint: tables, --from, heads, resume, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.analysis.anchors import AnchorConfig, anchor_count, label_anchors, select_batch
from vlmcredit.analysis.clustering import ClusterConfig
from vlmcredit.cli.main import app
from vlmcredit.data.sample import Sample
from vlmcredit.formats.run import Run
from vlmcredit.formats.signals import read_signals, response_id
from vlmcredit.probes.capture import CaptureSpec
from vlmcredit.probes.response_attention import capture_samples

runner = CliRunner()
FAMILY = "qwen2.5-vl"
RESPONSES = [
    "The red square sits on the left and a blue circle on the right side of it.",
    "I see noise. " * 6,
    "Yes.",
    "A picture with many small coloured dots, like static on an old television set.",
    "No, there is nothing else here but random pixels in every direction.",
]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("anchor-rollouts")
    noise_image(112, 140, 3).save(folder / "a.png")
    noise_image(84, 168, 4).save(folder / "b.png")
    rows = [
        {
            "id": f"s{i}",
            "images": ["a.png"] if i % 2 else ["b.png"],
            "prompt": "Describe the image.",
            "response": text,
        }
        for i, text in enumerate(RESPONSES)
    ]
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _anchors(*args: str):
    return runner.invoke(app, ["anchors", *args, "--quiet"])


@pytest.fixture(scope="module")
def anchors_run(tiny_ckpt, rollouts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("anchors") / "run"
    ckpt = str(tiny_ckpt(FAMILY))
    result = _anchors(
        "--ckpt", ckpt, "--data", str(rollouts), "--out", str(out), "--batch-size", "2"
    )
    assert result.exit_code == 0, result.output
    return out


def test_tables_and_summary(anchors_run, loaded) -> None:
    table = pd.read_parquet(anchors_run / "anchors.parquet")
    assert list(table.columns) == [
        "sample_id",
        "token_index",
        "token_id",
        "token",
        "connectivity",
        "cluster",
        "anchor",
        "weight",
        "threshold_anchor",
    ]
    tok = loaded(FAMILY).tokenizer
    run = Run.load(anchors_run)
    assert [r["id"] for r in run.rows] == [f"s{i}" for i in range(len(RESPONSES))]
    for i, text in enumerate(RESPONSES):
        part = table[table.sample_id == f"s{i}"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert part.token_id.tolist() == ids
        assert part.token_index.tolist() == list(range(len(ids)))
        assert part.token.tolist() == [tok.decode([t]) for t in ids]
        assert np.isfinite(part.connectivity).all()
        assert set(part.weight[part.anchor]) <= {1.0} and set(part.weight[~part.anchor]) <= {0.0}
        assert part.anchor.any()  # the top cluster is always taken
    summary = json.loads((anchors_run / "anchors.json").read_text())
    assert summary["num_tokens"] == len(table)
    assert summary["num_anchors"] == int(table.anchor.sum())
    assert summary["ratio_achieved"] == pytest.approx(table.anchor.mean())
    assert len(summary["samples"]) == len(RESPONSES)
    assert summary["parameters"]["analysis"]["ratio"] == 0.15
    manifest = json.loads((anchors_run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["signals"]["method"] == "anchors"


def test_every_long_response_holds_the_ratio(anchors_run) -> None:
    """Defaults on the tiny model: each response of 25+ tokens within +-2 points of 15%
    (exactly round(0.15 T) anchors), and anchors.json / the manifest say so."""
    table = pd.read_parquet(anchors_run / "anchors.parquet")
    summary = json.loads((anchors_run / "anchors.json").read_text())
    shares, lengths = [], []
    for sid, part in table.groupby("sample_id", sort=False):
        t = len(part)
        assert part.anchor.sum() == anchor_count(t, 0.15), sid
        if t >= 25:
            assert abs(part.anchor.mean() - 0.15) <= 0.02, sid
        shares.append(part.anchor.mean())
        lengths.append(t)
    assert max(lengths) >= 25
    spread = summary["ratio_per_response"]
    assert spread["min"] == pytest.approx(min(shares))
    assert spread["max"] == pytest.approx(max(shares))
    assert spread["median"] == pytest.approx(float(np.median(shares)))
    assert spread["long_enough"] == sum(t >= 25 for t in lengths)
    assert spread["within_tolerance_long_enough"] == 1.0
    assert (summary["ratio_scope"], summary["fill"]) == ("response", "clusters-then-tokens")
    manifest = json.loads((anchors_run / "manifest.json").read_text())
    analysis = manifest["parameters"]["analysis"]
    assert (analysis["ratio_scope"], analysis["fill"], analysis["preset"]) == (
        "response",
        "clusters-then-tokens",
        "none",
    )
    assert manifest["anchors"]["ratio_per_response"] == spread
    signals = manifest["signals"]
    assert (signals["loss_denominator"], signals["selection_scope"]) == (
        "selected_tokens",
        "per_response",
    )


def test_fill_scope_and_preset_flags(tiny_ckpt, rollouts, anchors_run, tmp_path) -> None:
    """--fill whole-clusters (the earlier behaviour, by name), --ratio-scope batch and
    --preset paper each give what the analysis gives on the run's stored attention."""
    ckpt = str(tiny_ckpt(FAMILY))
    stored = Run.load(anchors_run)
    atts = {r["id"]: stored.tensors(r["id"])["attention"].numpy() for r in stored.rows}
    cases = {
        "whole": (["--fill", "whole-clusters"], AnchorConfig(fill="whole-clusters")),
        "batch": (["--ratio-scope", "batch"], AnchorConfig(ratio_scope="batch")),
        "paper": (["--preset", "paper"], AnchorConfig(preset="paper")),
        # coarse clusters, filled whole: far above the target, with a warning saying why
        "coarse": (
            [
                *("--mode", "similarity", "--objective", "CPM", "--resolution", "0.05"),
                *("--fill", "whole-clusters"),
            ],
            AnchorConfig(
                mode="similarity",
                fill="whole-clusters",
                cluster=ClusterConfig(objective="CPM", resolution=0.05),
            ),
        ),
    }
    for name, (flags, cfg) in cases.items():
        out = tmp_path / name
        args = ["--ckpt", ckpt, "--data", str(rollouts), "--out", str(out), "--batch-size", "5"]
        result = _anchors(*args, *flags)
        assert result.exit_code == 0, result.output
        table = pd.read_parquet(out / "anchors.parquet")
        want = select_batch([label_anchors(atts[sid], cfg) for sid in atts], cfg)
        for sid, res in zip(atts, want, strict=True):
            got = table[table.sample_id == sid].anchor.to_numpy()
            np.testing.assert_array_equal(got, res.anchor, err_msg=f"{name} {sid}")
        manifest = json.loads((out / "manifest.json").read_text())
        recorded = manifest["parameters"]["analysis"]
        assert (recorded["fill"], recorded["ratio_scope"]) == (cfg.fill, cfg.ratio_scope)
        if name == "batch":
            assert table.anchor.sum() == anchor_count(len(table), 0.15)
            assert manifest["signals"]["selection_scope"] == "per_batch"
        if name == "paper":
            assert (recorded["mode"], recorded["cluster"]["backend"]) == ("similarity", "metis")
        # a share more than 5 points off the target is said, with what to change
        off = abs(table.anchor.mean() - 0.15) > 0.05
        assert ("warning: " in result.stderr) == off, (name, result.stderr)
        if name == "coarse":
            assert off and "--fill clusters-then-tokens" in result.stderr


def test_stored_attention_is_the_layer_head_mean(anchors_run, loaded) -> None:
    """The stored (T, N) equals an independent per-head capture averaged over layers and heads,
    and the stored labels equal label_anchors on it."""
    ck = loaded(FAMILY)
    run = Run.load(anchors_run)
    t = run.tensors("s0")
    data_dir = Path(json.loads((anchors_run / "manifest.json").read_text())["parameters"]["data"])
    image = __import__("PIL.Image", fromlist=["Image"]).open(data_dir.parent / "b.png")
    sample = Sample([image.convert("RGB")], "Describe the image.", RESPONSES[0], "s0")
    (item,) = capture_samples(ck, [sample], CaptureSpec(reduce="heads"))
    reference = item.capture.attention.mean(dim=(0, 1))
    assert torch.allclose(t["attention"], reference, atol=1e-6)
    result = label_anchors(reference.double().numpy(), AnchorConfig())
    assert np.array_equal(t["anchor"].numpy().astype(bool), result.anchor)
    assert t["thumb.0"].dtype == torch.uint8 and t["thumb.0"].shape == (84, 168, 3)
    assert t["image_boxes"].shape == (t["attention"].shape[1], 4)


def test_signals_match_the_tokens(anchors_run) -> None:
    signals = read_signals(anchors_run)
    table = pd.read_parquet(anchors_run / "anchors.parquet")
    for sid, part in table.groupby("sample_id"):
        ids = part.token_id.tolist()
        weights = signals.lookup(sid, ids)
        assert weights is not None
        assert np.array_equal(weights, part.weight.to_numpy())
    row = signals.frame.iloc[0]
    assert row.response_id == response_id(list(row.token_ids))


def test_from_capture_run_gives_the_same_anchors(
    tiny_ckpt, rollouts, anchors_run, tmp_path
) -> None:
    ckpt = str(tiny_ckpt(FAMILY))
    cap = tmp_path / "cap"
    result = runner.invoke(
        app,
        [
            "capture",
            "--ckpt",
            ckpt,
            "--data",
            str(rollouts),
            "--out",
            str(cap),
            "--no-qk",
            "--quiet",
            "--batch-size",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "from"
    result = _anchors("--from", str(cap), "--out", str(out))
    assert result.exit_code == 0, result.output
    a = pd.read_parquet(anchors_run / "anchors.parquet")
    b = pd.read_parquet(out / "anchors.parquet")
    assert a.drop(columns="connectivity").equals(b.drop(columns="connectivity"))
    assert np.allclose(a.connectivity, b.connectivity, atol=1e-6)
    # heads need a per-head capture: the averaged capture run is refused with a clear message
    result = _anchors("--from", str(cap), "--out", str(tmp_path / "h"), "--heads", "0,1")
    assert result.exit_code == 2 and "--reduce heads" in result.output


def test_from_a_capture_run_that_recorded_a_relative_path(
    tiny_ckpt, rollouts, tmp_path, monkeypatch
) -> None:
    ckpt = tiny_ckpt(FAMILY)
    monkeypatch.chdir(ckpt.parent)
    cap = tmp_path / "cap"
    args = ["--data", str(rollouts), "--out", str(cap), "--no-qk", "--max-samples", "1"]
    result = runner.invoke(app, ["capture", "--ckpt", ckpt.name, *args, "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((cap / "manifest.json").read_text())
    recorded = Path(manifest["checkpoint"]["path"])
    assert recorded.is_absolute() and recorded.resolve() == ckpt.resolve()  # given relative
    # a run made before paths were recorded absolute, read from another folder: said so
    manifest["checkpoint"]["path"] = ckpt.name
    (cap / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "from"
    result = _anchors("--from", str(cap), "--out", str(out))
    assert result.exit_code == 2 and not out.exists()
    assert f"recorded its checkpoint as the relative path '{ckpt.name}'" in result.stderr
    assert "moved" not in result.stderr and "pass --ckpt" in result.stderr
    fixed = _anchors("--from", str(cap), "--ckpt", str(ckpt), "--out", str(out))
    assert fixed.exit_code == 0, fixed.output


def test_heads_json_averages_only_critical_heads(tiny_ckpt, rollouts, loaded, tmp_path) -> None:
    heads = tmp_path / "heads.json"
    heads.write_text(
        json.dumps({"critical": [{"layer": None, "head": 1}, {"layer": None, "head": 3}]})
    )
    out = tmp_path / "crit"
    ckpt = str(tiny_ckpt(FAMILY))
    args = ["--ckpt", ckpt, "--data", str(rollouts), "--out", str(out), "--max-samples", "1"]
    result = _anchors(*args, "--heads-json", str(heads))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attention"]["heads"] == [1, 3]
    stored = Run.load(out).tensors("s0")["attention"]
    image = __import__("PIL.Image", fromlist=["Image"]).open(rollouts.parent / "b.png")
    sample = Sample([image.convert("RGB")], "Describe the image.", RESPONSES[0], "s0")
    (item,) = capture_samples(loaded(FAMILY), [sample], CaptureSpec(reduce="heads"))
    reference = item.capture.attention[:, [1, 3]].mean(dim=(0, 1))
    assert torch.allclose(stored, reference, atol=1e-6)


def test_resume_after_kill_equals_uninterrupted(tiny_ckpt, rollouts, anchors_run, tmp_path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vlmcredit.cli.main", "anchors", "--ckpt", str(tiny_ckpt(FAMILY))]
    cmd += ["--data", str(rollouts), "--out", str(out), "--batch-size", "2", "--quiet"]
    env = {**os.environ, "VLMCREDIT_TEST_CRASH_AFTER_BATCHES": "2"}
    killed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert killed.returncode == 137
    assert not (out / "anchors.parquet").exists()
    assert len(Run.load(out).rows) == 4
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = pd.read_parquet(anchors_run / "anchors.parquet")
    b = pd.read_parquet(out / "anchors.parquet")
    assert a.equals(b)
    assert pd.read_parquet(anchors_run / "signals.parquet").equals(
        pd.read_parquet(out / "signals.parquet")
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "0"], "--ratio"),
        (["--mode", "spectral"], "mode"),
        (["--ratio-scope", "global"], "--ratio-scope"),
        (["--fill", "partial"], "--fill"),
        (["--preset", "paper", "--mode", "threshold"], "--preset paper sets --mode similarity"),
        (["--data", "missing.jsonl"], "missing.jsonl"),
        (["--from", "nowhere"], "nowhere"),
    ],
)
def test_bad_options_fail_in_one_line(tiny_ckpt, rollouts, tmp_path, extra, message) -> None:
    args = ["--out", str(tmp_path / "bad")]
    if "--data" not in extra and "--from" not in extra:
        args += ["--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts)]
    elif "--data" in extra:
        args += ["--ckpt", str(tiny_ckpt(FAMILY))]
    result = _anchors(*args, *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "bad").exists()


def test_text_only_rows_are_refused_up_front_or_skipped(tiny_ckpt, rollouts, tmp_path) -> None:
    rows = [json.loads(line) for line in rollouts.read_text().splitlines()][:2]
    rows.append({"id": "text", "images": [], "prompt": "Hi?", "response": "Hello there."})
    data = rollouts.parent / "with-text-only.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = str(tiny_ckpt(FAMILY))
    out = tmp_path / "refused"
    result = _anchors("--ckpt", ckpt, "--data", str(data), "--out", str(out))
    assert result.exit_code == 2 and "sample text has no image" in result.output
    assert not out.exists()
    out = tmp_path / "skipped"
    result = _anchors("--ckpt", ckpt, "--data", str(data), "--out", str(out), "--skip-bad")
    assert result.exit_code == 0, result.output
    status = {r["id"]: r["status"] for r in Run.load(out).rows}
    assert status == {"s0": "done", "s1": "done", "text": "bad"}
    assert set(pd.read_parquet(out / "anchors.parquet").sample_id) == {"s0", "s1"}


def test_graphml_export_matches_the_labels(tiny_ckpt, rollouts, tmp_path) -> None:
    """--graphml writes each sample's clustered graph; read back with networkx (an independent
    GraphML reader), its token vertices carry the labels of anchors.parquet."""
    import networkx as nx

    from vlmcredit.formats.files import sample_file_stem

    out = tmp_path / "graphs"
    args = ["--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts), "--out", str(out)]
    result = _anchors(*args, "--max-samples", "2", "--graphml")
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "anchors.parquet")
    for sid, part in table.groupby("sample_id"):
        graph = nx.read_graphml(out / "graphs" / f"{sample_file_stem(sid)}.graphml")
        nodes = sorted(graph.nodes(data=True), key=lambda n: int(n[0].lstrip("n")))
        tokens = [d for _, d in nodes if not d["type"]]  # bipartite: False = token vertex
        assert [bool(d["anchor"]) for d in tokens] == part.anchor.tolist()
        assert [int(d["cluster"]) for d in tokens] == part.cluster.tolist()
        assert len(nodes) - len(tokens) == Run.load(out).tensors(sid)["attention"].shape[1]


def test_from_a_bf16_capture_run(tiny_ckpt, rollouts, anchors_run, tmp_path) -> None:
    """A capture stored in bf16 (`--store-dtype bf16`) feeds `anchors --from`: the connectivity
    is the fp32 run's within bf16 rounding."""
    cap = tmp_path / "cap16"
    args = ["capture", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts)]
    args += ["--out", str(cap), "--no-qk", "--quiet", "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--reduce", "heads", "--store-dtype", "bf16"])
    assert result.exit_code == 0, result.output
    result = _anchors("--from", str(cap), "--out", str(tmp_path / "from16"))
    assert result.exit_code == 0, result.output
    a = pd.read_parquet(anchors_run / "anchors.parquet")
    b = pd.read_parquet(tmp_path / "from16" / "anchors.parquet")
    assert len(a) == len(b)
    assert np.allclose(a.connectivity, b.connectivity, rtol=2e-2, atol=1e-4)
