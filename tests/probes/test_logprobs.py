"""Teacher-forced log p / entropy passes on tiny checkpoints, against direct computations from
the model's full logits, and the no-image and perturbed inputs they score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import noise_image
from vlmcredit.data.sample import Sample
from vlmcredit.models.families import adapter_of
from vlmcredit.models.inputs import encode_samples
from vlmcredit.probes import logprobs as L

PERTURB = {"probability": 0.5, "patch_px": 14, "cells": False, "seed": 0}


def _samples() -> list[Sample]:
    # sizes that are multiples of 28 and 32: the processor does not resize them
    return [
        Sample([noise_image(224, 224, 3)], "What is it?", "Noise, lots of it.", "a"),
        Sample([noise_image(96, 160, 4)], "Describe.", "Dots.", "b"),
    ]


def _full_logits(ck, batch) -> torch.Tensor:
    inputs = adapter_of(ck.model).with_positions(ck.model, batch.inputs)
    with torch.no_grad():
        return ck.model(**inputs).logits.double()


def _reference(logits_row: torch.Tensor, ids: torch.Tensor, temperature: float, top_p: float):
    """log p and entropy straight from one row of full logits (float64, explicit nucleus)."""
    lp = torch.log_softmax(logits_row / temperature, -1)
    taken = lp.gather(-1, ids[:, None])[:, 0].numpy()
    ents = []
    for row in lp.exp().numpy():
        order = np.sort(row)[::-1]
        keep = order[: int(np.searchsorted(np.cumsum(order), top_p - 1e-12) + 1)]
        q = keep / keep.sum()
        ents.append(float(-(q[q > 0] * np.log(q[q > 0])).sum()))
    return taken, np.asarray(ents)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_logp_and_entropy_equal_the_full_logits(loaded, family) -> None:
    ck = loaded(family)
    samples = _samples()
    scores = [(1.0, 1.0), (0.7, 0.9)]
    got = L.score_samples(ck, samples, ["image"], scores)["image"]
    batch = encode_samples(ck.processor, ck.geometry, samples)
    logits = _full_logits(ck, batch)
    for b, layout in enumerate(batch.layouts):
        s, e = layout.response_span
        ids = batch.inputs["input_ids"][b, s:e]
        for temperature, top_p in scores:
            ref_lp, ref_ent = _reference(logits[b, s - 1 : e - 1], ids, temperature, top_p)
            lp, ent = got[b][(temperature, top_p)]
            assert lp.dtype == np.float32 and lp.shape == (e - s,)
            np.testing.assert_allclose(lp, ref_lp, atol=2e-5)
            np.testing.assert_allclose(ent, ref_ent, atol=2e-5)


def test_top_p_entropy_on_a_hand_built_distribution() -> None:
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)
    lp = p.log()
    full = -(p * lp).sum().item()
    assert L.entropy_from_logprobs(lp, 1.0).item() == pytest.approx(full)
    # 0.8: 0.5 then 0.3 reach the mass; 0.15 comes after 0.8 is reached
    two = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    assert L.entropy_from_logprobs(lp, 0.8).item() == pytest.approx(two)
    q = np.array([0.5, 0.3, 0.15]) / 0.95
    assert L.entropy_from_logprobs(lp, 0.81).item() == pytest.approx(-(q * np.log(q)).sum())
    assert L.entropy_from_logprobs(lp, 0.4).item() == pytest.approx(0.0)  # only the top token


def test_bf16_scores_match_the_fp32_reference(tiny_ckpt, loaded) -> None:
    from vlmcredit.models.loading import load_checkpoint

    ref = loaded("qwen2.5-vl")
    bf16 = load_checkpoint(tiny_ckpt("qwen2.5-vl"), dtype="bf16")
    samples = _samples()
    scores = [(1.0, 1.0), (1.0, 0.95)]
    want = L.score_samples(ref, samples, ["image"], scores)["image"]
    got = L.score_samples(bf16, samples, ["image"], scores)["image"]
    for w, g in zip(want, got, strict=True):
        for s in scores:
            assert g[s][0].dtype == np.float32
            # bf16 weights and activations move the logits; the fp32 softmax adds no error
            np.testing.assert_allclose(g[s][0], w[s][0], atol=0.05)
            np.testing.assert_allclose(g[s][1], w[s][1], atol=0.05)


def test_no_image_pass_has_no_image_tokens_and_no_pixels(loaded) -> None:
    ck = loaded("qwen2.5-vl")
    geo = ck.geometry
    samples = _samples()
    batch = encode_samples(ck.processor, geo, samples)
    bare = [
        L.without_image(s, geo, ids) for s, ids in zip(samples, batch.response_ids, strict=True)
    ]
    enc = encode_samples(ck.processor, geo, bare)
    assert "pixel_values" not in enc.inputs and "image_grid_thw" not in enc.inputs
    for token in (geo.image_token_id, geo.vision_start_token_id, geo.vision_end_token_id):
        assert not (enc.inputs["input_ids"] == token).any()
    assert enc.response_ids == batch.response_ids
    # the no-image scores are those of the same prompt written without an image
    got = L.score_samples(ck, samples, ["no_image"], [(1.0, 1.0)])["no_image"]
    for s, ids, row in zip(samples, batch.response_ids, got, strict=True):
        text_only = Sample([], s.prompt, ids, s.id)
        (ref,) = L.score_samples(ck, [text_only], ["image"], [(1.0, 1.0)])["image"]
        np.testing.assert_allclose(row[(1.0, 1.0)][0], ref[(1.0, 1.0)][0], atol=1e-5)
    # message lists lose their image parts; recorded prompt ids their vision spans
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    out = L.without_image(Sample([noise_image(56, 56, 1)], msgs, "x", "m"), geo, [1, 2])
    assert out.prompt == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    ids = [5, geo.vision_start_token_id, geo.image_token_id, geo.vision_end_token_id, 6]
    assert L.strip_vision_spans(ids, geo) == [5, 6]


def test_perturbation_is_seeded_and_changes_only_the_chosen_patches(loaded) -> None:
    ck = loaded("qwen2.5-vl")
    geo = ck.geometry
    image = noise_image(224, 224, 3)
    sample = Sample([image], "What is it?", "Noise.", "a")
    batch = encode_samples(ck.processor, geo, [sample])
    pert = L.Perturbation(**PERTURB)
    one = L.perturbed_batch(ck, batch, [sample], pert).inputs["pixel_values"]
    two = L.perturbed_batch(ck, batch, [sample], pert).inputs["pixel_values"]
    other = L.perturbed_batch(ck, batch, [sample], L.Perturbation(**{**PERTURB, "seed": 1}))
    assert torch.equal(one, two)
    assert not torch.equal(one, other.inputs["pixel_values"])
    # reference: black out the same pixels in the image itself, then run the processor
    (mask,) = L.blackout_masks(batch.inputs["image_grid_thw"], geo, pert, ["a/0"])
    assert mask.shape == (224, 224) and 0.3 < mask.mean() < 0.7
    assert np.all(mask.reshape(16, 14, 16, 14).std(axis=(1, 3)) == 0)  # whole 14 px patches
    pixels = np.asarray(image).copy()
    pixels[mask] = 0
    from PIL import Image

    ref = encode_samples(
        ck.processor, geo, [Sample([Image.fromarray(pixels)], "What is it?", "Noise.")]
    )
    torch.testing.assert_close(one, ref.inputs["pixel_values"], atol=1e-5, rtol=0)
    original = batch.inputs["pixel_values"]
    changed = (one != original).any(dim=1)
    assert changed.any() and not changed.all()
    # cell-aligned patches: whole merged cells (28 px) are black or untouched
    cells = L.Perturbation(**{**PERTURB, "cells": True})
    (cell_mask,) = L.blackout_masks(batch.inputs["image_grid_thw"], geo, cells, ["a/0"])
    assert np.all(cell_mask.reshape(8, 28, 8, 28).std(axis=(1, 3)) == 0)


def test_trainer_batch_scores_equal_the_rollout_scores(loaded) -> None:
    from tests.test_online import trainer_batch
    from vlmcredit.probes.response_attention import response_rows

    ck = loaded("qwen2.5-vl")
    samples = _samples()
    scores = [(1.0, 1.0)]
    offline = L.score_samples(ck, samples, ["image", "no_image"], scores)
    batch = trainer_batch(ck, samples)
    lengths = response_rows(batch["response_mask"])
    online = L.score_trainer_batch(ck.model, batch, lengths, ["image", "no_image"], scores)
    for variant in ("image", "no_image"):
        for got, want in zip(online[variant], offline[variant], strict=True):
            np.testing.assert_allclose(got[(1.0, 1.0)][0], want[(1.0, 1.0)][0], atol=1e-4)
            np.testing.assert_allclose(got[(1.0, 1.0)][1], want[(1.0, 1.0)][1], atol=1e-4)


def _sorted_nucleus_entropy(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition by a full sort (the implementation before the histogram search)."""
    probs = logprobs.exp()
    if top_p >= 1.0:
        return -(probs * logprobs).nan_to_num_(0.0).sum(-1)
    s = probs.sort(dim=-1, descending=True).values
    before = s.cumsum(-1) - s  # mass of the strictly more probable tokens
    kept = torch.where(before < top_p, s, 0.0)
    q = kept / kept.sum(-1, keepdim=True)
    return -(q * q.log()).nan_to_num_(0.0).sum(-1)


