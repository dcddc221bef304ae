"""vlmcredit.online: weights for a batch laid out as TRL/VERL hold it, against the offline path."""

from __future__ import annotations

import re

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
from vlmcredit.models.layout import prompt_mm_token_type_ids
from vlmcredit.probes.capture import CaptureSpec
from vlmcredit.probes.response_attention import capture_batch_attention, capture_samples

FAMILY = "qwen2.5-vl"


def trainer_batch(
    ck, samples: list[Sample], type_ids_padding: str | None = None
) -> dict[str, torch.Tensor]:
    """Prompt block left padded + response block right padded, as a GRPO trainer holds it.

    `type_ids_padding` adds `mm_token_type_ids` the way TRL builds them: from one processor
    call over the batch that pads on that side, extended with zeros over the responses, while
    the prompt ids themselves are left padded. With "right" they are shifted on shorter rows.
    """
    tok = ck.tokenizer
    pad = tok.pad_token_id
    prompts, pixels, grids, responses = [], [], [], []
    for s in samples:
        enc = encode_samples(ck.processor, ck.geometry, [Sample(s.images, s.prompt, [], s.id)])
        prompts.append(enc.inputs["input_ids"][0])
        if s.images:
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
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat(grids)
    if type_ids_padding is not None:
        # The chat text of each prompt, one placeholder per image (the processor expands it).
        texts = [re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tok.decode(x)) for x in prompts]
        enc = ck.processor(
            images=[s.images for s in samples],
            text=texts,
            padding=True,
            padding_side=type_ids_padding,
            return_tensors="pt",
            add_special_tokens=False,
        )
        assert enc["input_ids"].shape[1] == p
        batch["mm_token_type_ids"] = torch.cat(
            [enc["mm_token_type_ids"], torch.zeros((b, t), dtype=torch.long)], dim=1
        )
    return batch


def eager_attention(model, batch: dict[str, torch.Tensor], b: int, geo) -> torch.Tensor:
    """The reference: row b alone (no padding), global eager attention with output_attentions;
    (L, 1, T, N) response x image attention, mean over heads."""
    keep = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][keep][None]
    n_resp = int(batch["response_mask"][b].sum())
    image_rows = [int((batch["input_ids"][i] == geo.image_token_id).any()) for i in range(b)]
    grid = batch["image_grid_thw"][sum(image_rows) : sum(image_rows) + 1]
    start = int(batch["image_grid_thw"][: sum(image_rows)].prod(-1).sum())
    pixel_values = batch["pixel_values"][start : start + int(grid.prod())]
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == geo.image_token_id).long(),
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
    }
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": previous, "vision_config": "sdpa"})
    image = torch.nonzero(ids[0] == geo.image_token_id).flatten()
    s = ids.shape[1]
    rows = torch.arange(s - n_resp, s)
    block = torch.stack([a[0][:, rows][:, :, image] for a in out.attentions])  # (L, H, T, N)
    return block.mean(1, keepdim=True)


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


def test_unknown_method_is_refused(loaded, samples) -> None:
    ck = loaded(FAMILY)
    with pytest.raises(VlmCreditError, match="unknown; choose one of anchors"):
        online.weights(ck.model, trainer_batch(ck, samples), method="nope")


@pytest.fixture(scope="module")
def uneven_samples() -> list[Sample]:
    """Prompts of different lengths (text and image size), so the prompt block is padded."""
    return [
        Sample([noise_image(56, 56, 7)], "Hi?", "Dots and more dots here.", "short"),
        Sample(
            [noise_image(112, 140, 8)],
            "Which colours dominate this fairly large and noisy picture, and where?",
            "Mostly red.",
            "long",
        ),
        Sample([noise_image(84, 84, 9)], "Describe the image briefly.", "Noise " * 5, "mid"),
    ]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_online_attention_equals_eager_with_left_and_right_padded_type_ids(
    loaded, uneven_samples, padding: str
) -> None:
    """TRL passes mm_token_type_ids from a processor call that pads on the processor's side;
    with right padding they are shifted on the shorter rows. The online path rebuilds them from
    input_ids, so both equal eager attention of each row alone, and the weights equal the
    offline path's."""
    ck = loaded(FAMILY)
    geo = ck.geometry
    batch = trainer_batch(ck, uneven_samples, type_ids_padding=padding)
    rebuilt = (batch["input_ids"] == geo.image_token_id).long()
    shifted = not torch.equal(batch["mm_token_type_ids"], rebuilt)
    assert shifted == (padding == "right")  # the case the rebuild exists for
    online_attention = capture_batch_attention(ck.model, batch)
    for b, got in enumerate(online_attention):
        want = eager_attention(ck.model, batch, b, geo)
        assert got is not None and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    weights = online.weights(ck.model, batch, method="anchors")
    offline = capture_samples(ck, uneven_samples, CaptureSpec(reduce="mean"))
    for b, item in enumerate(offline):
        reference = label_anchors(
            aggregate_attention(item.capture.attention.numpy()), AnchorConfig()
        )
        assert np.array_equal(weights[b, : len(item.response_ids)].numpy(), reference.weight)


