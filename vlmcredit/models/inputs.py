"""Teacher-forced model inputs: prompt (with images) + response, left-padded into a batch.

The prompt goes through the processor (which expands each image placeholder into its image
tokens) with the chat template's generation prompt; the response is tokenized on its own and
appended, so its token ids are exactly what a trainer holds for a completion. Token ids a
trainer recorded are used as given, never re-tokenised: `response` as ids, and `prompt_ids`
(the prompt the trainer fed, image tokens expanded), which must equal the templated prompt when
the sample also has one (`check_token_ids` refuses the sample otherwise) and are the prompt when
it has none (pixels then come from the image processor alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import ModelGeometry
from vlmcredit.models.layout import SampleLayout, build_layouts, build_mm_token_type_ids


@dataclass
class EncodedBatch:
    """Model inputs (torch tensors) and the layout of each row."""

    inputs: dict[str, Any]
    layouts: list[SampleLayout]
    response_ids: list[list[int]]


def prompt_text(processor: Any, sample: Sample) -> str:
    """The chat-formatted prompt ending with the generation prompt.

    A plain-text prompt becomes one user turn with the sample's images before the text (Qwen's
    usual order); a message list is used as given and must hold one image part per image.
    """
    if sample.prompt is None:
        raise VlmCreditError(f"{where(sample)}: has no prompt text, only prompt_ids")
    if isinstance(sample.prompt, str):
        content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.images]
        content.append({"type": "text", "text": sample.prompt})
        messages = [{"role": "user", "content": content}]
    else:
        messages = sample.prompt
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_samples(
    processor: Any,
    geometry: ModelGeometry,
    samples: Sequence[Sample],
    device: Any = None,
) -> EncodedBatch:
    """Encode samples into one left-padded teacher-forced batch, with layouts."""
    import torch

    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows: list[list[int]] = []
    pixel_values: list[Any] = []
    grids: list[Any] = []
    response_ids: list[list[int]] = []
    for sample in samples:
        enc = encode_prompt(processor, geometry, sample)
        prompt_ids = enc["input_ids"]
        if isinstance(sample.response, str):
            resp = tok(sample.response, add_special_tokens=False)["input_ids"]
        else:
            resp = [int(x) for x in sample.response]
        rows.append(prompt_ids + resp)
        response_ids.append(resp)
        if sample.images:
            pixel_values.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])

    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    spans = []
    for b, row in enumerate(rows):
        pad = length - len(row)
        input_ids[b, pad:] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, pad:] = 1
        spans.append((length - len(response_ids[b]), length))
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": build_mm_token_type_ids(input_ids, geometry).to(torch.long),
    }
    if grids:
        inputs["pixel_values"] = torch.cat(pixel_values, dim=0)
        inputs["image_grid_thw"] = torch.cat(grids, dim=0)
    sizes = [[(im.height, im.width) for im in s.images] for s in samples]
    layouts = build_layouts(
        input_ids, attention_mask, inputs.get("image_grid_thw"), geometry, spans, sizes
    )
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return EncodedBatch(inputs, layouts, response_ids)


def where(sample: Sample) -> str:
    """How errors name a sample: its source row when it came from a file, else its id."""
    row = sample.meta.get("row")
    if row is None:
        return f"sample {sample.id!r}"
    source = sample.meta.get("source")
    return f"{source + ' ' if source else ''}row {row} (id {sample.id!r})"


def encode_prompt(processor: Any, geometry: ModelGeometry, sample: Sample) -> dict[str, Any]:
    """`input_ids` (a list) of the sample's prompt, plus `pixel_values` and `image_grid_thw`
    when it has images: `prompt_ids` when given (checked against the templated prompt when the
    sample has one), else the templated prompt."""
    given = sample.prompt_ids
    if sample.prompt is None:
        if given is None:
            raise VlmCreditError(f"{where(sample)}: has neither a prompt nor prompt_ids")
        enc = _image_features(processor, sample)
        _check_image_tokens(geometry, sample, given, enc.get("image_grid_thw"))
        return {**enc, "input_ids": list(given)}
    text = prompt_text(processor, sample)
    n_placeholders = text.count(getattr(processor, "image_token", "<|image_pad|>"))
    if n_placeholders != len(sample.images):
        raise VlmCreditError(
            f"{where(sample)}: prompt has {n_placeholders} image placeholders but "
            f"{len(sample.images)} images were given"
        )
    enc = dict(processor(text=[text], images=sample.images or None, return_tensors="pt"))
    templated = enc["input_ids"][0].tolist()
    if given is not None and given != templated:
        raise VlmCreditError(f"{where(sample)}: {_first_difference(given, templated)}")
    out = {"input_ids": templated}
    if sample.images:
        out["pixel_values"] = enc["pixel_values"]
        out["image_grid_thw"] = enc["image_grid_thw"]
    return out


def check_token_ids(processor: Any, geometry: ModelGeometry, sample: Sample) -> None:
    """Refuse token ids the model cannot embed and prompt_ids that are not the sample's prompt.

    Pipelines call this for every sample before a run folder is written.
    """
    for name, ids in (("response_ids", sample.response), ("prompt_ids", sample.prompt_ids)):
        if not isinstance(ids, list):
            continue
        bad = next((k for k, t in enumerate(ids) if not 0 <= t < geometry.vocab_size), None)
        if bad is not None:
            raise VlmCreditError(
                f"{where(sample)}: {name}[{bad}] = {ids[bad]} is outside the vocabulary "
                f"(0..{geometry.vocab_size - 1}); the ids must come from this checkpoint's "
                "tokenizer"
            )
    if sample.prompt_ids is not None:
        encode_prompt(processor, geometry, sample)


def _image_features(processor: Any, sample: Sample) -> dict[str, Any]:
    if not sample.images:
        return {}
    enc = processor.image_processor(images=sample.images, return_tensors="pt")
    return {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}


def _check_image_tokens(geometry: ModelGeometry, sample: Sample, ids: list[int], grid: Any) -> None:
    # The processor expands each image into t*h*w / merge^2 tokens; given ids must agree, or
    # features and token positions would pair up wrongly.
    expected = 0 if grid is None else int(grid.prod(dim=-1).sum()) // geometry.merge_size**2
    found = sum(1 for t in ids if t == geometry.image_token_id)
    if found != expected:
        raise VlmCreditError(
            f"{where(sample)}: prompt_ids hold {found} image tokens but its "
            f"{len(sample.images)} images give {expected}; record prompt_ids with the same image "
            "processor settings as this checkpoint's"
        )


def _first_difference(given: list[int], templated: list[int]) -> str:
    k = next(
        (i for i, (a, b) in enumerate(zip(given, templated, strict=False)) if a != b),
        min(len(given), len(templated)),
    )
    at = f"token {k}: given {given[k] if k < len(given) else 'end'}, templated " + (
        f"{templated[k]}" if k < len(templated) else "end"
    )
    return (
        f"prompt_ids ({len(given)} tokens) differ from the prompt the chat template gives "
        f"({len(templated)} tokens; first difference at {at}): the prompt analysed would not be "
        "the prompt trained on; check --prompt-key/--image-key, or drop the prompt column to use "
        "prompt_ids as given"
    )
