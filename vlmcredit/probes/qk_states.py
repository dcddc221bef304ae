"""Q/K states of one decoder layer, recomputed from that layer's input in the same forward.

KAWHI's alignment ablations (paper Table 3) compare the response with the image through other
states than the post-RoPE query-key pair the capture keeps: "Key-Key" (the response tokens'
keys) and "before RoPE". A forward pre-hook (with kwargs) on the layer's attention module sees
its input hidden states and the decoder's `position_embeddings` (cos, sin) of this very
forward; from them we project only the rows needed (response tokens, image tokens) with the
module's own q_proj / k_proj (+ q_norm / k_norm on Qwen3-VL) and rotate with the family's own
`apply_rotary_pos_emb` (`vlmcredit.models.attention_qk`). Nothing of the full sequence is kept,
and the hook is removed when the block exits, also on an exception.

Kinds, each a pair (response-token states (H, T, D), image-token keys (H, N, D)), fp32 on the
CPU, key/value heads repeated to the query heads (GQA) as for the captured Q/K:
  query-key: post-RoPE queries, post-RoPE keys (the paper's; equals the capture, tested);
  key-key:   post-RoPE keys of the response tokens, post-RoPE image keys;
  pre-rope:  queries and keys before the rotary embedding (after q/k norm where present).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.attention_qk import num_query_heads, project_keys, project_queries, rotate
from vlmcredit.models.families import ModelGeometry, adapter_of
from vlmcredit.models.inputs import encode_samples
from vlmcredit.probes.response_attention import trainer_forward_inputs, trainer_row_spans

STATE_KINDS = ("query-key", "key-key", "pre-rope")

# (kind, absolute decoder layer) -> (response states (H, T, D), image keys (H, N, D))
States = dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RowSpan:
    """One batch row's response positions [start, end) and image token positions."""

    start: int
    end: int
    image_positions: torch.Tensor  # (N,) long


def attention_module(model: Any, layer: int) -> tuple[int, Any]:
    """(absolute decoder index, attention module) of `layer` (negative: from the end)."""
    adapter = adapter_of(model)
    total = len(adapter.decoder_layers(model))
    index = layer + total if layer < 0 else layer
    for found in adapter.attention_layers(model):
        if found.index == index:
            return index, found.self_attn
    raise VlmCreditError(
        f"layer {layer}: the model has no attention layer there (decoder layers 0-{total - 1})"
    )


def _row_states(
    attn: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, span: RowSpan, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's (response, image) states of `kind` from its (S, hidden) attention input and
    (S, D) cos / sin."""
    positions = span.image_positions.to(hidden.device)
    response = slice(span.start, span.end)
    image_keys = project_keys(attn, hidden[positions])  # (H_kv, N, D)
    if kind == "pre-rope":
        states = project_queries(attn, hidden[response])
    else:
        image_keys = rotate(attn, image_keys, cos[positions], sin[positions])
        project = project_queries if kind == "query-key" else project_keys
        states = rotate(attn, project(attn, hidden[response]), cos[response], sin[response])
    heads = num_query_heads(attn)
    groups = heads // image_keys.shape[0]
    if states.shape[0] != heads:  # key-key: the response keys are GQA-expanded too
        states = states.repeat_interleave(groups, dim=0)
    image_keys = image_keys.repeat_interleave(groups, dim=0)
    return states.float().cpu(), image_keys.float().cpu()


@contextmanager
def layer_states(
    model: Any, requests: Sequence[tuple[str, int]], spans: Sequence[RowSpan]
) -> Iterator[list[States]]:
    """Within the block, the next forward of `model` fills, per row of `spans`, the states of
    each requested (kind, layer) (layer as in the request: negative counts from the end; the
    result is keyed by the absolute index). One forward per block."""
    unknown = sorted({kind for kind, _ in requests} - set(STATE_KINDS))
    if unknown:
        raise VlmCreditError(f"Q/K states {unknown}: choose from {', '.join(STATE_KINDS)}")
    by_layer: dict[int, tuple[Any, list[str]]] = {}
    for kind, layer in requests:
        index, attn = attention_module(model, layer)
        kinds = by_layer.setdefault(index, (attn, []))[1]
        if kind not in kinds:
            kinds.append(kind)
    results: list[States] = [{} for _ in spans]

    def hook_for(index: int, kinds: list[str]) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rope = kwargs.get("position_embeddings")
            if rope is None:
                raise VlmCreditError(
                    f"layer {index}: the attention module got no position_embeddings; this "
                    "transformers version is not supported for recomputed Q/K"
                )
            if hidden.shape[0] != len(spans):
                raise VlmCreditError(
                    f"layer {index}: a forward of {hidden.shape[0]} rows for {len(spans)} spans "
                    "(Q/K states are read from one teacher-forced forward of the batch)"
                )
            if results and (kinds[0], index) in results[0]:
                raise VlmCreditError(f"layer {index}: Q/K states asked from one forward, got two")
            cos, sin = rope
            with torch.no_grad():
                for b, span in enumerate(spans):
                    for kind in kinds:
                        results[b][(kind, index)] = _row_states(
                            module, hidden[b], cos[b], sin[b], span, kind
                        )

        return hook

    handles = []
    try:
        for index, (attn, kinds) in by_layer.items():
            handles.append(attn.register_forward_pre_hook(hook_for(index, kinds), with_kwargs=True))
        yield results
    finally:
        for handle in handles:
            handle.remove()


def sample_states(
    ck: Any, samples: Sequence[Sample], requests: Sequence[tuple[str, int]], spec: Any = None
) -> tuple[list[Any], list[States]]:
    """(capture items, states per sample) for a batch of samples (left-padded together).

    With a `spec` (vlmcredit.probes.capture.CaptureSpec) the attention / Q/K capture runs in
    the same forward; without one the forward is a plain one (logits of one position).
    """
    from vlmcredit.probes.capture import SampleCapture
    from vlmcredit.probes.response_attention import (
        CapturedSample,
        capture_encoded,
        model_device,
    )

    batch = encode_samples(ck.processor, ck.geometry, samples)
    spans = [
        RowSpan(
            layout.response_span[0],
            layout.response_span[1],
            torch.as_tensor(layout.image_positions, dtype=torch.long),
        )
        for layout in batch.layouts
    ]
    with layer_states(ck.model, requests, spans) as states:
        if spec is not None:
            captures, _ = capture_encoded(ck.model, batch, spec, logits=False)
        else:
            device = model_device(ck.model)
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            inputs = ck.adapter.with_positions(ck.model, inputs)
            with torch.no_grad():
                ck.model(**inputs, logits_to_keep=1)
            captures = [SampleCapture([], [], "none", None) for _ in samples]
    items = [
        CapturedSample(sample, layout, ids, cap)
        for sample, layout, ids, cap in zip(
            samples, batch.layouts, batch.response_ids, captures, strict=True
        )
    ]
    return items, states


def batch_states(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    requests: Sequence[tuple[str, int]],
    lengths: list[int],
) -> list[States]:
    """States per row of a trainer batch (the layout of `vlmcredit.online`), one forward set
    up as `probes.batch_qk.capture_batch_qk` sets up its own."""
    geo = ModelGeometry.from_config(model.config)
    rows = trainer_row_spans(batch["input_ids"], batch["response_mask"], geo, "a Q/K method")
    spans = [RowSpan(*row) for row in rows]
    inputs = trainer_forward_inputs(model, batch)
    with torch.no_grad(), layer_states(model, requests, spans) as states:
        model(**inputs, logits_to_keep=1)
    return states
