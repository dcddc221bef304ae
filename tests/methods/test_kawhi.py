"""KAWHI method: alpha from the captured Q/K against an independent recomputation of the final
layer's projections, q/k norm, RoPE and GQA expansion; response text spans; rebuilt pixels."""

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
    with pytest.raises(VlmCreditError, match="alignment"):
        KAWHI.make_config({"alignment": "key-key"})


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
