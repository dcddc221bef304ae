"""Credit signals inside a training loop: weights for a batch as the trainer holds it, no disk.

    from vlmcredit import online
    w = online.weights(model, batch, method="anchors")       # (B, T) float, on the batch device

`batch` is what TRL and VERL both hold after a rollout:
    input_ids       (B, P + T)  prompt block (left padded) followed by the response block
    attention_mask  (B, P + T)
    response_mask   (B, T)      1 on response tokens; the response block is right padded
    pixel_values, image_grid_thw, and optionally mm_token_type_ids (built when missing)
Column t of the result belongs to response token t; padding gets weight 1.0 (the trainer's own
mask removes it). Any method of `vlmcredit.methods` works here: this module runs the model
passes the method declares on the batch and hands the arrays to the method, exactly as
`vlmcredit weights` does for a rollout file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.methods import registry


def methods() -> list[str]:
    """The names `weights(..., method=...)` accepts."""
    return registry.available()


def weights(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    method: str = "anchors",
    config: Any = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    **params: Any,
) -> torch.Tensor:
    """(B, T) per-token weights for the response block of `batch` by `method`.

    `config` is the method's config object (e.g. `AnchorConfig`); or pass its parameters as
    keyword arguments (`ratio=0.2`). `layers`/`heads` restrict the attention the method reads
    (default all).
    """
    m = registry.get(method)
    for key in ("input_ids", "attention_mask", "response_mask"):
        if key not in batch:
            raise VlmCreditError(f"batch: missing {key!r} (see vlmcredit.online for the layout)")
    if batch["response_mask"].shape[1] > batch["input_ids"].shape[1]:
        raise VlmCreditError("batch: response_mask is wider than input_ids")
    if config is None:
        config = m.make_config(params)
    elif params:
        raise VlmCreditError(f"method {method}: pass either config= or parameters, not both")
    elif hasattr(config, "check"):
        config.check()
    passes = batch_passes(model, batch, m.needs(config), layers, heads)
    mask = batch["response_mask"]
    out = torch.ones(mask.shape, dtype=torch.float32)
    for b, result in enumerate(m.run(passes, config)):
        n = len(passes[b].token_ids)
        if n == 0:
            continue
        w = result.weight
        if result.sample_weight is not None:
            w = w * np.float32(result.sample_weight)
        out[b, :n] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return out.to(mask.device)


def batch_passes(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    needs: registry.Needs,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
) -> list[registry.SamplePasses]:
    """Run the passes `needs` names on a trainer batch, one forward for all of them."""
    from vlmcredit.probes.response_attention import capture_batch_attention, response_rows

    unsupported = [n for n in needs.names() if n != "attention"]
    if unsupported:
        raise VlmCreditError(
            f"online: pass(es) {', '.join(unsupported)} are not available in a trainer batch yet"
        )
    input_ids = batch["input_ids"]
    start = input_ids.shape[1] - batch["response_mask"].shape[1]
    lengths = response_rows(batch["response_mask"])
    attention = capture_batch_attention(model, batch, layers, heads) if needs.attention else None
    passes = []
    for b, n in enumerate(lengths):
        ids = input_ids[b, start : start + n].detach().cpu().numpy().astype(np.int64)
        passes.append(
            registry.SamplePasses(
                sample_id=str(b),
                token_ids=ids,
                attention=None if attention is None else attention[b].numpy(),
            )
        )
    return passes
