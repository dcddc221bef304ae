"""The supported Qwen-VL families and the numbers every probe needs from a checkpoint's config.

Each family is one `FamilyAdapter` (`adapter.py`: where things live in the transformers 5 module
tree and how to use them). Nothing here guesses from class names or hard-codes token ids: ids and
sizes are read from the checkpoint's config (`ModelGeometry.from_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.adapter import (
    AttentionLayer,
    ChatLiterals,
    FamilyAdapter,
    resolve_path,
)

__all__ = [
    "CLI_NAMES",
    "FAMILIES",
    "AttentionLayer",
    "ChatLiterals",
    "FamilyAdapter",
    "ModelGeometry",
    "adapter_for",
    "adapter_of",
    "resolve_path",
]


FAMILIES: dict[str, FamilyAdapter] = {
    a.model_type: a
    for a in (
        FamilyAdapter("qwen2_vl", "qwen2-vl", "Qwen2VLProcessor"),
        FamilyAdapter("qwen2_5_vl", "qwen2.5-vl", "Qwen2_5_VLProcessor"),
        FamilyAdapter("qwen3_vl", "qwen3-vl", "Qwen3VLProcessor", has_deepstack=True),
        FamilyAdapter(
            "qwen3_vl_moe", "qwen3-vl-moe", "Qwen3VLProcessor", has_deepstack=True, is_moe=True
        ),
    )
}
CLI_NAMES: dict[str, str] = {a.cli_name: a.model_type for a in FAMILIES.values()}

# model_types that are the text-only siblings of a supported family: a clearer error than
# "unknown model type" for the common mistake of pointing at an LLM checkpoint.
TEXT_ONLY_TYPES = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "llama", "mistral"}


def model_device(model: Any) -> Any:
    """The device of the model's first parameter (where inputs go; a device map's first one)."""
    return next(model.parameters()).device


def adapter_of(model: Any) -> FamilyAdapter:
    """The adapter of a loaded transformers model (from its config's `model_type`)."""
    return adapter_for(getattr(model.config, "model_type", None), "model")


def adapter_for(model_type: str | None, source: str = "checkpoint") -> FamilyAdapter:
    """The adapter for a config's `model_type`, or a one-line error naming the supported ones."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(sorted(FAMILIES))
    if model_type in TEXT_ONLY_TYPES:
        raise VlmCreditError(
            f"{source}: model_type '{model_type}' is a text-only checkpoint; vlmcredit needs a "
            f"vision-language checkpoint ({supported})"
        )
    raise VlmCreditError(f"{source}: unsupported model_type '{model_type}'; supported: {supported}")


@dataclass(frozen=True)
class ModelGeometry:
    """The numbers every probe needs, read from a checkpoint's config."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    deepstack_layers: tuple[int, ...] = field(default_factory=tuple)
    num_experts: int = 0

    @property
    def cell_pixels(self) -> int:
        """Side of one merged image token in pixels of the resized image (28 or 32)."""
        return self.patch_size * self.merge_size

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any, source: str = "checkpoint") -> ModelGeometry:
        adapter = adapter_for(getattr(config, "model_type", None), source)
        text = config.text_config
        vision = config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        deepstack = tuple(getattr(vision, "deepstack_visual_indexes", ()) or ())
        return cls(
            family=adapter.model_type,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=head_dim,
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            patch_size=_as_int(vision.patch_size),
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=_as_int(vision.temporal_patch_size),
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            # Deepstack features are injected into the first len(indexes) decoder layers.
            deepstack_layers=tuple(range(len(deepstack))) if adapter.has_deepstack else (),
            num_experts=getattr(text, "num_experts", 0) if adapter.is_moe else 0,
        )


def _as_int(value: int | list[int] | tuple[int, ...]) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)
