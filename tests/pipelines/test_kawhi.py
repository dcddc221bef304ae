"""KAWHI end to end: `vlmcredit regions` and `vlmcredit weights --method kawhi` through the CLI
on a tiny checkpoint and rendered charts, the report section, and `online.weights` in a real
TRL GRPO step (same weights as the file-based pipeline for the same completions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.charts import write_chart_rollouts
from tests.export.test_trl import COMPLETION_LENGTH, train_one_step, trl_setup  # noqa: F401
from vlmcredit.analysis.paragraphs import WeightConfig, segment_weights
from vlmcredit.cli.main import app
from vlmcredit.formats.regions import read_paragraphs, read_regions
from vlmcredit.formats.signals import read_signals

runner = CliRunner()
FAMILY = "qwen2.5-vl"
RESPONSES = [
    "The red bar is the tallest.\n\nIt reaches about 日本 units 😀.\n\n\nSo the answer is red.",
    "Blue.",
    "\n\nGreen is lowest.\n\nRed is highest.\n\n",
]


@pytest.fixture(scope="module")
def charts(tmp_path_factory):
    return write_chart_rollouts(tmp_path_factory.mktemp("charts"), RESPONSES)


def _run(*args: str):
    return runner.invoke(app, [*args, "--quiet"])


def test_regions_command_writes_the_table_and_overlays(tiny_ckpt, charts, tmp_path) -> None:
    out = tmp_path / "regions"
    ckpt = str(tiny_ckpt(FAMILY))
    result = _run(
        "regions", "--data", str(charts), "--ckpt", ckpt, "--out", str(out), "--preview", "2"
    )
    assert result.exit_code == 0, result.output
    frame = read_regions(out)
    assert set(frame["sample_id"]) == {"c0", "c1", "c2"}
    # the 112 x 84 charts are resized to the checkpoint's grid: 4 x 3 cells of 28 px
    assert (frame.groupby("sample_id").size() == 12).all()
    assert frame["key"].any() and (frame["selected"] >= frame["key"]).all()
    assert len(list((out / "previews").glob("*.png"))) == 2
    # same images through --images: same cells
    folder = charts.parent
    again = _run("regions", "--images", str(folder), "--ckpt", ckpt, "--out", str(tmp_path / "i"))
    assert again.exit_code == 0, again.output
    by_file = read_regions(tmp_path / "i")
    part = by_file[by_file["sample_id"] == "chart-0.png"]
    assert np.array_equal(part["key"].to_numpy(), frame[frame["sample_id"] == "c0"]["key"])
    bad = _run("regions", "--ckpt", ckpt, "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "exactly one of --data" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_weights_kawhi_end_to_end(tiny_ckpt, charts, tmp_path) -> None:
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"critical_heads": [0, 3]}))
    out = tmp_path / "kawhi"
    ckpt = str(tiny_ckpt(FAMILY))
    result = _run(
        "weights",
        "--method",
        "kawhi",
        "--ckpt",
        ckpt,
        "--data",
        str(charts),
        "--heads-json",
        str(heads),
        "--out",
        str(out),
        "--batch-size",
        "2",
    )
    assert result.exit_code == 0, result.output
    signals = read_signals(out)
    table = signals.frame
    assert signals.meta["extra_columns"] == {"alpha": "float32"}
    paragraphs = read_paragraphs(out)
    counts = paragraphs.groupby("sample_id").size().to_dict()
    assert counts == {"c0": 3, "c1": 1, "c2": 2}  # "\n\n\n" splits once; blank edges join
    for row in table.itertuples(index=False):
        part = paragraphs[paragraphs["sample_id"] == row.sample_id]
        seg = np.asarray(row.paragraph_id)
        # Eq. 14-15 from the table's own alpha, by hand
        alpha = np.asarray(row.alpha, dtype=np.float64)
        means = np.array([alpha[seg == j].mean() for j in range(seg.max() + 1)])
        w = segment_weights(means, WeightConfig())
        assert np.allclose(np.asarray(row.weight), w[seg], atol=1e-6)
        assert np.allclose(part["weight"].to_numpy(), w, atol=1e-6)
        assert np.allclose(part["alpha"].to_numpy(), means, atol=1e-6)
        assert np.all((np.asarray(row.weight) >= 0.1) & (np.asarray(row.weight) <= 1.0))
    texts = paragraphs[paragraphs["sample_id"] == "c0"]["text"].tolist()
    assert "".join(texts) == RESPONSES[0] and texts[1].startswith("It reaches")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qk_heads"]["pairs"][-2:] == [[2, 0], [2, 3]]
    page = tmp_path / "report.html"
    shown = _run("report", str(out), "--out", str(page))
    assert shown.exit_code == 0, shown.output
    html = page.read_text()
    assert "KAWHI paragraph weights" in html and "It reaches about" in html


def test_weights_kawhi_without_critical_heads_is_one_line(tiny_ckpt, charts, tmp_path) -> None:
    result = _run(
        "weights",
        "--method",
        "kawhi",
        "--ckpt",
        str(tiny_ckpt(FAMILY)),
        "--data",
        str(charts),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 2
    assert "--heads-json" in result.output and len(result.output.strip().splitlines()) == 1
    ablation = _run(
        "weights",
        "--method",
        "kawhi",
        "-p",
        "heads=all",
        "-p",
        "renormalize=true",
        "-p",
        "sguf.selection=random",
        "--ckpt",
        str(tiny_ckpt(FAMILY)),
        "--data",
        str(charts),
        "--out",
        str(tmp_path / "all"),
    )
    assert ablation.exit_code == 0, ablation.output
    table = read_signals(tmp_path / "all").frame
    for w in table["weight"]:
        assert np.mean(w) == pytest.approx(1.0, abs=1e-5)  # renormalized to token-mean 1


def test_online_kawhi_weights_in_a_trl_step(trl_setup) -> None:  # noqa: F811
    """`online.weights(method="kawhi")` as the trainer's weights_fn: the step trains and the
    weights equal those the file-based passes give for the same prompts and completions."""
    from vlmcredit import online
    from vlmcredit.data.sample import Sample
    from vlmcredit.export.trl import VlmCreditGRPOTrainer
    from vlmcredit.methods.kawhi import KAWHI
    from vlmcredit.methods.registry import Needs
    from vlmcredit.models.loading import load_checkpoint
    from vlmcredit.models.pixels import images_from_pixel_values
    from vlmcredit.pipelines.passes import run_passes
    from vlmcredit.probes.capture import CaptureSpec

    processor = trl_setup["processor"]
    seen = []

    def kawhi(model, batch):
        w = online.weights(
            model, batch, method="kawhi", heads=[0, 3], processor=processor, granularity="token"
        )
        seen.append((batch["input_ids"][:, -COMPLETION_LENGTH:].clone(), batch, w.clone()))
        return w

    # fp32 (TRL defaults to bf16 autocast, which would round Q/K to bf16 in the trainer only)
    run = train_one_step(
        trl_setup, VlmCreditGRPOTrainer, "online-kawhi", weights_fn=kawhi, args={"bf16": False}
    )
    assert np.isfinite(run["loss"])
    ((_, batch, w),) = seen
    assert w.shape == batch["response_mask"].shape
    lengths = batch["response_mask"].sum(1).tolist()
    real = torch.cat([w[b, : int(n)] for b, n in enumerate(lengths)])
    assert torch.all((real >= 0.1) & (real <= 1.0)) and real.unique().numel() > 2

    # the file-based path on the same prompts (dataset rows) and completion ids
    ck = load_checkpoint(trl_setup["ckpt"], dtype="fp32")
    dataset = trl_setup["dataset"]
    last = ck.geometry.num_layers - 1
    spec = CaptureSpec(attention=False, qk_layers=[last])
    needs = Needs(qk_layers=(last,), images=True, text=True)
    cfg = KAWHI.make_config({"granularity": "token"})
    prompt_width = batch["input_ids"].shape[1] - batch["response_mask"].shape[1]
    ip = processor.image_processor
    shown = images_from_pixel_values(  # one image per row, in row order
        batch["pixel_values"], batch["image_grid_thw"], ck.geometry, ip.image_mean, ip.image_std
    )
    for b, n in enumerate(lengths):
        ids = batch["input_ids"][b, prompt_width : prompt_width + int(n)].tolist()
        # the dataset row whose image this batch row holds (both rows share the prompt text)
        row = next(r for r in dataset if np.array_equal(np.asarray(r["image"]), shown[b]))
        sample = Sample([row["image"]], row["prompt"], ids, f"row{b}")
        _, passes = run_passes(ck, [sample], needs, spec, None, head_choice=[(last, 0), (last, 3)])
        (out,) = KAWHI.run(passes, cfg)
        assert np.allclose(out.weight, w[b, : int(n)].numpy(), atol=1e-4)


def test_weights_kawhi_pre_rope_ablation_end_to_end(tiny_ckpt, loaded, charts, tmp_path) -> None:
    """`-p alignment=pre-rope` through the CLI: the recomputed-states pass alone (no capture),
    the same alpha as the library path on each sample, and not the paper's alpha."""
    from PIL import Image

    from tests.methods.test_kawhi import reference_states
    from vlmcredit.data.sample import Sample
    from vlmcredit.methods.kawhi import KAWHI
    from vlmcredit.pipelines.passes import run_passes

    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"critical_heads": [0, 3]}))
    ckpt = str(tiny_ckpt(FAMILY))
    common = ["--ckpt", ckpt, "--data", str(charts), "--heads-json", str(heads)]
    out = tmp_path / "pre"
    result = _run(
        "weights", "--method", "kawhi", "-p", "alignment=pre-rope", *common, "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    paper = _run("weights", "--method", "kawhi", *common, "--out", str(tmp_path / "paper"))
    assert paper.exit_code == 0, paper.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passes"] == ["qk_states", "images", "text"]
    assert manifest["qk_heads"]["pairs"][-2:] == [[2, 0], [2, 3]]
    table = read_signals(out).frame.set_index("sample_id")
    paper_alpha = read_signals(tmp_path / "paper").frame.set_index("sample_id")["alpha"]
    ck = loaded(FAMILY)
    cfg = KAWHI.make_config({"alignment": "pre-rope"})
    last = ck.geometry.num_layers - 1
    for i, response in enumerate(RESPONSES):
        image = Image.open(charts.parent / f"chart-{i}.png").convert("RGB")
        sample = Sample([image], "Which bar is tallest?", response, f"c{i}")
        _, passes = run_passes(
            ck, [sample], KAWHI.needs(cfg), None, None, head_choice=[(last, 0), (last, 3)]
        )
        (direct,) = KAWHI.run(passes, cfg)
        alpha = np.asarray(table.loc[f"c{i}", "alpha"])
        assert np.allclose(alpha, direct.columns["alpha"], atol=1e-5)
        assert not np.allclose(alpha, np.asarray(paper_alpha.loc[f"c{i}"]), atol=1e-3)
        # the states behind it are the pre-RoPE ones of an independent recomputation
        resp, _ = reference_states(ck, sample)["pre-rope"]
        assert np.allclose(passes[0].qk_states[("pre-rope", last)][0], resp.numpy(), atol=1e-5)


def test_online_kawhi_key_key_equals_the_file_based_path(loaded, charts) -> None:
    """`online.weights(..., config=KawhiConfig(alignment="key-key"))` on a trainer batch (prompt
    left padded, response right padded) gives the weights of the file-based passes."""
    from PIL import Image

    from tests.test_online import trainer_batch
    from vlmcredit import online
    from vlmcredit.data.sample import Sample
    from vlmcredit.methods.kawhi import KAWHI, KawhiConfig
    from vlmcredit.pipelines.passes import run_passes

    ck = loaded(FAMILY)
    images = [Image.open(charts.parent / f"chart-{i}.png").convert("RGB") for i in range(2)]
    # online rows are named by their batch index: the same ids give the same SGUF sampling
    samples = [
        Sample([im], "Which bar is tallest?", r, str(i))
        for i, (im, r) in enumerate(zip(images, RESPONSES[:2], strict=True))
    ]
    batch = trainer_batch(ck, samples)
    # token granularity: every token's weight follows its own alpha
    cfg = KawhiConfig(alignment="key-key", heads="all", granularity="token")
    weights = online.weights(ck.model, batch, method="kawhi", config=cfg, processor=ck.processor)
    _, passes = run_passes(ck, samples, KAWHI.needs(cfg), None, None)
    for b, (sample, out) in enumerate(zip(passes, KAWHI.run(passes, cfg), strict=True)):
        n = len(sample.token_ids)
        assert np.allclose(weights[b, :n].numpy(), out.weight, atol=1e-5)
        assert np.unique(out.weight).size > 2
        assert torch.all(weights[b, n:] == 1.0)
