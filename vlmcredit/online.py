"""Credit signals inside a training loop: weights for a batch as the trainer holds it, no disk.

    from vlmcredit import online
    w = online.weights(model, batch, method="anchors")       # (B, T) float, on the batch device

`batch` is what TRL and VERL both hold after a rollout:
    input_ids       (B, P + T)  prompt block (left padded) followed by the response block
    attention_mask  (B, P + T)
    response_mask   (B, T)      1 on response tokens; the response block is right padded
    pixel_values, image_grid_thw, and optionally mm_token_type_ids (built when missing)
Column t of the result belongs to response token t; padding gets weight 1.0 (the trainer's own
mask removes it). Methods register under one call (`@register("name")`), so KAWHI, ToR and
VPPO weights plug in beside anchors as they land.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vlmcredit.errors import VlmCreditError

WeightFn = Callable[..., torch.Tensor]
METHODS: dict[str, WeightFn] = {}


def register(name: str) -> Callable[[WeightFn], WeightFn]:
    """Register a weight method for `weights(..., method=name)`."""

    def wrap(fn: WeightFn) -> WeightFn:
        METHODS[name] = fn
        return fn

    return wrap


def weights(
    model: Any, batch: Mapping[str, torch.Tensor], method: str = "anchors", **params: Any
) -> torch.Tensor:
    """(B, T) per-token weights for the response block of `batch` by `method`."""
    if method not in METHODS:
        raise VlmCreditError(
            f"method {method!r}: not available online; choose one of {', '.join(sorted(METHODS))}"
        )
    for key in ("input_ids", "attention_mask", "response_mask"):
        if key not in batch:
            raise VlmCreditError(f"batch: missing {key!r} (see vlmcredit.online for the layout)")
    if batch["response_mask"].shape[1] > batch["input_ids"].shape[1]:
        raise VlmCreditError("batch: response_mask is wider than input_ids")
    return METHODS[method](model, batch, **params)


@register("anchors")
def anchor_weights(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    config: Any = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """AT-RL weights: 1.0 on anchor tokens, `config.other_weight` elsewhere (default 0.0).

    `config` is a `vlmcredit.analysis.anchors.AnchorConfig` (defaults: bipartite graph,
    Leiden, ratio 0.15); `layers`/`heads` restrict the attention averaged (default all).
    """
    from vlmcredit.analysis.anchors import AnchorConfig, label_anchors
    from vlmcredit.analysis.connectivity import aggregate_attention
    from vlmcredit.probes.response_attention import capture_batch_attention

    cfg = config or AnchorConfig()
    cfg.check()
    mask = batch["response_mask"]
    out = torch.ones(mask.shape, dtype=torch.float32)
    for b, attention in enumerate(capture_batch_attention(model, batch, layers, heads)):
        att = aggregate_attention(attention.numpy())
        if att.shape[0] == 0:
            continue
        result = label_anchors(att, cfg)
        out[b, : att.shape[0]] = torch.from_numpy(result.weight.astype("float32"))
    return out.to(mask.device)
