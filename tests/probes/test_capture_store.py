"""The preallocated capture result: rows written in place (teacher forcing hands the very
buffer over), grown during generation, stored in bf16/fp16 as the fp32 values rounded once."""

from __future__ import annotations

import types

import pytest
import torch

from vlmcredit.probes.capture import CaptureSession, CaptureSpec, RowTarget, _cpu_sdpa_with_lse
from vlmcredit.probes.capture_store import ResultStore

H, HKV, D = 4, 2, 32
PROMPT, IMAGE = 60, (10, 45)
MODULE = types.SimpleNamespace(layer_idx=0, is_causal=True)


def _qkv(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, length, D, generator=gen) * 1.5
    k = torch.randn(1, HKV, length, D, generator=gen) * 1.5
    return q, k, torch.randn(1, HKV, length, D, generator=gen)


def _reference(q: torch.Tensor, k: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    """Causal softmax over all keys in float64 (independent of the capture code)."""
    length = q.shape[2]
    keys = k.double().repeat_interleave(H // HKV, dim=1)
    scores = (q.double() @ keys.transpose(-1, -2)) * D**-0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return probs[0, :, rows[0] : rows[1], IMAGE[0] : IMAGE[1]].float()


def _observe(session: CaptureSession, q, k, v, kernel: bool) -> None:
    lse = None
    if kernel:
        fused = _cpu_sdpa_with_lse(MODULE, q, k, v, None, D**-0.5, {})
        assert fused is not None
        lse = fused[1]
    session.observe(MODULE, q, k, None, D**-0.5, lse)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-lse", "portable"])
def test_generation_rows_grow_past_the_first_reservation(kernel: bool) -> None:
    """Decoding one row per call (as generate does) for 70 rows: more than the 32 first
    reserved, so the result grows twice; every row equals the float64 softmax."""
    total = PROMPT + 70
    q, k, v = _qkv(total)
    spec = CaptureSpec(kernel_lse=kernel, chunk_elements=64)
    session = CaptureSession(spec, [RowTarget(PROMPT, None, torch.arange(*IMAGE))], 1, H)
    with torch.no_grad():
        _observe(session, q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], kernel)
        for t in range(PROMPT, total):
            _observe(session, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], kernel)
    got = session.result(0, num_tokens=65).attention
    want = _reference(q, k, (PROMPT, PROMPT + 65))
    assert got.shape == (1, H, 65, IMAGE[1] - IMAGE[0]) and got.is_contiguous()
    assert (got[0] - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-lse", "portable"])
def test_teacher_forced_result_is_the_buffer_written_in_place(kernel: bool) -> None:
    q, k, v = _qkv(PROMPT + 40, seed=1)
    target = RowTarget(PROMPT, PROMPT + 40, torch.arange(*IMAGE))
    session = CaptureSession(CaptureSpec(kernel_lse=kernel, chunk_elements=100), [target], 1, H)
    with torch.no_grad():
        _observe(session, q, k, v, kernel)
    buffer = session._stores[0]._host
    got = session.result(0).attention
    assert got.data_ptr() == buffer.data_ptr()  # handed over, not copied
    assert (got[0] - _reference(q, k, (PROMPT, PROMPT + 40))).abs().max().item() <= 1e-5


@pytest.mark.parametrize("store", ["bf16", "fp16"])
@pytest.mark.parametrize("reduce", ["heads", "mean"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-lse", "portable"])
def test_low_precision_storage_is_the_fp32_result_rounded_once(store, reduce, kernel) -> None:
    q, k, v = _qkv(PROMPT + 40, seed=2)
    target = RowTarget(PROMPT, PROMPT + 40, torch.arange(*IMAGE))
    results = {}
    for dtype in ("fp32", store):
        spec = CaptureSpec(reduce=reduce, heads=[0, 3], kernel_lse=kernel, store_dtype=dtype)
        session = CaptureSession(spec, [target], 1, H)
        with torch.no_grad():
            _observe(session, q, k, v, kernel)
        results[dtype] = session.result(0).attention
    low, full = results[store], results["fp32"]
    assert low.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[store]
    assert full.dtype == torch.float32 and low.shape == full.shape
    assert torch.equal(low, full.to(low.dtype))


def test_store_zero_fills_rows_a_layer_never_saw() -> None:
    store = ResultStore(2, 1, 3, None, torch.float32)
    store.rows(0, 0, 5, torch.device("cpu")).fill_(1.0)
    store.rows(1, 0, 2, torch.device("cpu")).fill_(2.0)
    out = store.take()
    assert out.shape == (2, 1, 5, 3)
    assert (out[0] == 1).all() and (out[1, :, :2] == 2).all() and (out[1, :, 2:] == 0).all()
    empty = ResultStore(2, 3, 4, 10, torch.bfloat16).take()
    assert empty.shape == (2, 3, 0, 4) and empty.dtype == torch.bfloat16


def test_unknown_store_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="store_dtype"):
        CaptureSession(CaptureSpec(store_dtype="int8"), [], 1, H)  # type: ignore[arg-type]