def _rows(vocab: int, seed: int) -> torch.Tensor:
    """float64 log-probability rows: flat, peaked, gaussian logits, heavy ties, uniform, one-hot,
    and rows with masked (-inf) tokens."""
    rng = np.random.default_rng(seed)
    logits = [
        np.log(rng.random(vocab) + 1.0),  # flat: the nucleus holds most of the vocabulary
        rng.normal(0, 4, vocab),  # peaked
        rng.normal(0, 0.5, vocab),  # a random model's row
        rng.normal(0, 3, vocab),
        rng.integers(0, 6, vocab).astype(np.float64),  # six values: ties at every cut
        np.zeros(vocab),  # uniform: one bin holds every token
        np.where(np.arange(vocab) == 7, 0.0, -np.inf),  # one-hot
        np.where(rng.random(vocab) < 0.5, -np.inf, rng.normal(0, 1, vocab)),  # masked tokens
    ]
    return torch.log_softmax(torch.from_numpy(np.stack(logits)), -1)


@pytest.mark.parametrize("vocab", [50, 4096, 65536])
def test_nucleus_entropy_equals_the_sort_on_random_rows(monkeypatch, vocab) -> None:
    # three rows per block: blocks split the rows, and the last block is short
    monkeypatch.setattr(L, "BLOCK", 3 * vocab)
    lp = _rows(vocab, vocab)
    rng = np.random.default_rng(1)
    for top_p in [0.05, 0.3, 0.5, 0.9, 0.95, 0.999, float(rng.random()), 1.0]:
        want = _sorted_nucleus_entropy(lp, top_p)
        got = L.entropy_from_logprobs(lp, top_p)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
        # float32: as close to the float64 value as the float32 sort is, within an ulp or two;
        # not the uniform row, whose mass reaches 0.3 / 0.5 / 0.9 exactly at a token boundary
        # in real numbers, so rounding decides one token either way (in the sort too)
        rows = [0, 1, 2, 3, 4, 6, 7]
        got32 = L.entropy_from_logprobs(lp.float(), top_p).double()[rows]
        err32 = (_sorted_nucleus_entropy(lp.float(), top_p).double() - want).abs()[rows]
        assert ((got32 - want[rows]).abs() <= err32 + 4e-6).all()
    assert L.entropy_from_logprobs(lp, 0.9)[6].item() == 0.0  # one-hot
    # a NaN row (NaN logits) gives NaN, loud, where the sort's nan_to_num printed a number;
    # the other rows are untouched
    broken = lp.clone()
    broken[2, 5] = float("nan")
    got = L.entropy_from_logprobs(broken, 0.95)
    assert torch.isnan(got[2]) and torch.isnan(L.entropy_from_logprobs(broken, 1.0)[2])
    torch.testing.assert_close(got[3:], L.entropy_from_logprobs(lp, 0.95)[3:])


