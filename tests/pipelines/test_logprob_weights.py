"""ToR, VPPO, entropy and SAYO through `vlmcredit weights` (passes shared by all chosen methods),
`vlmcredit.online`, and `vlmcredit compare` on the runs they write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.nn.modules.module import register_module_forward_hook
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit import online
from vlmcredit.analysis.compare import MethodTokens, compare_pair, spearman
from vlmcredit.cli.main import app
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.signals import read_signals
from vlmcredit.models.inputs import encode_samples

runner = CliRunner()
FAMILY = "qwen2.5-vl"
BASE = "Qwen2_5_VLModel"  # the decoder + vision tower under the LM head
RESPONSES = [
    "A red square on the left and a blue circle on the right.",
    "Static noise everywhere, in many colours.",
    "Yes.",
    "Small coloured dots cover the whole picture, like an old television.",
]
BOX = [[0, 0, 56, 56]]


def _image(i: int):
    return noise_image(112, 140, 3) if i % 2 else noise_image(84, 168, 4)


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("logprob-rollouts")
    _image(1).save(folder / "a.png")
    _image(0).save(folder / "b.png")
    rows = [
        {
            "id": f"s{i}",
            "images": ["a.png"] if i % 2 else ["b.png"],
            "prompt": "Describe the image.",
            "response": text,
            "boxes": BOX,
        }
        for i, text in enumerate(RESPONSES)
    ]
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class ForwardCounter:
    """Every forward of the base model: how many, and the pixel sum each one saw."""

    def __init__(self) -> None:
        self.pixels: list[float | None] = []

    def __enter__(self) -> ForwardCounter:
        def hook(module, args, kwargs, output):
            if type(module).__name__ == BASE:
                pv = kwargs.get("pixel_values")
                self.pixels.append(None if pv is None else float(pv.double().sum()))

        self.handle = register_module_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _weights(ckpt: Path, data: Path, out: Path, methods: str, *extra: str):
    args = ["weights", "--method", methods, "--ckpt", str(ckpt), "--data", str(data)]
    result = runner.invoke(app, [*args, "--out", str(out), "--batch-size", "2", *extra, "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def test_three_methods_share_each_pass_and_equal_separate_runs(
    tiny_ckpt, loaded, rollouts, tmp_path
) -> None:
    ckpt = tiny_ckpt(FAMILY)
    with ForwardCounter() as together:
        _weights(ckpt, rollouts, tmp_path / "all", "tor,vppo,entropy")
    # two batches; per batch one forward each: real image, no image, perturbed image
    ck = loaded(FAMILY)
    real = set()
    for start in (0, 2):
        samples = [
            Sample([_image(i)], "Describe the image.", RESPONSES[i]) for i in (start, start + 1)
        ]
        real.add(float(encode_samples(ck.processor, ck.geometry, samples).inputs["pixel_values"]
                       .double().sum()))  # fmt: skip
    assert len(together.pixels) == 6
    assert sum(p is None for p in together.pixels) == 2  # no-image pass: no pixel values
    assert sum(p in real for p in together.pixels) == 2  # the real-image pass runs once a batch
    separate = 0
    for name in ("tor", "vppo", "entropy"):
        with ForwardCounter() as alone:
            _weights(ckpt, rollouts, tmp_path / name, name)
        separate += len(alone.pixels)
        shared = read_signals(tmp_path / "all" / name).frame
        own = read_signals(tmp_path / name).frame
        assert list(shared.columns) == list(own.columns)
        for column in shared.columns:
            for x, y in zip(shared[column], own[column], strict=True):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=column)
    assert separate == 2 * (2 + 2 + 1)  # tor: image + no image; vppo: image + perturbed
    manifest = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert manifest["logprobs"]["variants"] == ["image", "no_image", "perturbed"]
    assert sorted(map(tuple, manifest["logprobs"]["scores"])) == [(1.0, 0.95), (1.0, 1.0)]
    vppo = read_signals(tmp_path / "all" / "vppo")
    assert vppo.meta["loss_denominator"] == "all_tokens"
    alphas = vppo.frame["sample_weight"].to_numpy(np.float64)
    np.testing.assert_allclose(np.sort(alphas), [0.9, 0.9, 1.0, 1.0], atol=1e-6)  # per batch
    assert read_signals(tmp_path / "all" / "entropy").meta["loss_denominator"] == "selected_tokens"


def test_online_weights_equal_the_rollout_run(tiny_ckpt, loaded, rollouts, tmp_path) -> None:
    from tests.test_online import trainer_batch

    ck = loaded(FAMILY)
    out = tmp_path / "run"
    _weights(tiny_ckpt(FAMILY), rollouts, out, "tor,vppo,entropy,sayo", "--max-samples", "2")
    samples = [Sample([_image(i)], "Describe the image.", RESPONSES[i], f"s{i}") for i in (0, 1)]
    batch = trainer_batch(ck, samples)
    batch["boxes"] = [BOX, BOX]
    for name in ("tor", "vppo", "entropy", "sayo"):
        w = online.weights(ck.model, batch, method=name, processor=ck.processor)
        frame = read_signals(out / name).frame
        for b, row in enumerate(frame.itertuples()):
            n = len(row.token_ids)
            want = np.asarray(row.weight) * (getattr(row, "sample_weight", None) or 1.0)
            if name == "vppo":  # seeded by row index online, by sample id offline
                assert w[b, :n].shape == (n,)
                continue
            np.testing.assert_allclose(w[b, :n].numpy(), want, atol=1e-6, err_msg=name)
            assert torch.all(w[b, n:] == 1.0)
    # black after normalisation is the processor's: without it the perturbed pass refuses
    with pytest.raises(VlmCreditError, match="processor="):
        online.weights(ck.model, batch, method="vppo")


def test_compare_identical_runs_and_a_multi_method_run(tiny_ckpt, rollouts, tmp_path) -> None:
    ckpt = tiny_ckpt(FAMILY)
    run = tmp_path / "run"
    _weights(ckpt, rollouts, run, "anchors,vppo,entropy,sayo,tor")
    result = runner.invoke(app, ["compare", str(run), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(table["pairs"]) == 10
    (share,) = table["anchors_in_vppo"]
    anchors = read_signals(run / "anchors").frame
    vppo = read_signals(run / "vppo").frame
    a = np.concatenate(list(anchors["mask"]))
    v = np.concatenate(list(vppo["mask"]))
    assert share["share"] == pytest.approx((a & v).sum() / a.sum())
    assert "perturbation-sensitive" in result.output
    # the same signals twice: complete agreement
    same = runner.invoke(
        app, ["compare", str(run / "tor"), str(run / "tor"), "--out", str(tmp_path / "same")]
    )
    assert same.exit_code == 0, same.output
    (pair,) = json.loads((tmp_path / "same" / "compare.json").read_text())["pairs"]
    assert pair["jaccard"] == 1.0 and pair["precision"] == 1.0 and pair["recall"] == 1.0
    assert pair["spearman"] == pytest.approx(1.0)
    # the comparison is a report section
    report = runner.invoke(
        app, ["report", str(tmp_path / "cmp"), "--out", str(tmp_path / "r.html")]
    )
    assert report.exit_code == 0, report.output
    assert "Method comparison" in (tmp_path / "r.html").read_text()


def test_compare_refuses_folders_without_signals(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["compare", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "holds no signals.parquet" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_pair_figures_equal_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    sel_a = {("s", "r1"): np.array([1, 1, 0, 0, 1], bool), ("s", "r2"): np.array([0, 1], bool)}
    sel_b = {("s", "r1"): np.array([1, 0, 0, 1, 1], bool), ("s", "r2"): np.array([0, 0], bool)}
    score_a = {k: rng.random(len(v)) for k, v in sel_a.items()}
    score_b = {k: np.round(rng.random(len(v)), 1) for k, v in sel_b.items()}  # with ties
    sel_b[("t", "only-b")] = np.array([True])  # not in a: left out
    score_b[("t", "only-b")] = np.array([0.5])
    pair = compare_pair(
        MethodTokens("a", sel_a, score_a, "x"), MethodTokens("b", sel_b, score_b, "y")
    )
    # pooled: a = 1,1,0,0,1,0,1  b = 1,0,0,1,1,0,0 -> both 2, union 5
    assert (pair["responses"], pair["tokens"], pair["both"]) == (2, 7, 2)
    assert pair["jaccard"] == pytest.approx(2 / 5)
    assert pair["precision"] == pytest.approx(2 / 4) and pair["recall"] == pytest.approx(2 / 3)
    keys = [("s", "r1"), ("s", "r2")]
    xa = np.concatenate([score_a[k] for k in keys])
    xb = np.concatenate([score_b[k] for k in keys])
    assert pair["spearman"] == pytest.approx(spearmanr(xa, xb).statistic)
    assert spearman(np.ones(4), np.arange(4.0)) is None  # constant side: undefined


def test_tor_entropy_is_the_sorted_nucleus_of_the_full_logits(
    tiny_ckpt, loaded, rollouts, tmp_path
) -> None:
    """The exported ToR entropy (top-p 0.95, found by the histogram search) equals the nucleus
    entropy by a full sort of the model's full-sequence logits, sample by sample."""
    from vlmcredit.models.families import adapter_of

    ck = loaded(FAMILY)
    _weights(tiny_ckpt(FAMILY), rollouts, tmp_path / "tor", "tor")
    frame = read_signals(tmp_path / "tor").frame
    assert len(frame) == len(RESPONSES)
    for i, row in enumerate(frame.itertuples()):
        sample = Sample([_image(i)], "Describe the image.", RESPONSES[i])
        enc = encode_samples(ck.processor, ck.geometry, [sample])
        start, end = enc.layouts[0].response_span
        inputs = adapter_of(ck.model).with_positions(ck.model, enc.inputs)
        with torch.no_grad():
            logits = ck.model(**inputs).logits[0, start - 1 : end - 1].double()
        lp = torch.log_softmax(logits, -1)
        full = -(lp.exp() * lp).sum(-1)
        probs = lp.exp().sort(-1, descending=True).values
        kept = torch.where(probs.cumsum(-1) - probs < 0.95, probs, 0.0)
        q = kept / kept.sum(-1, keepdim=True)
        want = -(q * q.log()).nan_to_num(0.0).sum(-1)
        got = np.asarray(row.entropy, np.float64)
        assert got.shape == (end - start,)
        # batched with another response (padding) vs alone: float32 noise only
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        assert (full - want).min() > 1e-3  # the nucleus cuts tokens: top_p is not ignored


