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

from vlmcredit.models.families import ModelGeometry
from vlmcredit.probes.capture import CaptureSpec, RowTarget, SampleCapture, capture_session
from vlmcredit.probes.response_attention import trainer_forward_inputs, trainer_row_spans


def capture_batch_qk(
    model: Any, batch: Mapping[str, torch.Tensor], qk_layers: Sequence[int], lengths: list[int]
) -> list[SampleCapture]:
    """Per row, the capture holding `queries[layer]` (H, T_b, D) and `keys[layer]` (H, N_b, D).
    (`lengths`, the rows' response lengths, are read from the batch's response mask.)"""
    geo = ModelGeometry.from_config(model.config)
    spans = trainer_row_spans(batch["input_ids"], batch["response_mask"], geo, "a Q/K method")
    targets = [RowTarget(*span) for span in spans]
    inputs = trainer_forward_inputs(model, batch)
    layers = sorted({layer % geo.num_layers for layer in qk_layers})
    spec = CaptureSpec(attention=False, qk_layers=layers)
    with torch.no_grad(), capture_session(model, spec, targets) as session:
        model(**inputs, logits_to_keep=1)
    return [session.result(b) for b in range(len(targets))]
