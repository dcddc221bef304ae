"""The layer output *and* each row's log-sum-exp from one fused attention kernel call.

`F.scaled_dot_product_attention` computes every row's log-sum-exp internally but returns only
the output. The aten kernels it dispatches to return both; calling them directly lets the
capture score only the image columns (p = exp(score - lse)) instead of recomputing full rows.

- CPU: `_scaled_dot_product_flash_attention_for_cpu` (the kernel F.sdpa runs on CPU; it takes
  grouped kv heads as they are).
- CUDA: `_scaled_dot_product_flash_attention` when there is no mask and the dtype is bf16/fp16
  (what F.sdpa picks there), else `_scaled_dot_product_efficient_attention` with
  `compute_log_sumexp=True` (padded batches, fp32). Keys and values are repeated to the query
  heads first, as transformers' own SDPA path does for these kernels.

Each returns None where its kernel does not apply (grad, dropout, sliding windows, softcap,
mixed dtypes under autocast, other devices); the caller then runs plain SDPA and recomputes
the rows exactly, and counts it.
"""

from __future__ import annotations

from typing import Any

import torch

Fused = tuple[tuple[torch.Tensor, None], torch.Tensor]


def _applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> bool:
    return not (
        torch.is_grad_enabled()
        or kwargs.get("dropout", 0.0)
        or kwargs.get("sliding_window")
        or kwargs.get("softcap") is not None
        or query.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        # Under autocast (e.g. a trainer's bf16=True) RoPE leaves q/k in fp32 while v comes
        # out of the projection in bf16; F.sdpa reconciles that through autocast, a direct
        # kernel call cannot.
        or not (query.dtype == key.dtype == value.dtype)
    )


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype, kv_len: int) -> torch.Tensor:
    mask = mask[:, :, :, :kv_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, float("-inf")
        )
    return mask.to(dtype)


def _is_causal(module: Any, query: torch.Tensor, mask: torch.Tensor | None) -> bool:
    # transformers' rule: a None mask with several queries means plain causal (Q == S then).
    return mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)


def cpu_sdpa_with_lse(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> Fused | None:
    """((B, Q, H, D) output, None), (B, H, Q) fp32 log-sum-exp from the CPU flash kernel."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or query.device.type != "cpu" or not _applies(query, key, value, kwargs):
        return None
    mask = None
    if attention_mask is not None:
        mask = _additive_mask(attention_mask, query.dtype, key.shape[-2])
    out, lse = op(
        query, key, value, 0.0, _is_causal(module, query, mask), attn_mask=mask, scale=scaling
    )
    return (out.transpose(1, 2).contiguous(), None), lse


def cuda_sdpa_with_lse(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> Fused | None:
    """The same on CUDA: flash (no mask, bf16/fp16) or memory-efficient attention. A kernel
    that refuses the shapes (old GPU, unsupported head dim) raises; the caller falls back."""
    if query.device.type != "cuda" or not _applies(query, key, value, kwargs):
        return None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and query.dtype != torch.float32:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, _is_causal(module, query, None), False, scale=scaling
        )[:2]
    else:
        bias = None
        if attention_mask is not None:
            bias = _additive_mask(attention_mask, query.dtype, kv_len)
            # The kernel wants the bias rows aligned to 16 elements and all four dims explicit
            # (what F.sdpa's own preprocessing does): pad, slice back, expand (no copy).
            pad = (-kv_len) % 16
            if pad:
                bias = torch.nn.functional.pad(bias, (0, pad))[..., :kv_len]
            bias = bias.expand(query.shape[0], query.shape[1], q_len, kv_len)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query,
            key,
            value,
            bias,
            True,  # compute_log_sumexp
            0.0,
            _is_causal(module, query, bias),
            scale=scaling,
        )[:2]
    # The memory-efficient kernel pads the log-sum-exp rows to a multiple of 32.
    return (out.transpose(1, 2).contiguous(), None), lse[:, :, :q_len]


def sdpa_with_lse(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> Fused | None:
    """The fused kernel for the query's device, or None."""
    if query.device.type == "cuda":
        return cuda_sdpa_with_lse(module, query, key, value, attention_mask, scaling, kwargs)
    return cpu_sdpa_with_lse(module, query, key, value, attention_mask, scaling, kwargs)
