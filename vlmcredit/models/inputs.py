"""Teacher-forced model inputs: prompt (with images) + response, left-padded into a batch.

The prompt goes through the processor (which expands each image placeholder into its image
tokens) with the chat template's generation prompt; the response is tokenized on its own and
appended, so its token ids are exactly what a trainer holds for a completion.
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
    for k, sample in enumerate(samples):
        text = prompt_text(processor, sample)
        n_placeholders = text.count(getattr(processor, "image_token", "<|image_pad|>"))
        if n_placeholders != len(sample.images):
            raise VlmCreditError(
                f"sample {sample.id or k}: prompt has {n_placeholders} image placeholders but "
                f"{len(sample.images)} images were given"
            )
        enc = processor(text=[text], images=sample.images or None, return_tensors="pt")
        prompt_ids = enc["input_ids"][0].tolist()
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
