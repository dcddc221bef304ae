"""Post-RoPE Q (response tokens) and K (image tokens) of chosen layers on a trainer batch, from
one forward on the capture implementation (vlmcredit.online, for Q/K methods such as KAWHI).

The batch is what `vlmcredit.online` documents: prompt block (left padded) + response block
(right padded). Set up like `capture_batch_attention`: image positions and mm_token_type_ids
from `input_ids`, explicit M-RoPE positions, logits for one position only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import ModelGeometry, adapter_of
from vlmcredit.models.layout import prompt_image_positions, prompt_mm_token_type_ids
from vlmcredit.probes.capture import CaptureSpec, RowTarget, SampleCapture, capture_session


def capture_batch_qk(
    model: Any, batch: Mapping[str, torch.Tensor], qk_layers: Sequence[int], lengths: list[int]
) -> list[SampleCapture]:
    """Per row, the capture holding `queries[layer]` (H, T_b, D) and `keys[layer]` (H, N_b, D)."""
    geo = ModelGeometry.from_config(model.config)
    input_ids = batch["input_ids"]
    start = input_ids.shape[1] - batch["response_mask"].shape[1]
    targets = []
    for b, n in enumerate(lengths):
        positions = prompt_image_positions(input_ids[b], geo, start)
        if positions.numel() == 0:
            raise VlmCreditError(
                f"batch row {b}: has no image tokens; a Q/K method aligns the response with the "
                "image (filter text-only rows first)"
            )
        targets.append(RowTarget(start, start + n, positions))
    inputs = {
        k: batch[k]
        for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        if k in batch
    }
    inputs["mm_token_type_ids"] = prompt_mm_token_type_ids(input_ids, geo, start).to(torch.long)
    layers = sorted({layer % geo.num_layers for layer in qk_layers})
    spec = CaptureSpec(attention=False, qk_layers=layers)
    inputs = adapter_of(model).with_positions(model, inputs)
    with torch.no_grad(), capture_session(model, spec, targets) as session:
        model(**inputs, logits_to_keep=1)
    return [session.result(b) for b in range(len(targets))]
