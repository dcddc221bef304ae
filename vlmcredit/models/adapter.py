"""The family adapter: where one Qwen-VL family keeps its parts, and how to reach them.

Probes never walk the transformers module tree or touch model-internal caches themselves; they
ask the adapter (`adapter.attention_layers(model)`, `adapter.image_features(...)`, ...). A new
family (or a new transformers layout) then changes one record here, not every probe. The
registry of supported families lives in `families.py`.

No torch import at module level: `describe` and the CLI read adapters before any heavy import.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from vlmcredit.errors import VlmCreditError

# What `get_rope_index` needs from a batch to number image tokens in 3-D.
_ROPE_KEYS = ("input_ids", "mm_token_type_ids", "image_grid_thw")


@dataclass(frozen=True)
class ChatLiterals:
    """The special-token spellings of a family's chat template (all Qwen-VL families share them).

    Token *ids* still come from the tokenizer / config; these are the strings the template
    writes, e.g. the end-of-turn marker that ends an assistant response.
    """

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"  # end of turn: generation stops here
    endoftext: str = "<|endoftext|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    vision_pad: str = "<|vision_pad|>"
    image_pad: str = "<|image_pad|>"
    video_pad: str = "<|video_pad|>"

    def special_tokens(self) -> list[str]:
        """In the order Qwen's tokenizers list them."""
        return [
            self.endoftext,
            self.im_start,
            self.im_end,
            self.vision_start,
            self.vision_end,
            self.vision_pad,
            self.image_pad,
            self.video_pad,
        ]


QWEN_CHAT = ChatLiterals()


class _LayerReached(Exception):
    """Raised by `decoder_input_at`'s pre-hook to stop a forward at the wanted layer."""


class AttentionLayer(NamedTuple):
    """A decoder layer that has softmax self-attention, under its absolute decoder index."""

    index: int
    self_attn: Any
    o_proj: Any