def test_capture_and_real_image_scores_share_one_forward(loaded, rollouts) -> None:
    """A method set that needs the attention and the real-image log-probs (SAYO; anchors beside
    ToR / VPPO / entropy) runs ONE forward for both: the same attention, log p and entropy as
    the capture forward plus a separate scoring forward, bit for bit."""
    from vlmcredit.data.rollouts import read_rollouts
    from vlmcredit.methods.registry import Needs
    from vlmcredit.pipelines.passes import run_passes
    from vlmcredit.probes.capture import CaptureSpec

    ck = loaded(FAMILY)
    samples = read_rollouts(rollouts).samples[:2]
    needs = Needs(attention=True, logprobs=("image", "no_image"))
    options = {"logprobs": {"scores": [(1.0, 1.0), (1.0, 0.95)]}}
    spec = CaptureSpec(reduce="mean")
    runs = {}
    for share in (True, False):
        with ForwardCounter() as counter:
            _, passes = run_passes(ck, samples, needs, spec, None, options, share_forward=share)
        runs[share] = (len(counter.pixels), passes)
    assert runs[True][0] == 2 and runs[False][0] == 3  # image (+ capture), no image
    for shared, separate in zip(runs[True][1], runs[False][1], strict=True):
        np.testing.assert_array_equal(shared.attention, separate.attention)
        assert shared.logprobs.keys() == separate.logprobs.keys() and shared.logprobs
        for key in shared.logprobs:
            np.testing.assert_array_equal(shared.logprobs[key], separate.logprobs[key])
        assert shared.entropy.keys() == separate.entropy.keys() and shared.entropy
        for key in shared.entropy:
            np.testing.assert_array_equal(shared.entropy[key], separate.entropy[key])
