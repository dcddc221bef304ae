"""Library API: response -> image attention (and Q/K) for samples, without touching disk.

Usable from a training loop: give a loaded checkpoint and samples (or an already-encoded
batch), get per sample the (layers, heads, T, N) attention block or its reduction, the token
layout, and the Q/K states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import ModelGeometry, adapter_of, model_device
from vlmcredit.models.inputs import EncodedBatch, encode_samples
from vlmcredit.models.layout import (
    SampleLayout,
    prompt_image_positions,
    prompt_mm_token_type_ids,
)
from vlmcredit.probes.capture import CaptureSpec, RowTarget, SampleCapture, capture_session


@dataclass
class CapturedSample:
    sample: Sample
    layout: SampleLayout
    response_ids: list[int]
    capture: SampleCapture


def row_targets(
    layouts: Sequence[SampleLayout], device: Any, open_ended: bool = False
) -> list[RowTarget]:
    """Capture targets from layouts: response rows x image columns."""
    return [
        RowTarget(
            layout.response_span[0],
            None if open_ended else layout.response_span[1],
            torch.as_tensor(layout.image_positions, dtype=torch.long, device=device),
        )
        for layout in layouts
    ]


def capture_encoded(
    model: Any, batch: EncodedBatch, spec: CaptureSpec, logits: bool = True
) -> tuple[list[SampleCapture], torch.Tensor | None]:
    """One teacher-forced forward with capture; returns captures and the logits.

    `logits=False` skips the all-position lm_head (S x vocab: for a 152k vocabulary it costs
    more than the capture itself) when the caller only wants the attention.
    """
    device = model_device(model)
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    inputs = adapter_of(model).with_positions(model, inputs)  # fresh, whatever ran before
    keep = {} if logits else {"logits_to_keep": 1}
    with torch.no_grad(), capture_session(model, spec, row_targets(batch.layouts, device)) as s:
        out = model(**inputs, **keep).logits
    return [s.result(b) for b in range(len(batch.layouts))], out if logits else None


def capture_samples(ck: Any, samples: Sequence[Sample], spec: CaptureSpec) -> list[CapturedSample]:
    """Teacher-forced capture for a batch of samples (left-padded together)."""
    batch = encode_samples(ck.processor, ck.geometry, samples)
    captures, _ = capture_encoded(ck.model, batch, spec, logits=False)
    return [
        CapturedSample(sample, layout, ids, cap)
        for sample, layout, ids, cap in zip(
            samples, batch.layouts, batch.response_ids, captures, strict=True
        )
    ]


def capture_and_score_samples(
    ck: Any,
    samples: Sequence[Sample],
    spec: CaptureSpec,
    scores: Sequence[tuple[float, float]],
    entropy: bool = True,
) -> tuple[list[CapturedSample], list[Any]]:
    """`capture_samples` and the real-image log p / entropy of the responses from the SAME
    forward: the decoder runs once with the capture on and keeps its last hidden states, which
    the LM head then scores chunk by chunk (`probes.logprobs.scores_from_hidden`). The same
    numbers as a capture forward plus a separate scoring forward, one forward fewer."""
    from vlmcredit.probes.logprobs import scores_from_hidden

    model = ck.model
    batch = encode_samples(ck.processor, ck.geometry, samples)
    device = model_device(model)
    adapter = adapter_of(model)
    inputs = adapter.with_positions(model, {k: v.to(device) for k, v in batch.inputs.items()})
    with torch.no_grad(), capture_session(model, spec, row_targets(batch.layouts, device)) as s:
        hidden = adapter.base_model(model)(**inputs, use_cache=False).last_hidden_state
        captures = [s.result(b) for b in range(len(batch.layouts))]
    spans = [layout.response_span for layout in batch.layouts]
    rows = scores_from_hidden(model, hidden, inputs["input_ids"], spans, scores, entropy)
    items = [
        CapturedSample(sample, layout, ids, cap)
        for sample, layout, ids, cap in zip(
            samples, batch.layouts, batch.response_ids, captures, strict=True
        )
    ]
    return items, rows


def encoded_samples(ck: Any, samples: Sequence[Sample]) -> list[CapturedSample]:
    """The layout and response ids of samples without running the model (empty capture)."""
    batch = encode_samples(ck.processor, ck.geometry, samples)
    return [
        CapturedSample(sample, layout, ids, SampleCapture([], [], "none", None))
        for sample, layout, ids in zip(samples, batch.layouts, batch.response_ids, strict=True)
    ]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


def generate_responses(
    ck: Any, samples: Sequence[Sample], gen: GenerationConfig, spec: CaptureSpec | None = None
) -> tuple[list[list[int]], list[SampleCapture] | None]:
    """Sample one response per sample; optionally capture attention *during* generation.

    Each response ends at (and includes) the first EOS. The capture covers the response tokens
    that were fed back into the model, i.e. all but the last generated one (its attention row
    would need one more forward); use `capture_samples` on the result for complete rows.
    """
    prompts = [Sample(s.images, s.prompt, [], s.id) for s in samples]
    batch = encode_samples(ck.processor, ck.geometry, prompts)
    device = model_device(ck.model)
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    tok = ck.tokenizer
    stop = ck.adapter.stop_token_ids(ck.model, tok)
    eos_ids = set(stop)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "pad_token_id": pad,
        "eos_token_id": stop,
    }
    if gen.temperature > 0:
        kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(gen.seed)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad(), ck.adapter.fresh_rope_cache(ck.model):
        if spec is None:
            sequences = ck.model.generate(**inputs, **kwargs)
            captures = None
        else:
            targets = row_targets(batch.layouts, device, open_ended=True)
            with capture_session(ck.model, spec, targets) as session:
                sequences = ck.model.generate(**inputs, **kwargs)
    responses: list[list[int]] = []
    for row in sequences[:, prompt_len:].tolist():
        out: list[int] = []
        for token in row:
            out.append(token)
            if token in eos_ids:
                break
        responses.append(out)
    if spec is not None:
        captures = [
            session.result(b, num_tokens=max(0, len(r) - 1)) for b, r in enumerate(responses)
        ]
    return responses, captures


# -- trainer batches (vlmcredit.online) ---------------------------------------------------------
def response_rows(response_mask: torch.Tensor) -> list[int]:
    """Response length per row: up to the last 1 of a right-padded mask."""
    lengths = []
    for row in response_mask.bool().cpu():
        nz = torch.nonzero(row)
        lengths.append(int(nz[-1]) + 1 if nz.numel() else 0)
    return lengths


def trainer_row_spans(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    geo: ModelGeometry,
    image_required_by: str | None = None,
) -> list[tuple[int, int, torch.Tensor]]:
    """Per row of a trainer batch, (response start, end, image positions): the response block
    is the last `response_mask.shape[1]` columns, image positions come from the prompt's ids. A
    row without image tokens gets an empty response range (nothing to connect to), or, with
    `image_required_by` (what needs the image), an error naming the row."""
    start = input_ids.shape[1] - response_mask.shape[1]
    spans = []
    for b, n in enumerate(response_rows(response_mask)):
        positions = prompt_image_positions(input_ids[b], geo, start)
        if positions.numel() == 0 and image_required_by is not None:
            raise VlmCreditError(
                f"batch row {b}: has no image tokens; {image_required_by} aligns the response "
                "with the image (filter text-only rows first)"
            )
        spans.append((start, start + n if positions.numel() else start, positions))
    return spans


def trainer_forward_inputs(model: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The forward inputs of a trainer batch: its ids, mask and pixels, `mm_token_type_ids`
    rebuilt from the ids, and explicit positions.

    A trainer's type ids can be shifted against its ids (TRL builds them with the processor's
    padding side but pads the prompt ids on the left), and M-RoPE positions built from shifted
    ids move the attention. Explicit positions make a fresh forward that leaves the model's
    cached rope deltas (e.g. a trainer's generation state) untouched.
    """
    geo = ModelGeometry.from_config(model.config)
    input_ids = batch["input_ids"]
    start = input_ids.shape[1] - batch["response_mask"].shape[1]
    inputs = {
        k: batch[k]
        for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        if k in batch
    }
    inputs["mm_token_type_ids"] = prompt_mm_token_type_ids(input_ids, geo, start).to(torch.long)
    return adapter_of(model).with_positions(model, inputs)


