"""Capture in bf16/fp16 (what users run): probabilities from fp32 scores, checked against an
fp32-score reference built from the same low-precision q and k; never NaN or Inf."""

from __future__ import annotations

import types

import pytest
import torch

from tests.helpers import noise_image
from vlmcredit.data.sample import Sample
from vlmcredit.probes.capture import CaptureSession, CaptureSpec, RowTarget, _cpu_sdpa_with_lse
from vlmcredit.probes.response_attention import capture_samples

H, HKV, S, D = 4, 2, 300, 64
ROWS, IMAGE = (200, 300), (20, 120)


def _reference(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax over all keys with fp32 scores from the given (low-precision) q, k."""
    keys = k.float().repeat_interleave(H // HKV, dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return probs[0, :, ROWS[0] : ROWS[1], IMAGE[0] : IMAGE[1]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", [False, True])
def test_low_precision_capture_matches_fp32_scores(dtype, kernel) -> None:
    gen = torch.Generator().manual_seed(0)
    # magnitudes that give attention scores up to ~25, where bf16-rounded scores err by ~9%
    q = (torch.randn(1, H, S, D, generator=gen) * 2.2).to(dtype)
    k = (torch.randn(1, HKV, S, D, generator=gen) * 2.2).to(dtype)
    v = torch.randn(1, HKV, S, D, generator=gen).to(dtype)
    scale = D**-0.5
    module = types.SimpleNamespace(layer_idx=0, is_causal=True)  # the caller's layer identity
    target = RowTarget(ROWS[0], ROWS[1], torch.arange(*IMAGE))
    session = CaptureSession(CaptureSpec(reduce="heads"), [target], 1, H)
    lse = None
    with torch.no_grad():
        if kernel:
            fused = _cpu_sdpa_with_lse(
                module, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, scale, {}
            )
            assert fused is not None, "the fused CPU kernel should apply here"
            lse = fused[1]
        session.observe(module, q, k, None, scale, lse)
    got = session.result(0).attention[0]
    ref = _reference(q, k, scale)
    assert torch.isfinite(got).all()
    shown = ref > 1e-4
    relative = ((got - ref).abs() / ref)[shown]
    assert relative.median() < 5e-3  # the target: 0.5% median
    assert relative.max() < 5e-2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tiny_model_capture_in_low_precision_is_finite(dtype, tiny_ckpt) -> None:
    from vlmcredit.models.loading import load_checkpoint

    ck = load_checkpoint(str(tiny_ckpt("qwen2.5-vl")), dtype=dtype)
    samples = [
        Sample([noise_image(56, 84, 1)], "Describe.", "Dots and more dots, nothing else.", "a"),
        Sample([noise_image(84, 56, 2)], "Describe.", "Static.", "b"),  # padded row
    ]
    items = capture_samples(ck, samples, CaptureSpec(reduce="heads", qk_layers=[1]))
    for item in items:
        att = item.capture.attention
        assert att.dtype == torch.float32 and torch.isfinite(att).all()
        assert (att >= 0).all() and (att.sum(-1) <= 1 + 1e-4).all()
        assert all(torch.isfinite(x).all() for x in item.capture.queries.values())
