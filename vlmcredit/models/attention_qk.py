"""How a Qwen-VL decoder attention module turns its input into queries and keys.

Probes that recompute Q/K from a layer's input (KAWHI's alignment ablations: keys of response
tokens, pre-RoPE states) call these instead of reaching into the module tree themselves. Every
supported family (qwen2-vl, qwen2.5-vl, qwen3-vl, qwen3-vl-moe) computes, per token,

    q = q_norm(q_proj(h)), k = k_norm(k_proj(h))   (the norms on Qwen3-VL only, per head)

then rotates both with its modeling module's `apply_rotary_pos_emb(q, k, cos, sin)`, where
(cos, sin) are the decoder's `position_embeddings` (M-RoPE sections already interleaved by
the rotary module in transformers 5). A family whose attention differs changes this module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from vlmcredit.errors import VlmCreditError


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(n, heads * D) -> (heads, n, D)."""
    return x.view(x.shape[0], -1, head_dim).transpose(0, 1)


def _head_dim(attn: Any) -> int:
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int):
        raise VlmCreditError(
            f"{type(attn).__name__}: no integer head_dim; this attention layout is not supported"
        )
    return head_dim


def project_queries(attn: Any, hidden: torch.Tensor) -> torch.Tensor:
    """(H, n, D) pre-RoPE queries of (n, hidden) attention inputs (after q_norm if any)."""
    d = _head_dim(attn)
    q = attn.q_proj(hidden).view(hidden.shape[0], -1, d)
    norm = getattr(attn, "q_norm", None)
    return (q if norm is None else norm(q)).transpose(0, 1)


def project_keys(attn: Any, hidden: torch.Tensor) -> torch.Tensor:
    """(H_kv, n, D) pre-RoPE keys of (n, hidden) attention inputs (after k_norm if any)."""
    d = _head_dim(attn)
    k = attn.k_proj(hidden).view(hidden.shape[0], -1, d)
    norm = getattr(attn, "k_norm", None)
    return (k if norm is None else norm(k)).transpose(0, 1)


def rotary_function(attn: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The `apply_rotary_pos_emb` of the module's own modeling file (the one its forward uses)."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if not callable(fn):
        raise VlmCreditError(
            f"{type(attn).__module__}: has no apply_rotary_pos_emb; this attention layout is "
            "not supported for recomputed Q/K"
        )
    return fn


def rotate(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(heads, n, D) states rotated by RoPE at n positions whose (n, D) cos/sin are given."""
    fn = rotary_function(attn)
    batched = x.unsqueeze(0)
    # the function rotates a (q, k) pair; the same tensor in both slots rotates it once
    out, _ = fn(batched, batched, cos.unsqueeze(0), sin.unsqueeze(0))
    return out.squeeze(0)


def num_query_heads(attn: Any) -> int:
    """Query heads of the module (q_proj's outputs over the head size)."""
    return int(attn.q_proj.out_features) // _head_dim(attn)
