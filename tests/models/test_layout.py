"""Token layout against the model's own 3-D rope index and the t*h*w/m^2 count formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import FAMILIES, noise_image
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.inputs import encode_samples
from vlmcredit.models.layout import build_layouts


def _rope_positions(ck, inputs):
    with torch.no_grad():
        pos, _ = ck.model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
    return pos.numpy()  # (3, B, S)


def _check_against_rope(ck, batch) -> int:
    """Every image cell equals the rope index's (t, h, w) offsets; returns images checked."""
    pos = _rope_positions(ck, batch.inputs)
    grids = batch.inputs["image_grid_thw"].tolist()
    checked = 0
    for layout in batch.layouts:
        for im in layout.images:
            t, h, w = grids[checked]
            assert im.num_tokens == t * h * w // ck.geometry.merge_size**2
            p = pos[:, layout.batch_index, im.positions]
            rel = p - p.min(axis=1, keepdims=True)
            np.testing.assert_array_equal(rel.T, im.cells)
            checked += 1
    return checked


@pytest.mark.parametrize("family", FAMILIES)
def test_single_image_forward_and_layout(loaded, family: str) -> None:
    ck = loaded(family)
    img = noise_image(100, 150, seed=1)
    batch = encode_samples(ck.processor, ck.geometry, [Sample([img], "Is there a cat?", "No.")])
    with torch.no_grad():
        logits = ck.model(**batch.inputs).logits
    assert logits.shape[:2] == batch.inputs["input_ids"].shape
    assert torch.isfinite(logits).all()
    (layout,) = batch.layouts
    assert _check_against_rope(ck, batch) == 1
    ids = batch.inputs["input_ids"][0]
    resp = ids[layout.response_span[0] : layout.response_span[1]].tolist()
    assert resp == ck.tokenizer("No.", add_special_tokens=False)["input_ids"]
    assert layout.prompt_span == (0, layout.response_span[0])
    # Image tokens are exactly where input_ids hold the config's image token.
    expected = np.nonzero(ids.numpy() == ck.config.image_token_id)[0]
    np.testing.assert_array_equal(layout.image_positions, expected)
    # Pixel boxes tile the original image.
    im = layout.images[0]
    assert im.original_size == (100, 150)
    assert im.boxes[:, 0].min() == 0 and im.boxes[:, 1].min() == 0
    assert im.boxes[:, 2].max() == pytest.approx(150)
    assert im.boxes[:, 3].max() == pytest.approx(100)
    area = ((im.boxes[:, 2] - im.boxes[:, 0]) * (im.boxes[:, 3] - im.boxes[:, 1])).sum()
    assert area == pytest.approx(100 * 150)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_and_left_padded_batch(loaded, family: str) -> None:
    ck = loaded(family)
    wide, tall = noise_image(90, 200, seed=2), noise_image(210, 80, seed=3)
    samples = [
        Sample([wide, tall], "Compare the two images.", "The first one is wider than the second."),
        Sample([tall], "Describe it.", "Tall."),
    ]
    batch = encode_samples(ck.processor, ck.geometry, samples)
    with torch.no_grad():
        logits = ck.model(**batch.inputs).logits
    assert torch.isfinite(logits).all()
    assert _check_against_rope(ck, batch) == 3
    first, second = batch.layouts
    assert [im.original_size for im in first.images] == [(90, 200), (210, 80)]
    assert first.images[0].num_tokens != first.images[1].num_tokens or (
        first.images[0].merged_grid != first.images[1].merged_grid
    )
    # Row 1 is shorter, so it is left-padded: its prompt starts after the pads.
    mask = batch.inputs["attention_mask"][1]
    assert second.prompt_span[0] == int((mask == 0).sum()) > 0
    assert first.response_span[1] == second.response_span[1] == batch.inputs["input_ids"].shape[1]
    assert np.array_equal(second.image_token_owner, np.zeros(second.images[0].num_tokens))


def test_padded_row_matches_unpadded_logits(loaded) -> None:
    """Left padding must not change the response logits (mask + positions are right)."""
    ck = loaded("qwen2.5-vl")
    short = Sample([noise_image(60, 60, seed=4)], "Hi?", "Yes.")
    long = Sample([noise_image(120, 200, seed=5)], "A much longer question here?", "No.")
    alone = encode_samples(ck.processor, ck.geometry, [short])
    both = encode_samples(ck.processor, ck.geometry, [long, short])
    with torch.no_grad():
        a = ck.model(**alone.inputs).logits[0, alone.layouts[0].response_positions]
        b = ck.model(**both.inputs).logits[1, both.layouts[1].response_positions]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_truncated_image_tokens_raise(loaded) -> None:
    ck = loaded("qwen2-vl")
    batch = encode_samples(
        ck.processor, ck.geometry, [Sample([noise_image(100, 100)], "What?", "Blue.")]
    )
    ids = batch.inputs["input_ids"]
    layout = batch.layouts[0]
    cut = int(layout.image_positions[5])  # truncate in the middle of the image tokens
    with pytest.raises(VlmCreditError, match="truncated"):
        build_layouts(ids[:, :cut], None, batch.inputs["image_grid_thw"], ck.geometry, [(cut, cut)])


def test_image_count_mismatch_with_placeholders(loaded) -> None:
    ck = loaded("qwen2-vl")
    messages = [{"role": "user", "content": [{"type": "text", "text": "No image part"}]}]
    with pytest.raises(VlmCreditError, match="image placeholders"):
        encode_samples(ck.processor, ck.geometry, [Sample([noise_image(50, 50)], messages, "x")])