def test_nucleus_boundaries_and_ties_follow_the_sort_exactly() -> None:
    # dyadic probabilities whose log round-trips exactly: every partial sum is exact, so top_p
    # can sit exactly on a token boundary
    p = [1 / 4, 1 / 32, 1 / 4, 1 / 16, 1 / 32, 1 / 4, 1 / 16, 1 / 32, 1 / 32]
    padded = p + [0.0] * 40  # zero-probability tokens (log p = -inf) share the last bin
    for dtype in (torch.float64, torch.float32):
        lp = torch.tensor([p, p[::-1]], dtype=dtype).log()
        assert torch.equal(lp.exp(), torch.tensor([p, p[::-1]], dtype=dtype))
        wide = torch.tensor([padded], dtype=dtype).log()
        # sorted: 1/4 x3, 1/16 x2, 1/32 x4; cumulative .25 .5 .75 .8125 .875 .90625 .9375 ...
        cases = {
            0.25: 1,  # the first 1/4 reaches 0.25: one of the three tied
            0.5: 2,  # two of the tied 1/4s
            0.5 + 2**-20: 3,
            0.75: 3,  # the three 1/4s reach 0.75 exactly: no 1/16
            0.8: 4,
            0.8125: 4,
            0.85: 5,
            0.875: 5,
            0.9: 6,  # one of the four tied 1/32s
            0.9375: 7,
            0.95: 8,
            0.96875: 8,
            0.99: 9,
        }
        for top_p, n in cases.items():
            kept = np.sort(p)[::-1][:n]
            q = kept / kept.sum()
            hand = float(-(q * np.log(q)).sum())
            for rows in (lp, wide):
                got = L.entropy_from_logprobs(rows, top_p)
                want = _sorted_nucleus_entropy(rows, top_p)
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
                np.testing.assert_allclose(got.double().numpy(), hand, atol=1e-6)


@pytest.mark.parametrize("top_p", [0.95, 1.0])
def test_scores_in_small_blocks_equal_whole_chunks(monkeypatch, loaded, top_p) -> None:
    # LM-head chunks of 3 positions, blocks of 2 rows: every split of a response is exercised
    ck = loaded("qwen2.5-vl")
    samples = _samples()
    scores = [(1.0, top_p), (0.7, top_p)]
    want = L.score_samples(ck, samples, ["image"], scores)["image"]
    vocab = ck.model.config.text_config.vocab_size
    monkeypatch.setattr(L, "CHUNK", 3)
    monkeypatch.setattr(L, "BLOCK", 2 * vocab)
    got = L.score_samples(ck, samples, ["image"], scores)["image"]
    for g, w in zip(got, want, strict=True):
        for s in scores:
            # a 3-row LM head rounds its float32 logits differently: an ulp or two of 5.6 nats
            np.testing.assert_allclose(g[s][0], w[s][0], atol=1e-5)
            np.testing.assert_allclose(g[s][1], w[s][1], atol=1e-5)
