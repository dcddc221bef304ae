"""Capture against eager `output_attentions` of the same model (fp32, every family)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import FAMILIES, noise_image
from vlmcredit.data.sample import Sample
from vlmcredit.models.inputs import encode_samples
from vlmcredit.probes.capture import CaptureSpec, capture_session
from vlmcredit.probes.response_attention import (
    GenerationConfig,
    capture_encoded,
    capture_samples,
    generate_responses,
    row_targets,
)

TOL = 1e-5


def eager_forward(model, inputs):
    """The reference: global eager attention with output_attentions, then back to SDPA."""
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": previous, "vision_config": "sdpa"})


def sdpa_logits(model, inputs):
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model(**inputs).logits


def reference_block(eager_out, layout, b, layers=None, heads=None):
    """(L, H, T, N) response x image block of the eager attentions."""
    attn = eager_out.attentions
    layers = range(len(attn)) if layers is None else layers
    block = torch.stack([attn[layer][b] for layer in layers])  # (L, H, S, S)
    block = block[:, :, layout.response_positions][:, :, :, layout.image_positions]
    return block if heads is None else block[:, heads]


def batches():
    wide, tall, small = noise_image(90, 200, 1), noise_image(160, 70, 2), noise_image(60, 60, 3)
    return {
        "single": [Sample([wide], "Is there a dog?", "No, I see only coloured noise here.")],
        "padded batch": [
            Sample([wide], "Describe it.", "Noise."),
            Sample([tall], "What colour dominates this tall image?", "Mostly grey and some blue."),
        ],
        "multi-image": [Sample([wide, small, tall], "Compare the images.", "Three noisy images.")],
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["single", "padded batch", "multi-image"])
@pytest.mark.parametrize("kernel_lse", [True, False], ids=["kernel-lse", "portable"])
def test_capture_equals_eager(loaded, family: str, case: str, kernel_lse: bool) -> None:
    ck = loaded(family)
    samples = batches()[case]
    batch = encode_samples(ck.processor, ck.geometry, samples)
    plain = sdpa_logits(ck.model, batch.inputs)
    spec = CaptureSpec(reduce="heads", kernel_lse=kernel_lse, chunk_elements=4096)
    captures, logits = capture_encoded(ck.model, batch, spec)
    ref = eager_forward(ck.model, batch.inputs)
    valid = batch.inputs["attention_mask"].bool()
    # Logits of the capture forward are the plain SDPA logits.
    assert (logits - plain)[valid].abs().max().item() <= TOL
    for b, layout in enumerate(batch.layouts):
        got = captures[b].attention
        want = reference_block(ref, layout, b)
        assert (
            got.shape
            == want.shape
            == (
                ck.geometry.num_layers,
                ck.geometry.num_heads,
                layout.num_response_tokens,
                layout.image_positions.size,
            )
        )
        assert (got - want).abs().max().item() <= TOL
        assert got.sum(-1).max() <= 1 + TOL  # image mass is a share of the full row


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl-moe"])
def test_reductions_and_selection(loaded, family: str) -> None:
    ck = loaded(family)
    batch = encode_samples(ck.processor, ck.geometry, batches()["padded batch"])
    ref = eager_forward(ck.model, batch.inputs)
    layers, heads = [0, 2], [1, 3]
    for reduce, kernel_lse in (("heads", True), ("mean", False), ("sum", True)):
        spec = CaptureSpec(
            layers=layers, heads=heads, reduce=reduce, chunk_elements=50, kernel_lse=kernel_lse
        )
        captures, _ = capture_encoded(ck.model, batch, spec)
        for b, layout in enumerate(batch.layouts):
            want = reference_block(ref, layout, b, layers, heads)
            if reduce == "mean":
                want = want.mean(1, keepdim=True)
            elif reduce == "sum":
                want = want.sum(1, keepdim=True)
            assert captures[b].layers == layers
            assert (captures[b].attention - want).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_during_generate(loaded, family: str) -> None:
    """generate() runs under no_grad, so the kernel path serves prefill and Q = 1 decoding."""
    ck = loaded(family)
    prompts = [
        Sample([noise_image(90, 200, 4), noise_image(60, 60, 5)], "Compare them.", ""),
        Sample([noise_image(120, 80, 6)], "Hi?", ""),
    ]
    gen = GenerationConfig(max_new_tokens=6, temperature=0.0)
    responses, captures = generate_responses(ck, prompts, gen, CaptureSpec(qk_layers=[1]))
    assert all(len(r) >= 2 for r in responses)
    # Teacher-forced eager on prompt + generated response is the reference.
    full = [Sample(p.images, p.prompt, r) for p, r in zip(prompts, responses, strict=True)]
    batch = encode_samples(ck.processor, ck.geometry, full)
    ref = eager_forward(ck.model, batch.inputs)
    for b, layout in enumerate(batch.layouts):
        n = len(responses[b]) - 1  # the last generated token is never fed back
        got = captures[b].attention
        want = reference_block(ref, layout, b)[:, :, :n]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL
        assert captures[b].queries[1].shape[1] == n


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_equal_projections_plus_rope(loaded, family: str) -> None:
    """Q/K recomputed from the layer input, q/k_proj, q/k_norm and the rotary cos/sin."""
    ck = loaded(family)
    batch = encode_samples(ck.processor, ck.geometry, batches()["padded batch"])
    layer = ck.geometry.num_layers - 1
    attn = ck.decoder_layers()[layer].self_attn
    seen = {}

    def grab(_module, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["cos_sin"] = kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        captures, _ = capture_encoded(
            ck.model, batch, CaptureSpec(attention=False, qk_layers=[layer])
        )
    finally:
        handle.remove()
    hidden, (cos, sin) = seen["hidden"], seen["cos_sin"]
    bsz, seq, _ = hidden.shape
    heads, kv_heads, dim = ck.geometry.num_heads, ck.geometry.num_kv_heads, ck.geometry.head_dim
    with torch.no_grad():
        q = attn.q_proj(hidden).view(bsz, seq, heads, dim)
        k = attn.k_proj(hidden).view(bsz, seq, kv_heads, dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        k = k.repeat_interleave(heads // kv_heads, dim=1)
    for b, layout in enumerate(batch.layouts):
        cap = captures[b]
        assert cap.attention is None
        want_q = q[b][:, layout.response_positions]
        want_k = k[b][:, layout.image_positions]
        assert cap.queries[layer].shape == want_q.shape
        assert cap.keys[layer].shape == (heads, layout.image_positions.size, dim)
        assert (cap.queries[layer] - want_q).abs().max().item() <= TOL
        assert (cap.keys[layer] - want_k).abs().max().item() <= TOL


def test_vision_tower_stays_on_sdpa(loaded) -> None:
    ck = loaded("qwen2.5-vl")
    batch = encode_samples(ck.processor, ck.geometry, batches()["single"])
    config = ck.model.config
    before = (config.text_config._attn_implementation, config.vision_config._attn_implementation)
    with capture_session(ck.model, CaptureSpec(), row_targets(batch.layouts, "cpu")):
        assert config.vision_config._attn_implementation == "sdpa"
        assert config.text_config._attn_implementation == "vlmcredit_capture"
    # the switch lives only inside the session (tests/probes/test_restore.py covers the rest)
    after = (config.text_config._attn_implementation, config.vision_config._attn_implementation)
    assert after == before


def test_bad_selection_is_refused(loaded) -> None:
    ck = loaded("qwen2-vl")
    batch = encode_samples(ck.processor, ck.geometry, batches()["single"])
    with pytest.raises(ValueError, match="layer 7 out of range"):
        capture_encoded(ck.model, batch, CaptureSpec(layers=[7]))
    with pytest.raises(ValueError, match="reduce"):
        capture_encoded(ck.model, batch, CaptureSpec(reduce="max"))  # type: ignore[arg-type]


def test_capture_under_bf16_autocast(loaded) -> None:
    """A trainer's bf16 autocast on CPU (q/k fp32 after RoPE, v bf16) still captures: same
    probabilities as the fp32 forward to bf16 precision."""
    ck = loaded("qwen2.5-vl")
    samples = [
        Sample([noise_image(56, 84, 1)], "What is it?", "Some noise here.", "a"),
        Sample([noise_image(84, 56, 2)], "Describe it", "Dots.", "b"),
    ]
    reference = capture_samples(ck, samples, CaptureSpec(reduce="mean"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = capture_samples(ck, samples, CaptureSpec(reduce="mean"))
    for got, ref in zip(mixed, reference, strict=True):
        assert torch.allclose(got.capture.attention, ref.capture.attention, atol=5e-3)
