"""`--dry-run`: the estimate's numbers against a hand computation and a real run on the tiny
checkpoint, and every command's dry run exits 0 without creating --out or loading weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app
from vlmcredit.formats.run import Run
from vlmcredit.pipelines.capture import CaptureRunConfig
from vlmcredit.pipelines.dry_run import dry_run_capture, dry_run_probe_heads
from vlmcredit.pipelines.estimate import INDEX_BYTES, THROUGHPUT
from vlmcredit.pipelines.probe_heads import ProbeHeadsConfig

runner = CliRunner()
FAMILY = "qwen2.5-vl"
# (height, width) -> image tokens by hand: patch 14, merge 2, both sizes inside the tiny
# processor's [3136, 28224] pixel range, so no resize: (h / 14) x (w / 14) / 4
IMAGES = {(56, 84): 4 * 6 // 4, (84, 112): 6 * 8 // 4}


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dry-run-rollouts")
    rows = []
    texts = ["Dots here.", "Static noise, grey."]
    for i, ((h, w), text) in enumerate(zip(IMAGES, texts, strict=True)):
        noise_image(h, w, i).save(folder / f"{i}.png")
        row = {"id": f"r{i}", "images": [f"{i}.png"], "prompt": "Describe.", "response": text}
        rows.append(row)
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mme(tmp_path_factory) -> Path:
    from vlmcredit.data.mme_synth import write_synthetic_mme

    root = tmp_path_factory.mktemp("dry-run-mme") / "set"
    write_synthetic_mme(root, 1, 0, ["existence", "count"])
    return root


def test_capture_estimate_equals_hand_computation_and_the_real_run(
    tiny_ckpt, loaded, rollouts, tmp_path
) -> None:
    ckpt = str(tiny_ckpt(FAMILY))
    cfg = CaptureRunConfig(ckpt=ckpt, data=rollouts, out=tmp_path / "run", reduce="heads")
    est = dry_run_capture(cfg)
    assert not cfg.out.exists()
    assert [s.image for s in est.sizes] == list(IMAGES.values())

    # the real run, as the reference for token counts and what is kept
    result = runner.invoke(
        app,
        ["capture", "--ckpt", ckpt, "--data", str(rollouts), "--out", str(cfg.out),
         "--reduce", "heads", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = Run.load(cfg.out)
    for size, row in zip(est.sizes, run.rows, strict=True):
        assert size.image == row["num_image_tokens"]
        assert size.response == row["num_response_tokens"]
        assert size.total == row["response_span"][1]  # prompt + response, unpadded
    stored = 0
    for shard in sorted(cfg.out.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                if key.rsplit("/", 1)[1].split(".")[0] in ("attention", "queries", "keys"):
                    stored += f.get_tensor(key).numel() * 4  # fp32
    index = sum(INDEX_BYTES * (s.response + s.image) for s in est.sizes)
    assert est.disk_bytes - index == stored  # L x H x T x N x 4 + Q/K, exactly

    # hand computation of weights, FLOPs and time from the loaded model's own numbers
    model = loaded(FAMILY).model
    params = sum(p.numel() for p in model.parameters())
    g = loaded(FAMILY).geometry
    assert est.model.params == params and est.weight_bytes == 4 * params
    flops = sum(
        2 * params * s.total + 4 * g.num_layers * s.total**2 * g.hidden_size for s in est.sizes
    )
    assert est.flops == pytest.approx(flops)
    assert est.seconds == pytest.approx(flops / THROUGHPUT["cpu"])
    assert est.peak_bytes == est.weight_bytes + est.activation_bytes + est.kept_batch_bytes


def test_probe_heads_estimate_counts_every_configuration(tiny_ckpt, mme, tmp_path) -> None:
    cfg = ProbeHeadsConfig(ckpt=str(tiny_ckpt(FAMILY)), mme=mme, out=tmp_path / "run")
    est = dry_run_probe_heads(cfg)
    heads = est.model.geometry.num_heads
    assert est.forwards == heads + 2  # every head, the baseline, the gray-image control
    assert len(est.sizes) == 4  # two images x two questions
    assert all(s.response == 1 for s in est.sizes)  # logits mode scores one token
    assert not cfg.out.exists()


@pytest.mark.parametrize("command", ["capture", "anchors", "weights", "probe-heads"])
def test_dry_run_prints_the_estimate_and_writes_nothing(
    command, tiny_ckpt, rollouts, mme, tmp_path
) -> None:
    out = tmp_path / "run"
    data = ["--mme", str(mme)] if command == "probe-heads" else ["--data", str(rollouts)]
    result = runner.invoke(
        app, [command, "--ckpt", str(tiny_ckpt(FAMILY)), *data, "--out", str(out), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    for part in ("peak memory ~", "weights", "disk ~", "time ~", "FLOP/s", "an estimate"):
        assert part in text, (part, text)
    assert "nothing written" in text
    assert not out.exists()


def test_dry_run_refuses_bad_input_like_the_run(tiny_ckpt, tmp_path) -> None:
    data = tmp_path / "blank.jsonl"
    noise_image(56, 56, 0).save(tmp_path / "a.png")
    data.write_text(json.dumps({"images": ["a.png"], "prompt": "Hi.", "response": " "}) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["weights", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(data), "--out", str(out),
         "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "only whitespace" in result.stderr
    assert not out.exists()