def test_text_only_rows_keep_weight_one_and_are_counted(loaded, samples, caplog) -> None:
    """A mixed batch (a text-only prompt beside image prompts) trains: the text-only row gets
    weight 1 everywhere and is counted; the image rows get what they get alone."""
    ck = loaded(FAMILY)
    text_only = Sample([], "Tell me a short story.", "Once upon a time there was noise.", "t")
    mixed = [samples[0], text_only, samples[1]]
    batch = trainer_batch(ck, mixed)
    result = online.compute(ck.model, batch, method="anchors")
    assert result.text_only_rows == [1]
    assert torch.all(result.weights[1] == 1.0)
    alone = online.weights(ck.model, trainer_batch(ck, samples), method="anchors")
    for row, ref in ((0, 0), (2, 1)):
        n = int(batch["response_mask"][row].sum())
        assert torch.equal(result.weights[row, :n], alone[ref, :n])
        assert (result.weights[row, :n] == 0).any()  # anchors, not a default
    with caplog.at_level("INFO", logger="vlmcredit.online"):
        online.weights(ck.model, batch, method="anchors")
    assert "1 of 3 batch rows have no image tokens" in caplog.text
    # A batch with no image at all: every row keeps weight 1, no forward needed.
    only_text = trainer_batch(ck, [text_only])
    result = online.compute(ck.model, only_text, method="anchors")
    assert result.text_only_rows == [0] and torch.all(result.weights == 1.0)


@pytest.mark.parametrize("method", ["anchors", "entropy"])
def test_special_vision_ids_sampled_in_a_response_are_text(loaded, method) -> None:
    """A small policy can sample vision special ids (video pad, vision start); the trainer's
    forward reads them as text, and so must the online passes (M-RoPE would otherwise look for
    a video grid that does not exist). (A sampled *image* pad id breaks the model's own
    feature/token count check, in the trainer's forward as much as here.)"""
    ck = loaded("qwen2.5-vl")
    samples = [
        Sample([noise_image(56, 84, 1)], "Describe.", "Dots and static.", "a"),
        Sample([noise_image(84, 56, 2)], "Describe.", "Noise.", "b"),
    ]
    batch = trainer_batch(ck, samples)
    clean = online.weights(ck.model, batch, method=method)
    odd = {k: v.clone() for k, v in batch.items()}
    start = odd["input_ids"].shape[1] - odd["response_mask"].shape[1]
    odd["input_ids"][0, start + 1] = ck.geometry.vision_start_token_id
    odd["input_ids"][1, start] = ck.geometry.video_token_id
    weights = online.weights(ck.model, odd, method=method)
    assert weights.shape == clean.shape and torch.isfinite(weights).all()
    # causal: the response rows before the odd token attend exactly as before
    before = capture_batch_attention(ck.model, batch)
    after = capture_batch_attention(ck.model, odd)
    torch.testing.assert_close(after[0][:, :, :1], before[0][:, :, :1], rtol=0, atol=1e-6)
    assert after[1].shape == before[1].shape  # same image columns: the odd id is text


