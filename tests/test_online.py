"""vlmcredit.online: weights for a batch laid out as TRL/VERL hold it, against the offline path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import noise_image
from vlmcredit import online
from vlmcredit.analysis.anchors import AnchorConfig, label_anchors
from vlmcredit.analysis.connectivity import aggregate_attention
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.inputs import encode_samples
from vlmcredit.probes.capture import CaptureSpec
from vlmcredit.probes.response_attention import capture_batch_attention, capture_samples

FAMILY = "qwen2.5-vl"


def trainer_batch(ck, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Prompt block left padded + response block right padded, as a GRPO trainer holds it."""
    tok = ck.tokenizer
    pad = tok.pad_token_id
    prompts, pixels, grids, responses = [], [], [], []
    for s in samples:
        enc = encode_samples(ck.processor, ck.geometry, [Sample(s.images, s.prompt, [], s.id)])
        prompts.append(enc.inputs["input_ids"][0])
        pixels.append(enc.inputs["pixel_values"])
        grids.append(enc.inputs["image_grid_thw"])
        responses.append(torch.tensor(tok(s.response, add_special_tokens=False)["input_ids"]))
    p, t = max(len(x) for x in prompts), max(len(x) for x in responses)
    b = len(samples)
    input_ids = torch.full((b, p + t), pad, dtype=torch.long)
    attention_mask = torch.zeros((b, p + t), dtype=torch.long)
    response_mask = torch.zeros((b, t), dtype=torch.long)
    for i, (prompt, resp) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, p - len(prompt) : p] = prompt
        input_ids[i, p : p + len(resp)] = resp
        attention_mask[i, p - len(prompt) : p + len(resp)] = 1
        response_mask[i, : len(resp)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.cat(grids),
    }


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return [
        Sample([noise_image(112, 140, 5)], "What is this?", "Random dots of many colours.", "a"),
        Sample([noise_image(84, 84, 6)], "Describe.", "Noise " * 9 + "everywhere.", "b"),
    ]


def test_online_anchor_weights_equal_the_offline_path(loaded, samples) -> None:
    ck = loaded(FAMILY)
    batch = trainer_batch(ck, samples)
    weights = online.weights(ck.model, batch, method="anchors")
    assert weights.shape == batch["response_mask"].shape
    for i, item in enumerate(capture_samples(ck, samples, CaptureSpec(reduce="mean"))):
        reference = label_anchors(
            aggregate_attention(item.capture.attention.numpy()), AnchorConfig()
        )
        n = len(item.response_ids)
        assert np.array_equal(weights[i, :n].numpy(), reference.weight)
        assert torch.all(weights[i, n:] == 1.0)  # padding: neutral, the trainer masks it
    # the trainer layout (response block right padded) sees the same attention as the
    # offline layout (whole sequences left padded)
    online_attention = capture_batch_attention(ck.model, batch)
    offline = capture_samples(ck, samples, CaptureSpec(reduce="mean"))
    for got, item in zip(online_attention, offline, strict=True):
        assert torch.allclose(got, item.capture.attention, atol=1e-5)


def test_unknown_method_and_text_only_rows_are_refused(loaded, samples) -> None:
    ck = loaded(FAMILY)
    batch = trainer_batch(ck, samples)
    with pytest.raises(VlmCreditError, match="unknown; choose one of anchors"):
        online.weights(ck.model, batch, method="nope")
    text_only = dict(batch)
    text_only["input_ids"] = batch["input_ids"].clone()
    text_only["input_ids"][0][text_only["input_ids"][0] == ck.geometry.image_token_id] = 0
    text_only.pop("pixel_values")
    text_only.pop("image_grid_thw")
    with pytest.raises(VlmCreditError, match="no image tokens"):
        online.weights(ck.model, text_only)
