"""Sessions that change a model put it back: attention implementations and ablation hooks.

A trainer's policy loaded with eager (or flash) attention must keep it after
`vlmcredit.online` measured a batch with it, also when something inside the session raised.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import FAMILIES, noise_image
from tests.test_online import trainer_batch
from vlmcredit import online
from vlmcredit.data.sample import Sample
from vlmcredit.models.families import adapter_of
from vlmcredit.models.inputs import encode_samples
from vlmcredit.probes.ablation import ablate_heads, o_proj_modules
from vlmcredit.probes.capture import (
    CAPTURE_IMPLEMENTATION,
    CaptureSpec,
    RowTarget,
    capture_session,
)
from vlmcredit.probes.response_attention import row_targets


class Boom(RuntimeError):
    pass


def eager_model(tiny_ckpt, family: str):
    """A fresh fp32 copy of the tiny checkpoint loaded with eager attention everywhere."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        tiny_ckpt(family), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def attention_state(model) -> dict[str, object]:
    """The implementation of the top, text and vision configs and of every sub-module's config."""
    config = model.config
    state: dict[str, object] = {
        "top": config._attn_implementation,
        "text": config.text_config._attn_implementation,
        "vision": config.vision_config._attn_implementation,
    }
    for name, module in model.named_modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            state[f"module:{name}"] = module.config._attn_implementation
    return state


def sample_inputs(ck, model) -> tuple[dict[str, torch.Tensor], list[RowTarget]]:
    batch = encode_samples(
        ck.processor,
        ck.geometry,
        [Sample([noise_image(84, 112, 4)], "What is it?", "Coloured noise, nothing else.")],
    )
    inputs = adapter_of(model).with_positions(model, batch.inputs)
    return inputs, row_targets(batch.layouts, "cpu")


def eager_logits(model, inputs) -> torch.Tensor:
    """Logits of a forward that must run eager attention: only eager returns attentions."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    n_layers = model.config.text_config.num_hidden_layers
    assert len(out.attentions) == n_layers and out.attentions[0] is not None
    return out.logits


def test_online_weights_leave_an_eager_policy_on_eager(loaded, tiny_ckpt) -> None:
    family = "qwen2.5-vl"
    ck = loaded(family)
    model = eager_model(tiny_ckpt, family)
    before = attention_state(model)
    assert before["text"] == before["vision"] == "eager"
    inputs, _ = sample_inputs(ck, model)
    logits_before = eager_logits(model, inputs)
    samples = [
        Sample([noise_image(112, 140, 5)], "What is this?", "Random dots of many colours.", "a"),
        Sample([noise_image(84, 84, 6)], "Describe.", "Noise " * 9 + "everywhere.", "b"),
    ]
    weights = online.weights(model, trainer_batch(ck, samples), method="anchors")
    assert weights.shape[0] == 2 and torch.isfinite(weights).all()
    assert attention_state(model) == before
    assert torch.equal(eager_logits(model, inputs), logits_before)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_session_restores_on_exception(loaded, tiny_ckpt, family) -> None:
    ck = loaded(family)
    model = eager_model(tiny_ckpt, family)
    before = attention_state(model)
    inputs, targets = sample_inputs(ck, model)
    logits_before = eager_logits(model, inputs)
    with pytest.raises(Boom), capture_session(model, CaptureSpec(), targets) as session:
        assert model.config.text_config._attn_implementation == CAPTURE_IMPLEMENTATION
        assert model.config.vision_config._attn_implementation == "eager"  # untouched
        with torch.no_grad():
            model(**inputs)
        assert session.result(0).attention.abs().sum() > 0  # the capture really ran
        raise Boom("the trainer step failed mid-session")
    assert attention_state(model) == before
    assert torch.equal(eager_logits(model, inputs), logits_before)


def test_capture_session_restores_an_sdpa_model(loaded) -> None:
    """The loaded (SDPA) model stays SDPA, top config included, after a normal session."""
    ck = loaded("qwen3-vl")
    before = attention_state(ck.model)
    assert before["text"] == "sdpa"
    inputs, targets = sample_inputs(ck, ck.model)
    with torch.no_grad(), capture_session(ck.model, CaptureSpec(reduce="mean"), targets) as s:
        ck.model(**inputs)
    assert s.result(0).attention.shape[0] == ck.geometry.num_layers
    assert attention_state(ck.model) == before


def test_refused_capture_spec_leaves_the_model_alone(loaded, tiny_ckpt) -> None:
    family = "qwen2-vl"
    ck = loaded(family)
    model = eager_model(tiny_ckpt, family)
    before = attention_state(model)
    _, targets = sample_inputs(ck, model)
    with (
        pytest.raises(ValueError, match="out of range"),
        capture_session(model, CaptureSpec(layers=[99]), targets),
    ):
        pass
    assert attention_state(model) == before


def test_ablation_hooks_are_removed_on_exception(loaded) -> None:
    ck = loaded("qwen2.5-vl")
    inputs, _ = sample_inputs(ck, ck.model)
    modules = o_proj_modules(ck)
    hooks_before = [len(m._forward_pre_hooks) for m in modules.values()]
    with torch.no_grad():
        clean = ck.model(**inputs).logits
        with pytest.raises(Boom), ablate_heads(ck, [(None, 0), (1, 2)]) as plan:
            assert plan  # hooks are in place inside the block ...
            ablated = ck.model(**inputs).logits
            assert not torch.equal(ablated, clean)  # ... and change the output
            raise Boom("scoring the ablated answers failed")
        after = ck.model(**inputs).logits
    assert [len(m._forward_pre_hooks) for m in modules.values()] == hooks_before
    assert torch.equal(after, clean)