@dataclass(frozen=True)
class FamilyAdapter:
    """Where the parts of one Qwen-VL family live and how to use them (transformers 5 tree).

    Paths are dotted attribute paths: `layers_path`, `vision_path` and `base_path` from the
    top-level `...ForConditionalGeneration` model; `self_attn_path` and `o_proj_path` from one
    decoder layer.
    """

    model_type: str  # config.model_type, e.g. "qwen2_5_vl"
    cli_name: str  # what users type, e.g. "qwen2.5-vl"
    processor_class: str  # transformers processor class used by the fallback
    base_path: str = "model"  # the ...Model under the LM head: owns get_rope_index
    text_path: str = "model.language_model"  # the text decoder: embeddings, rotary, norm
    layers_path: str = "model.language_model.layers"
    self_attn_path: str = "self_attn"
    o_proj_path: str = "self_attn.o_proj"
    vision_path: str = "model.visual"
    has_deepstack: bool = False  # Qwen3-VL: vision features also enter early decoder layers
    is_moe: bool = False
    chat: ChatLiterals = field(default=QWEN_CHAT)

    # -- module tree ---------------------------------------------------------------------------
    def base_model(self, model: Any) -> Any:
        return resolve_path(model, self.base_path)

    def decoder_layers(self, model: Any) -> Any:
        """Every decoder layer (attention or not), indexable by absolute layer index."""
        return resolve_path(model, self.layers_path)

    def attention_layers(self, model: Any) -> list[AttentionLayer]:
        """Decoder layers that have softmax self-attention, with their absolute indices.

        Hybrid decoders (Qwen3.5-style linear-attention layers between attention layers) have
        layers without `self_attn`: they are skipped, so capture and ablation never index a
        layer that has no attention heads, and indices stay those of the decoder.
        """
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            attn = _try_resolve(layer, self.self_attn_path)
            if attn is not None:
                out.append(AttentionLayer(i, attn, resolve_path(layer, self.o_proj_path)))
        return out

    def vision_tower(self, model: Any) -> Any:
        return resolve_path(model, self.vision_path)

    def output_embedding(self, model: Any) -> Any:
        """The LM head (hidden state -> vocabulary logits), through transformers' public API."""
        return model.get_output_embeddings()

    # -- behaviour -----------------------------------------------------------------------------
    def image_features(self, model: Any, pixel_values: Any, grid_thw: Any) -> Any:
        """The vision tower's output for these images (`pooler_output` = merged-token embeds,
        plus `deepstack_features` on Qwen3-VL), as the model's own output class."""
        return model.get_image_features(pixel_values, grid_thw, return_dict=True)

    def rope_index(self, model: Any, inputs: Mapping[str, Any]) -> tuple[Any, Any]:
        """(position_ids (3, B, S), rope deltas (B, 1)) of a batch of model inputs with images,
        from the model's public `get_rope_index`.

        Passing these position ids to a forward makes it independent of the M-RoPE deltas the
        model caches between calls (and leaves that cache alone): the same numbers the model
        computes for a fresh forward without a KV cache.
        """
        missing = [k for k in _ROPE_KEYS if inputs.get(k) is None]
        if missing:
            raise VlmCreditError(f"M-RoPE positions need {', '.join(missing)} in the inputs")
        return self.base_model(model).get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs.get("attention_mask"),
        )

    def with_positions(self, model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """`inputs` plus explicit `position_ids`: a fresh forward, whatever ran before.

        Text-only inputs get none (the model then numbers tokens 0..S-1 itself, without
        consulting its cache when no KV cache is passed).
        """
        out = dict(inputs)
        if out.get("position_ids") is None and all(out.get(k) is not None for k in _ROPE_KEYS):
            out["position_ids"] = self.rope_index(model, out)[0]
        return out

    @contextmanager
    def fresh_rope_cache(self, model: Any) -> Iterator[None]:
        """Run a block (e.g. `generate()`) with the model's cached M-RoPE deltas cleared, and
        put the previous value back afterwards.

        Qwen-VL models keep `rope_deltas` from the last call and reuse them once a KV cache is
        present; `generate()` computes them at its first step, but a stale value must never leak
        into a new prompt, nor ours into a caller's (e.g. a trainer) later call. The only place
        that touches this model-internal cache; plain forwards use `with_positions` instead.
        """
        base = self.base_model(model)
        previous = getattr(base, "rope_deltas", None)
        base.rope_deltas = None
        try:
            yield
        finally:
            base.rope_deltas = previous

    # -- running the decoder from a given layer ------------------------------------------------
    def layer_start_support(self, model: Any) -> str | None:
        """None when `run_decoder_from` can run this model's decoder from any layer, else why not.

        It sizes the attention mask against the start layer's KV cache (the layers below it
        never run), which needs transformers' `create_causal_mask(layer_idx=...)`, and assumes
        every layer is full attention (no sliding-window or linear layers with masks of their
        own).
        """
        import inspect

        from transformers import masking_utils

        if "layer_idx" not in inspect.signature(masking_utils.create_causal_mask).parameters:
            return "this transformers' create_causal_mask cannot size a mask from a given layer"
        config = self.text_model(model).config
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            return f"decoder layer types {sorted(types)}: only full-attention decoders"
        return None

    def text_model(self, model: Any) -> Any:
        return resolve_path(model, self.text_path)

    def decoder_input_at(self, model: Any, layer: int, forward: Any) -> Any:
        """The hidden states entering decoder layer `layer` during `forward()` (a zero-argument
        call into the model), which stops there: the layers below run (and fill their KV cache,
        Qwen3-VL's deepstack features included), the rest do not."""
        seen: dict[str, Any] = {}

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _LayerReached

        handle = self.decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            forward()
        except _LayerReached:
            pass
        finally:
            handle.remove()
        if "hidden" not in seen:
            raise RuntimeError(f"decoder layer {layer} was never reached")
        return seen["hidden"]

    def run_decoder_from(
        self,
        model: Any,
        hidden: Any,
        start: int,
        *,
        position_ids: Any,
        attention_mask: Any,
        cache: Any,
        visual_mask: Any = None,
        deepstack: Any = None,
    ) -> Any:
        """The final (normed) hidden states of decoder layers `start`.. run on `hidden`, the
        input of layer `start` (e.g. from `decoder_input_at`), exactly as the model's own loop
        runs them: same rotary embeddings, causal + padding mask, KV cache updates, and on
        Qwen3-VL the deepstack features (`deepstack[j]` for the image tokens `visual_mask`)
        added after layer j < len(deepstack). The KV cache of the layers below `start` is not
        read. `position_ids` (3, B, T) M-RoPE positions; `attention_mask` (B, past + T).
        """
        import inspect

        from transformers.masking_utils import create_causal_mask

        text = self.text_model(model)
        layers = self.decoder_layers(model)
        mask_params = inspect.signature(create_causal_mask).parameters
        mask = create_causal_mask(
            config=text.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=None,  # as the model passes for 3-row M-RoPE positions
            layer_idx=start,
            **{"cache" if "cache" in mask_params else "past_key_values": cache},
        )
        position_embeddings = text.rotary_emb(hidden, position_ids)
        params = inspect.signature(layers[start].forward).parameters
        kwargs: dict[str, Any] = {
            "attention_mask": mask,
            "position_ids": None,
            "position_embeddings": position_embeddings,
            "cache" if "cache" in params else "past_key_values": cache,
        }
        if "use_cache" in params:
            kwargs["use_cache"] = True
        for index in range(start, len(layers)):
            hidden = layers[index](hidden, **kwargs)
            if isinstance(hidden, tuple):  # layers of older transformers return (hidden, ...)
                hidden = hidden[0]
            if deepstack is not None and index < len(deepstack):
                hidden = hidden.clone()  # as the model's own `_deepstack_process`
                rows = visual_mask.to(hidden.device)
                hidden[rows, :] = hidden[rows, :] + deepstack[index].to(hidden.device, hidden.dtype)
        return text.norm(hidden)

    def stop_token_ids(self, model: Any, tokenizer: Any) -> list[int]:
        """Token ids that end a response: the generation config's EOS ids plus the chat
        template's end-of-turn token (the two differ on some Qwen checkpoints)."""
        eos = getattr(model.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        ids.add(tokenizer.convert_tokens_to_ids(self.chat.im_end))
        unknown = getattr(tokenizer, "unk_token_id", None)
        return sorted(i for i in ids if i is not None and (unknown is None or i != unknown))


def resolve_path(root: Any, dotted: str) -> Any:
    """Follow a dotted attribute path (`model.language_model.layers`) from `root`."""
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _try_resolve(root: Any, dotted: str) -> Any | None:
    try:
        return resolve_path(root, dotted)
    except AttributeError:
        return None
