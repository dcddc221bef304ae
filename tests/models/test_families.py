"""Family adapters own the family's behaviour: checked on the real tiny checkpoint of each one.

Every registered family must resolve every part and run every behaviour on its tiny model; a
hybrid decoder (a layer without `self_attn`, as in Qwen3.5's linear-attention layers) is skipped
by capture and ablation under absolute layer indices; stop ids come from the adapter and match
the chat template.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from tests.helpers import noise_image
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import CLI_NAMES, FAMILIES, FamilyAdapter, adapter_of
from vlmcredit.models.inputs import encode_samples
from vlmcredit.models.loading import load_checkpoint
from vlmcredit.probes.ablation import ablate_heads, head_means, o_proj_modules
from vlmcredit.probes.capture import CaptureSpec
from vlmcredit.probes.response_attention import capture_encoded

ADAPTERS = list(FAMILIES.values())
IDS = [a.cli_name for a in ADAPTERS]


def _batch(ck, n: int = 2):
    """A left-padded batch with responses (different image sizes -> different lengths)."""
    samples = [
        Sample([noise_image(56 + 28 * k, 84, seed=k)], "Is it red? " * (k + 1), "No, grey.")
        for k in range(n)
    ]
    return encode_samples(ck.processor, ck.geometry, samples)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# -- (a) every registered family implements every field and behaviour --------------------------
def test_registry_is_consistent() -> None:
    assert {a.model_type for a in ADAPTERS} == set(FAMILIES)
    assert all(FAMILIES[k].model_type == k for k in FAMILIES)
    assert {CLI_NAMES[a.cli_name] for a in ADAPTERS} == set(FAMILIES)
    for adapter in ADAPTERS:
        for f in dataclasses.fields(FamilyAdapter):
            value = getattr(adapter, f.name)
            assert value is not None and value != "", (adapter.model_type, f.name)
        for literal in dataclasses.astuple(adapter.chat):
            assert literal.startswith("<|") and literal.endswith("|>"), literal
        processor_class = getattr(transformers, adapter.processor_class)
        assert issubclass(processor_class, transformers.ProcessorMixin)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_adapter_parts_resolve_on_the_tiny_model(loaded, adapter: FamilyAdapter) -> None:
    ck = loaded(adapter.cli_name)
    model, geo = ck.model, ck.geometry
    assert ck.adapter is adapter is adapter_of(model)
    assert model.config.model_type == adapter.model_type
    assert isinstance(ck.processor, getattr(transformers, adapter.processor_class))

    layers = adapter.decoder_layers(model)
    assert len(layers) == geo.num_layers
    attn = adapter.attention_layers(model)
    assert [a.index for a in attn] == list(range(geo.num_layers))
    for a in attn:
        assert a.self_attn is layers[a.index].self_attn
        assert a.self_attn.layer_idx == a.index  # what capture keys its blocks by
        assert a.o_proj is a.self_attn.o_proj
        assert a.o_proj.in_features == geo.num_heads * geo.head_dim

    head = adapter.output_embedding(model)
    assert tuple(head.weight.shape) == (geo.vocab_size, geo.hidden_size)
    base = adapter.base_model(model)  # the ...Model under the LM head, holding the decoder
    assert callable(base.get_rope_index) and any(m is layers for m in base.modules())
    tower = adapter.vision_tower(model)
    assert isinstance(tower, torch.nn.Module) and tower.dtype == torch.float32
    assert (adapter.has_deepstack, adapter.is_moe) == (
        bool(geo.deepstack_layers),
        geo.num_experts > 0,
    )


@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_image_features_are_what_the_forward_uses(loaded, adapter: FamilyAdapter) -> None:
    ck = loaded(adapter.cli_name)
    geo = ck.geometry
    inputs = _batch(ck, 1).inputs
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        out = adapter.image_features(ck.model, inputs["pixel_values"], grid)
    (embeds,) = out.pooler_output
    assert tuple(embeds.shape) == (int(grid.prod()) // geo.merge_size**2, geo.hidden_size)
    deepstack = getattr(out, "deepstack_features", None) or ()
    assert len(deepstack) == len(geo.deepstack_layers)
    # Handing these features to the forward instead of pixels gives the same logits.
    clean = _logits(ck.model, inputs)
    cached = {k: v for k, v in inputs.items() if k != "pixel_values"}
    cached["mm_encoder_outputs"] = {"image": out}
    torch.testing.assert_close(_logits(ck.model, cached), clean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_explicit_positions_are_a_fresh_forward(loaded, adapter: FamilyAdapter) -> None:
    """`with_positions` gives the model's own fresh-forward numbers, whatever its rope cache
    holds, and leaves that cache alone; `fresh_rope_cache` clears it and puts it back."""
    ck = loaded(adapter.cli_name)
    model, base = ck.model, adapter.base_model(ck.model)
    inputs = _batch(ck).inputs
    base.rope_deltas = None
    fresh = _logits(model, inputs)
    positions, deltas = adapter.rope_index(model, inputs)
    assert tuple(positions.shape) == (3, *inputs["input_ids"].shape)
    assert deltas.shape[0] == inputs["input_ids"].shape[0]

    stale = torch.full((5, 1), 17, dtype=torch.long)
    base.rope_deltas = stale
    torch.testing.assert_close(_logits(model, adapter.with_positions(model, inputs)), fresh)
    assert base.rope_deltas is stale
    with adapter.fresh_rope_cache(model):
        assert base.rope_deltas is None
    assert base.rope_deltas is stale
    with pytest.raises(RuntimeError), adapter.fresh_rope_cache(model):
        raise RuntimeError("boom")
    assert base.rope_deltas is stale
    base.rope_deltas = None

    text_only = {"input_ids": inputs["input_ids"][:, -4:]}
    assert "position_ids" not in adapter.with_positions(model, text_only)
    with pytest.raises(VlmCreditError, match="image_grid_thw"):
        adapter.rope_index(model, text_only)


# -- (c) stop tokens come from the adapter and match the chat template -------------------------
@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_stop_ids_match_the_chat_template(loaded, adapter: FamilyAdapter) -> None:
    ck = loaded(adapter.cli_name)
    tok, chat = ck.tokenizer, adapter.chat
    stop = adapter.stop_token_ids(ck.model, tok)
    assert stop == sorted(set(stop)) and None not in stop

    # The template ends the assistant's turn with the adapter's end-of-turn literal, one token
    # that is a stop id; the generation config's EOS ids are stop ids too.
    messages = [
        {"role": "user", "content": "Is it red?"},
        {"role": "assistant", "content": "No"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.split("No", 1)[1].startswith(chat.im_end)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    answer = tok.encode("No", add_special_tokens=False)
    end = next(i for i in range(len(ids)) if ids[i : i + len(answer)] == answer) + len(answer)
    assert ids[end] in stop
    assert tok.convert_tokens_to_ids(chat.im_end) in stop
    eos = ck.model.generation_config.eos_token_id
    assert set(eos if isinstance(eos, list) else [eos]) <= set(stop)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"{chat.im_start}assistant\n")

    # The other literals are the tokenizer's special tokens, with the config's ids.
    for literal in chat.special_tokens():
        assert len(tok.encode(literal, add_special_tokens=False)) == 1, literal
    config = ck.model.config
    assert tok.convert_tokens_to_ids(chat.image_pad) == config.image_token_id
    assert tok.convert_tokens_to_ids(chat.video_pad) == config.video_token_id
    assert tok.convert_tokens_to_ids(chat.vision_start) == config.vision_start_token_id
    assert tok.convert_tokens_to_ids(chat.vision_end) == config.vision_end_token_id


# -- (b) a hybrid decoder: layers without self-attention are skipped, indices stay absolute ----
class LinearAttentionStandIn(torch.nn.Module):
    """A decoder layer without `self_attn` (like Qwen3.5's linear-attention layers): it passes
    the hidden states through, so the model still runs end to end."""

    def __init__(self) -> None:
        super().__init__()
        self.linear_attn = torch.nn.Identity()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.linear_attn(hidden_states)


HYBRID_GAP = 1  # the decoder layer replaced by the stand-in (tiny models have 3 layers)


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def hybrid(request, tiny_ckpt):
    """A private copy of a tiny model whose layer 1 has no self-attention."""
    ck = load_checkpoint(tiny_ckpt(request.param), dtype="fp32")
    ck.decoder_layers()[HYBRID_GAP] = LinearAttentionStandIn()
    return ck


def test_hybrid_attention_layers_skip_the_gap(hybrid) -> None:
    geo = hybrid.geometry
    attn = hybrid.adapter.attention_layers(hybrid.model)
    expected = [i for i in range(geo.num_layers) if i != HYBRID_GAP]
    assert [a.index for a in attn] == expected
    assert all(a.self_attn.layer_idx == a.index for a in attn)
    assert list(o_proj_modules(hybrid)) == expected


def test_hybrid_ablation_hooks_absolute_layers(hybrid) -> None:
    geo = hybrid.geometry
    inputs = _batch(hybrid).inputs
    clean = _logits(hybrid.model, inputs)
    last = geo.num_layers - 1
    o_proj = hybrid.decoder_layers()[last].self_attn.o_proj
    with ablate_heads(hybrid, [(None, 1)]) as plan:
        assert plan == {i: [1] for i in range(geo.num_layers) if i != HYBRID_GAP}
    # Ablating (last layer, head 1) is zeroing that head's columns of *that* layer's o_proj.
    with ablate_heads(hybrid, [(last, 1)]):
        hooked = _logits(hybrid.model, inputs)
    d = geo.head_dim
    saved = o_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            o_proj.weight[:, d : 2 * d] = 0
        reference = _logits(hybrid.model, inputs)
    finally:
        with torch.no_grad():
            o_proj.weight.copy_(saved)
    torch.testing.assert_close(hooked, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(hooked, clean)
    with (
        pytest.raises(VlmCreditError, match="no self-attention"),
        ablate_heads(hybrid, [(HYBRID_GAP, 0)]),
    ):
        pass
    means = head_means(hybrid, [inputs])
    assert tuple(means.shape) == (geo.num_layers, geo.num_heads, d)
    assert means[HYBRID_GAP].abs().sum() == 0
    assert all(means[i].abs().sum() > 0 for i in range(geo.num_layers) if i != HYBRID_GAP)


def test_hybrid_capture_keeps_absolute_layers(hybrid) -> None:
    """Capture's blocks are those of the eager reference's attention layers, in order, under
    their absolute decoder indices."""
    geo = hybrid.geometry
    batch = _batch(hybrid)
    expected = [i for i in range(geo.num_layers) if i != HYBRID_GAP]
    (cap, *_), _ = capture_encoded(hybrid.model, batch, CaptureSpec())
    assert cap.layers == expected
    assert cap.attention.shape[0] == len(expected)

    model = hybrid.model
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**batch.inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": previous, "vision_config": "sdpa"})
    assert len(eager) == len(expected)  # one per attention layer, in decoder order
    layout = batch.layouts[0]
    for k in range(len(expected)):
        block = eager[k][0][:, layout.response_positions][:, :, layout.image_positions]
        torch.testing.assert_close(cap.attention[k], block, rtol=0, atol=1e-5)

    (only, *_), _ = capture_encoded(hybrid.model, batch, CaptureSpec(layers=[expected[-1]]))
    assert only.layers == [expected[-1]]
    torch.testing.assert_close(only.attention[0], cap.attention[-1])
    with pytest.raises(ValueError, match="no self-attention"):
        capture_encoded(hybrid.model, batch, CaptureSpec(layers=[HYBRID_GAP]))
    with pytest.raises(ValueError, match="no self-attention"):
        capture_encoded(hybrid.model, batch, CaptureSpec(qk_layers=[HYBRID_GAP]))