@pytest.mark.parametrize("chunk", [3, 2])
def test_piggyback_capture_in_someone_elses_forwards(loaded, samples, chunk) -> None:
    """`weights_fn(...).piggyback` captures inside forwards the caller runs (a trainer's own
    log-prob forward, here in chunks of rows, text-only row included): the same weights as the
    extra-forward path, the text-only row at weight 1, and the model back as it was."""
    ck = loaded(FAMILY)
    text_only = Sample([], "Tell me a short story.", "Once upon a time there was noise.", "t")
    batch = trainer_batch(ck, [samples[0], text_only, samples[1]])
    fn = online.weights_fn("anchors")
    reference = fn(ck.model, batch)
    width = batch["response_mask"].shape[1]
    grids = batch["image_grid_thw"]
    image_rows = [0, 2]  # the rows holding an image, in order
    implementation = ck.model.config.text_config._attn_implementation
    types = prompt_mm_token_type_ids(
        batch["input_ids"], ck.geometry, batch["input_ids"].shape[1] - width
    )
    with torch.no_grad(), fn.piggyback(ck.model, width) as capture:
        for lo in range(0, 3, chunk):
            hi = min(3, lo + chunk)
            imgs = [i for i, r in enumerate(image_rows) if lo <= r < hi]
            cells = [int(grids[i].prod()) for i in range(len(image_rows))]
            start = sum(cells[: imgs[0]]) if imgs else 0
            inputs = {
                "input_ids": batch["input_ids"][lo:hi],
                "attention_mask": batch["attention_mask"][lo:hi],
                "mm_token_type_ids": types[lo:hi],
            }
            if imgs:
                inputs["pixel_values"] = batch["pixel_values"][
                    start : start + sum(cells[i] for i in imgs)
                ]
                inputs["image_grid_thw"] = grids[imgs]
            ck.model(**inputs)
    assert capture.forwards == len(range(0, 3, chunk))
    assert capture.rows[1] is None
    weights = fn.from_capture(ck.model, batch, capture)
    assert torch.equal(weights, reference)
    assert torch.all(weights[1] == 1.0) and fn.last.text_only_rows == [1]
    assert ck.model.config.text_config._attn_implementation == implementation
    assert not ck.model._forward_pre_hooks and not ck.model._forward_hooks
    # A capture that missed rows (the forward covered only part of the batch) is refused.
    with torch.no_grad(), fn.piggyback(ck.model, width) as partial:
        ck.model(input_ids=batch["input_ids"][1:2], attention_mask=batch["attention_mask"][1:2])
    with pytest.raises(VlmCreditError, match="1 rows captured in 1 forward"):
        fn.from_capture(ck.model, batch, partial)
    # A forward without (or with shifted) type ids would place the image wrongly: refused.
    no_types = pytest.raises(VlmCreditError, match="gets no mm_token_type_ids")
    with no_types, torch.no_grad(), fn.piggyback(ck.model, width):
        ck.model(
            **{
                k: batch[k]
                for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
            }
        )
    assert ck.model.config.text_config._attn_implementation == implementation
    assert not ck.model._forward_pre_hooks and not ck.model._forward_hooks


def test_attention_and_real_image_scores_share_one_forward(loaded, samples) -> None:
    """Online, a method set needing the attention and the real-image log-probs (SAYO) runs one
    forward for both: bit for bit the attention, log p and entropy of two separate forwards."""
    from torch.nn.modules.module import register_module_forward_hook

    from vlmcredit.methods.registry import Needs

    ck = loaded(FAMILY)
    batch = trainer_batch(ck, samples)
    needs = Needs(attention=True, logprobs=("image",))
    options = {"logprobs": {"scores": [(1.0, 1.0), (1.0, 0.95)]}}
    base = type(ck.model.model).__name__
    calls: list[str] = []

    def hook(module, args, output):
        if type(module).__name__ == base:
            calls.append("forward")

    handle = register_module_forward_hook(hook)
    try:
        shared = online.batch_passes(ck.model, batch, needs, None, None, None, options)
        n_shared = len(calls)
        attention = capture_batch_attention(ck.model, batch)
        separate = online.batch_passes(ck.model, batch, needs, None, None, None, options, attention)
        n_separate = len(calls) - n_shared
    finally:
        handle.remove()
    assert n_shared == 1 and n_separate == 2
    for a, b in zip(shared, separate, strict=True):
        np.testing.assert_array_equal(a.attention, b.attention)
        assert a.logprobs.keys() == b.logprobs.keys() and a.logprobs
        for key in a.logprobs:
            np.testing.assert_array_equal(a.logprobs[key], b.logprobs[key])
        assert a.entropy.keys() == b.entropy.keys() and a.entropy
        for key in a.entropy:
            np.testing.assert_array_equal(a.entropy[key], b.entropy[key])
