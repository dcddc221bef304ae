"""Head ablation hooks against the weight edit they stand for, on real tiny checkpoints."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from tests.helpers import noise_image
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.inputs import encode_samples
from vlmcredit.probes.ablation import ablate_heads, head_means, o_proj_modules


def _batch(ck, n: int = 3):
    """A left-padded batch of n questions (different image sizes -> different lengths)."""
    samples = [
        Sample([noise_image(56 + 28 * k, 84, seed=k)], "Is there a red circle? " * (k + 1))
        for k in range(n)
    ]
    return encode_samples(ck.processor, ck.geometry, samples).inputs


def _logits(ck, inputs) -> torch.Tensor:
    ck.model.model.rope_deltas = None
    with torch.no_grad():
        return ck.model(**inputs).logits


@contextmanager
def _zeroed_columns(ck, layers: list[int], head: int, bias: torch.Tensor | None = None):
    """The reference: o_proj weight columns of `head` set to zero (optionally + a bias)."""
    d = ck.geometry.head_dim
    modules = o_proj_modules(ck)
    saved = [(modules[i].weight.detach().clone(), modules[i].bias) for i in layers]
    try:
        with torch.no_grad():
            for k, i in enumerate(layers):
                modules[i].weight[:, head * d : (head + 1) * d] = 0
                if bias is not None:
                    modules[i].bias = torch.nn.Parameter(bias[k].clone())
        yield
    finally:
        with torch.no_grad():
            for (weight, old_bias), i in zip(saved, layers, strict=True):
                modules[i].weight.copy_(weight)
                modules[i].bias = old_bias


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl-moe"])
def test_hook_equals_zeroed_weight_columns_and_is_removed(loaded, family) -> None:
    ck = loaded(family)
    inputs = _batch(ck)
    clean = _logits(ck, inputs)
    layers = list(range(ck.geometry.num_layers))
    for head in range(ck.geometry.num_heads):
        with ablate_heads(ck, [(None, head)]) as plan:
            hooked = _logits(ck, inputs)
        assert plan == {layer: [head] for layer in layers}
        with _zeroed_columns(ck, layers, head):
            edited = _logits(ck, inputs)
        assert torch.equal(hooked, edited), head
        assert not torch.equal(hooked, clean)
    # one (layer, head) pair = that layer's columns only
    with ablate_heads(ck.model, [(1, 2)]):  # a bare model works too
        hooked = _logits(ck, inputs)
    with _zeroed_columns(ck, [1], 2):
        assert torch.equal(hooked, _logits(ck, inputs))
    assert torch.equal(_logits(ck, inputs), clean)  # hooks gone: logits restored exactly
    assert all(not m._forward_pre_hooks for m in o_proj_modules(ck).values())


def test_hooks_act_inside_generate_and_go_away_on_error(loaded) -> None:
    ck = loaded("qwen2-vl")
    inputs = _batch(ck, 2)
    kwargs = dict(max_new_tokens=6, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=ck.tokenizer.pad_token_id)  # fmt: skip

    def generate():
        ck.model.model.rope_deltas = None
        with torch.no_grad():
            return ck.model.generate(**inputs, **kwargs)

    layers = list(range(ck.geometry.num_layers))
    with ablate_heads(ck, [(None, 0), (None, 3)]):
        hooked = generate()
    with _zeroed_columns(ck, layers, 0), _zeroed_columns(ck, layers, 3):
        assert torch.equal(hooked, generate())
    with pytest.raises(RuntimeError, match="boom"), ablate_heads(ck, [(None, 1)]):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in o_proj_modules(ck).values())


def test_mean_ablation_writes_the_means(loaded) -> None:
    ck = loaded("qwen3-vl")
    geo = ck.geometry
    d = geo.head_dim
    inputs = _batch(ck)
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(geo.num_layers, geo.num_heads, d, generator=gen)
    seen: dict[int, torch.Tensor] = {}
    modules = o_proj_modules(ck)
    handles = [
        m.register_forward_hook(lambda _m, args, _o, i=i: seen.__setitem__(i, args[0].clone()))
        for i, m in modules.items()
    ]
    try:
        with ablate_heads(ck, [(None, 2)], mode="mean", means=means):
            hooked = _logits(ck, inputs)
    finally:
        for h in handles:
            h.remove()
    for layer, x in seen.items():  # what o_proj received: the mean in head 2's slice everywhere
        assert torch.equal(x[..., 2 * d : 3 * d], means[layer, 2].expand_as(x[..., :d]))
    # Reference: W x with x_h = mean  ==  (W with columns h zeroed) x + W_h mean
    layers = list(range(geo.num_layers))
    bias = torch.stack([modules[i].weight[:, 2 * d : 3 * d] @ means[i, 2] for i in layers])
    with _zeroed_columns(ck, layers, 2, bias=bias.detach()):
        reference = _logits(ck, inputs)
    assert torch.allclose(hooked, reference, atol=1e-5)
    assert not torch.allclose(hooked, _logits(ck, inputs), atol=1e-3)


def test_head_means_brute_force(loaded) -> None:
    """Mean over non-padding tokens of a padded batch = mean over unpadded single forwards."""
    ck = loaded("qwen2.5-vl")
    geo = ck.geometry
    inputs = _batch(ck, 3)
    batched = head_means(ck, [inputs])
    singles = []
    for b in range(3):
        keep = inputs["attention_mask"][b].bool()
        one = {
            "input_ids": inputs["input_ids"][b : b + 1, keep],
            "attention_mask": inputs["attention_mask"][b : b + 1, keep],
            "mm_token_type_ids": inputs["mm_token_type_ids"][b : b + 1, keep],
            "pixel_values": inputs["pixel_values"][
                sum(int(g.prod()) for g in inputs["image_grid_thw"][:b]) : sum(
                    int(g.prod()) for g in inputs["image_grid_thw"][: b + 1]
                )
            ],
            "image_grid_thw": inputs["image_grid_thw"][b : b + 1],
        }
        singles.append(one)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(geo.num_layers)}
    modules = o_proj_modules(ck)
    handles = [
        m.register_forward_pre_hook(lambda _m, args, i=i: captured[i].append(args[0][0]))
        for i, m in modules.items()
    ]
    try:
        for one in singles:
            _logits(ck, one)
    finally:
        for h in handles:
            h.remove()
    brute = torch.stack([torch.cat(captured[i]).mean(0) for i in range(geo.num_layers)])
    brute = brute.reshape(geo.num_layers, geo.num_heads, geo.head_dim)
    assert batched.shape == (geo.num_layers, geo.num_heads, geo.head_dim)
    assert torch.allclose(batched, brute, atol=1e-5)
    # the same questions fed one per batch (no padding): same means
    assert torch.allclose(head_means(ck, singles), batched, atol=1e-5)


def test_bad_specs(loaded) -> None:
    ck = loaded("qwen2.5-vl")
    for heads, mode, means, fragment in [
        ([(None, 4)], "zero", None, "head 4: out of range; the model has 4 query heads"),
        ([(3, 0)], "zero", None, "layer 3: out of range"),
        ([(None, 0)], "random", None, "--ablation random"),
        ([(None, 0)], "mean", None, "mean ablation needs means of shape"),
        ([(None, 0)], "mean", torch.zeros(3, 4, 8), r"shape \(3, 4, 16\)"),
    ]:
        with pytest.raises(VlmCreditError, match=fragment), ablate_heads(ck, heads, mode, means):
            pass
    assert all(not m._forward_pre_hooks for m in o_proj_modules(ck).values())
