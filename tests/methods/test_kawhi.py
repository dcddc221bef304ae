"""KAWHI method: alpha from the captured Q/K against an independent recomputation of the final
layer's projections, q/k norm, RoPE and GQA expansion; the key-key / pre-RoPE alignment states
(probes.qk_states) against the same recomputation on every family; response text spans;
rebuilt pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.charts import bar_chart
from vlmcredit.analysis.sguf import resize_for_grid
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods.kawhi import KAWHI, KawhiConfig
from vlmcredit.methods.registry import Needs
from vlmcredit.models.inputs import encode_samples
from vlmcredit.models.pixels import images_from_pixel_values
from vlmcredit.models.response_text import response_text_spans
from vlmcredit.pipelines.passes import run_passes
from vlmcredit.probes.capture import CaptureSpec
from vlmcredit.probes.qk_states import RowSpan, attention_module, layer_states, sample_states

RESPONSE = "The red bar is tallest.\n\nIt reaches 日本 😀 high.\n\n\nSo: red."


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _linear(x: torch.Tensor, proj: torch.nn.Linear) -> torch.Tensor:
    y = x @ proj.weight.double().T
    return y if proj.bias is None else y + proj.bias.double()


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight.double() * (x * scale)


def reference_qk(ck, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, T, D) post-RoPE queries of the response and (H, N, D) GQA-expanded keys of the image,
    recomputed from the final layer's attention input with our own projection, norm and
    rotation (the model's cos/sin, which carry the M-RoPE positions, are taken as given)."""
    model = ck.model
    attn = ck.decoder_layers()[-1].self_attn
    seen = {}

    def grab(_module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["rope"] = kwargs["position_embeddings"]

    batch = encode_samples(ck.processor, ck.geometry, [sample])
    inputs = ck.adapter.with_positions(model, batch.inputs)
    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return _project(attn, seen, batch.layouts[0], ck.geometry.head_dim)


@torch.no_grad()
def _project(attn, seen, layout, d) -> tuple[torch.Tensor, torch.Tensor]:
    h = seen["h"][0].double()
    cos, sin = (x[0].double() for x in seen["rope"])
    q = _linear(h, attn.q_proj).view(len(h), -1, d)
    k = _linear(h, attn.k_proj).view(len(h), -1, d)
    if hasattr(attn, "q_norm"):
        q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    groups = q.shape[1] // k.shape[1]
    q_resp = q[layout.response_span[0] : layout.response_span[1]].transpose(0, 1)
    k_img = k[torch.as_tensor(layout.image_positions)].transpose(0, 1)
    return q_resp, torch.repeat_interleave(k_img, groups, dim=0)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_alpha_equals_cosines_from_an_independent_recomputation(loaded, family) -> None:
    ck = loaded(family)
    sample = Sample([bar_chart(112, 84)], "Which bar is tallest?", RESPONSE, "s0")
    last = ck.geometry.num_layers - 1
    heads = [0, 3]  # one query head from each kv group
    spec = CaptureSpec(attention=False, qk_layers=[last])
    needs = Needs(qk_layers=(last,), images=True, text=True)
    _, passes = run_passes(ck, [sample], needs, spec, None, head_choice=[(last, h) for h in heads])
    (out,) = KAWHI.run(passes, KawhiConfig())
    selected = out.detail.selected
    assert 0 < selected.sum() < selected.size

    q_ref, k_ref = reference_qk(ck, sample)
    assert np.allclose(passes[0].queries[last], q_ref.numpy(), atol=1e-5)
    assert np.allclose(passes[0].keys[last], k_ref.numpy(), atol=1e-5)
    # Eq. 12-13 directly: every (head, token, selected key) cosine, then the mean
    q_hat = q_ref[heads] / q_ref[heads].norm(dim=-1, keepdim=True)
    k_sel = k_ref[heads][:, torch.as_tensor(selected)]
    k_hat = k_sel / k_sel.norm(dim=-1, keepdim=True)
    cosines = torch.einsum("htd,hnd->htn", q_hat, k_hat)
    alpha_ref = cosines.mean(dim=(0, 2)).numpy()
    assert np.allclose(out.columns["alpha"], alpha_ref, atol=1e-5)
    assert np.all(np.abs(out.columns["alpha"]) <= 1)
    # weights: Eq. 15 per paragraph, constant inside a paragraph, in [w_min, w_max]
    seg = out.columns["paragraph_id"]
    assert seg.max() == 2
    for j in range(3):
        assert np.ptp(out.weight[seg == j]) == 0
    assert np.all((out.weight >= 0.1) & (out.weight <= 1.0))


def test_all_heads_ablation_and_missing_heads(loaded) -> None:
    ck = loaded("qwen2.5-vl")
    sample = Sample([bar_chart()], "Which bar?", "Red.\n\nBlue.", "s1")
    last = ck.geometry.num_layers - 1
    spec = CaptureSpec(attention=False, qk_layers=[last])
    needs = Needs(qk_layers=(last,), images=True, text=True)
    _, passes = run_passes(ck, [sample], needs, spec, None)
    with pytest.raises(VlmCreditError, match="--heads-json"):
        KAWHI.run(passes, KawhiConfig())
    (out,) = KAWHI.run(passes, KAWHI.make_config({"heads": "all"}))
    assert out.detail.heads == list(range(ck.geometry.num_heads))
    with pytest.raises(VlmCreditError, match="alignment='value-key': choose one of query-key"):
        KAWHI.make_config({"alignment": "value-key"})


def test_response_text_spans_match_the_tokenizers_offsets(loaded) -> None:
    tok = loaded("qwen2.5-vl").tokenizer
    text = "Héllo 日本.\n\n\nThe  bar 😀<|im_end|>"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    got_text, spans = response_text_spans(tok, enc["input_ids"])
    assert got_text == text == tok.decode(enc["input_ids"])
    assert spans.tolist() == [list(o) for o in enc["offset_mapping"]]


def test_pixels_rebuilt_from_pixel_values_equal_the_grid_resize(loaded) -> None:
    for family in ("qwen2.5-vl", "qwen3-vl"):
        ck = loaded(family)
        image = bar_chart(123, 77)
        ip = ck.processor.image_processor
        enc = ip(images=[image], return_tensors="pt")
        (rebuilt,) = images_from_pixel_values(
            enc["pixel_values"], enc["image_grid_thw"], ck.geometry, ip.image_mean, ip.image_std
        )
        _, h, w = enc["image_grid_thw"][0].tolist()
        m = ck.geometry.merge_size
        assert np.array_equal(
            rebuilt, resize_for_grid(image, h // m, w // m, ck.geometry.cell_pixels)
        )


def reference_states(ck, sample: Sample) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every alignment kind from the final layer's input, in float64 with our own projection,
    norm and rotation: query-key (post-RoPE Q, K), key-key (post-RoPE K of the response, K of
    the image), pre-rope (Q, K before the rotation, after the norm)."""
    model = ck.model
    attn = ck.decoder_layers()[-1].self_attn
    seen = {}

    def grab(_module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["rope"] = kwargs["position_embeddings"]

    batch = encode_samples(ck.processor, ck.geometry, [sample])
    inputs = ck.adapter.with_positions(model, batch.inputs)
    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    layout, d = batch.layouts[0], ck.geometry.head_dim
    h = seen["h"][0].double()
    cos, sin = (x[0].double() for x in seen["rope"])
    with torch.no_grad():
        q = _linear(h, attn.q_proj).view(len(h), -1, d)
        k = _linear(h, attn.k_proj).view(len(h), -1, d)
        if hasattr(attn, "q_norm"):
            q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
    q_rot = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    k_rot = k * cos[:, None] + _rotate_half(k) * sin[:, None]
    groups = q.shape[1] // k.shape[1]
    resp = slice(*layout.response_span)
    image = torch.as_tensor(layout.image_positions)

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # (n, H', D) -> (H, n, D), GQA-expanded
        x = x.transpose(0, 1)
        return x if x.shape[0] == q.shape[1] else torch.repeat_interleave(x, groups, dim=0)

    return {
        "query-key": (heads_first(q_rot[resp]), heads_first(k_rot[image])),
        "key-key": (heads_first(k_rot[resp]), heads_first(k_rot[image])),
        "pre-rope": (heads_first(q[resp]), heads_first(k[image])),
    }


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe"])
def test_alignment_states_equal_an_independent_recomputation(loaded, family) -> None:
    ck = loaded(family)
    # two rows of different lengths: the batch is left padded, positions and spans shift
    samples = [
        Sample([bar_chart(112, 84)], "Which bar is tallest?", RESPONSE, "s0"),
        Sample([bar_chart(84, 112, seed=1)], "Which?", "Green.\n\nNo.", "s1"),
    ]
    last = ck.geometry.num_layers - 1
    requests = [("query-key", -1), ("key-key", -1), ("pre-rope", last)]
    # a plain forward with the hook alone ...
    items, states = sample_states(ck, samples, requests)
    # ... and hooked into the Q/K capture forward (a run whose methods need both)
    needs = Needs(qk_layers=(last,), qk_states=tuple(requests))
    spec = CaptureSpec(attention=False, qk_layers=[last])
    _, captured = run_passes(ck, samples, needs, spec, None)
    for sample, item, found, passes in zip(samples, items, states, captured, strict=True):
        assert set(found) == {(kind, last) for kind in ("query-key", "key-key", "pre-rope")}
        assert set(passes.qk_states) == set(found)
        for kind, (resp_ref, image_ref) in reference_states(ck, sample).items():
            resp, image = found[(kind, last)]
            assert resp.dtype == torch.float32 and resp.shape == resp_ref.shape
            assert image.shape == image_ref.shape and image.shape[0] == ck.geometry.num_heads
            assert resp.shape[1] == len(item.response_ids) > 0
            assert torch.allclose(resp.double(), resp_ref, atol=1e-5)
            assert torch.allclose(image.double(), image_ref, atol=1e-5)
            same_forward = passes.qk_states[(kind, last)]
            assert np.allclose(same_forward[0], resp.numpy(), atol=1e-6)
            assert np.allclose(same_forward[1], image.numpy(), atol=1e-6)
        # the recomputed post-RoPE pair is the capture's own (same forward arithmetic)
        assert np.allclose(found[("query-key", last)][0].numpy(), passes.queries[last], atol=1e-6)
        assert np.allclose(found[("query-key", last)][1].numpy(), passes.keys[last], atol=1e-6)
        # the kinds really differ (RoPE moves the states; keys are not queries)
        assert not torch.allclose(found[("key-key", last)][0], found[("query-key", last)][0])
        assert not torch.allclose(found[("pre-rope", last)][0], found[("query-key", last)][0])


@pytest.mark.parametrize("alignment", ["key-key", "pre-rope"])
def test_alpha_of_the_ablations_from_the_recomputed_states(loaded, alignment) -> None:
    ck = loaded("qwen3-vl")
    sample = Sample([bar_chart(112, 84)], "Which bar is tallest?", RESPONSE, "s0")
    last = ck.geometry.num_layers - 1
    cfg = KAWHI.make_config({"alignment": alignment})
    needs = KAWHI.needs(cfg)
    assert needs.qk_layers == () and needs.qk_states == ((alignment, -1),)
    assert KAWHI.needs(KawhiConfig()).qk_states == ()  # the paper's path: the capture only
    heads = [1, 2]
    _, passes = run_passes(ck, [sample], needs, None, None, head_choice=[(last, h) for h in heads])
    assert passes[0].queries == {} and set(passes[0].qk_states) == {(alignment, last)}
    (out,) = KAWHI.run(passes, cfg)
    resp, image = reference_states(ck, sample)[alignment]
    selected = torch.as_tensor(out.detail.selected)
    r_hat = resp[heads] / resp[heads].norm(dim=-1, keepdim=True)
    k_hat = image[heads][:, selected] / image[heads][:, selected].norm(dim=-1, keepdim=True)
    alpha_ref = torch.einsum("htd,hnd->htn", r_hat, k_hat).mean(dim=(0, 2)).numpy()
    assert np.allclose(out.columns["alpha"], alpha_ref, atol=1e-5)
    (paper,) = KAWHI.run(
        run_passes(
            ck,
            [sample],
            KAWHI.needs(KawhiConfig()),
            CaptureSpec(attention=False, qk_layers=[last]),
            None,
            head_choice=[(last, h) for h in heads],
        )[1],
        KawhiConfig(),
    )
    assert not np.allclose(out.columns["alpha"], paper.columns["alpha"], atol=1e-3)


def test_states_hook_is_removed_on_exit_and_on_errors(loaded) -> None:
    ck = loaded("qwen2.5-vl")
    index, attn = attention_module(ck.model, -1)
    assert index == ck.geometry.num_layers - 1
    span = RowSpan(0, 1, torch.tensor([0]))
    with layer_states(ck.model, [("key-key", -1)], [span]) as found:
        assert len(attn._forward_pre_hooks) == 1
    assert len(attn._forward_pre_hooks) == 0 and found == [{}]
    with (
        pytest.raises(RuntimeError, match="boom"),
        layer_states(ck.model, [("pre-rope", 0)], [span]),
    ):
        raise RuntimeError("boom")
    assert len(attn._forward_pre_hooks) == 0
    # a forward whose batch does not match the spans fails inside the hook: removed as well
    batch = encode_samples(ck.processor, ck.geometry, [Sample([bar_chart()], "Q?", "A.", "x")])
    inputs = ck.adapter.with_positions(ck.model, batch.inputs)
    two = layer_states(ck.model, [("key-key", -1)], [span, span])
    with pytest.raises(VlmCreditError, match="1 rows for 2 spans"), torch.no_grad(), two:
        ck.model(**inputs)
    assert len(attn._forward_pre_hooks) == 0
    unknown = layer_states(ck.model, [("value-key", -1)], [span])
    with pytest.raises(VlmCreditError, match="choose from query-key, key-key, pre-rope"), unknown:
        pass
    with pytest.raises(VlmCreditError, match="no attention layer"):
        attention_module(ck.model, 99)