def capture_batch_attention(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> list[torch.Tensor | None]:
    """Per row, the (L, 1, T_b, N_b) response x image attention (head mean) of one forward;
    None for a row with no image tokens (nothing to connect to). Image positions and type ids
    are rebuilt from `input_ids` (see `trainer_forward_inputs`)."""
    return _capture_batch(model, batch, layers, heads, None, True)[0]


def capture_batch_attention_and_scores(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    scores: Sequence[tuple[float, float]],
    entropy: bool = True,
) -> tuple[list[torch.Tensor | None], list[Any]]:
    """`capture_batch_attention` and the responses' real-image log p / entropy from the same
    forward (the decoder's last hidden states scored by the LM head, as
    `probes.logprobs.score_trainer_batch` scores them in a forward of its own)."""
    rows, scored = _capture_batch(model, batch, layers, heads, scores, entropy)
    assert scored is not None
    return rows, scored


def _capture_batch(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    scores: Sequence[tuple[float, float]] | None,
    entropy: bool,
) -> tuple[list[torch.Tensor | None], list[Any] | None]:
    geo = ModelGeometry.from_config(model.config)
    spans = trainer_row_spans(batch["input_ids"], batch["response_mask"], geo)
    targets = [RowTarget(*span) for span in spans]
    has_image = [t.key_positions.numel() > 0 for t in targets]
    if not any(has_image) and scores is None:
        return [None] * len(targets), None
    inputs = trainer_forward_inputs(model, batch)
    spec = CaptureSpec(layers=layers, heads=heads, reduce="mean")
    scored = None
    with torch.no_grad(), capture_session(model, spec, targets) as session:
        if scores is None:
            model(**inputs, logits_to_keep=1)
        else:
            from vlmcredit.probes.logprobs import scores_from_hidden

            adapter = adapter_of(model)
            hidden = adapter.base_model(model)(**inputs, use_cache=False).last_hidden_state
            start = batch["input_ids"].shape[1] - batch["response_mask"].shape[1]
            lengths = response_rows(batch["response_mask"])
            response = [(start, start + n) for n in lengths]
            ids = inputs["input_ids"]
            scored = scores_from_hidden(model, hidden, ids, response, scores, entropy)
        rows = [session.result(b).attention if image else None for b, image in enumerate(has_image)]
    return rows, scored
