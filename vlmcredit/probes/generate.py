"""Greedy or sampled responses of a checkpoint to prompts with images (rollouts to analyse).

The demo and the experiments need responses the model itself produced, not text written for it:
anchors and weights are about the tokens a policy emits. Prompts are encoded exactly as every
probe encodes them (`encode_samples`: chat template, processor, left padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from vlmcredit.data.sample import Sample
from vlmcredit.models.families import adapter_of, model_device
from vlmcredit.models.inputs import encode_samples


def generate_responses(
    ck: Any,
    samples: Sequence[Sample],
    max_new_tokens: int = 48,
    temperature: float | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Response token ids (end token excluded) for each prompt; greedy unless `temperature`."""
    model, tokenizer = ck.model, ck.tokenizer
    adapter = adapter_of(model)
    stop = adapter.stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    batch = encode_samples(ck.processor, ck.geometry, [replace(s, response="") for s in samples])
    device = model_device(model)
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None}
    if temperature is not None:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0}
    with torch.no_grad(), adapter.fresh_rope_cache(model):
        sequences = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=stop,
            **sampling,
        )
    out = []
    for row in sequences[:, inputs["input_ids"].shape[1] :].tolist():
        kept: list[int] = []
        for token in row:
            if token in stop:
                break
            kept.append(token)
        out.append(kept)
    return out
