"""Head ablation: a forward pre-hook on `o_proj` replaces chosen query heads' slices.

The input of a decoder layer's `o_proj` is (B, S, H * D): the attention output of every query
head side by side, one D-wide slice per head (also under GQA, where heads share K/V but not
outputs). Zeroing slice h before `o_proj` is exactly the same computation as zeroing columns
h*D:(h+1)*D of `o_proj.weight` (transformers 5 has no `head_mask` any more), and "mean" puts the
head's average output over a reference set in its place instead. Hooks live only inside the
`ablate_heads` context, so the model is unchanged afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import FamilyAdapter, ModelGeometry, adapter_of, model_device

ABLATION_MODES = ("zero", "mean")
HeadSpec = tuple[int | None, int]  # (layer or None = every layer, query head index)


def _parts(model_or_ck: Any) -> tuple[Any, FamilyAdapter, ModelGeometry]:
    """(model, adapter, geometry) from a LoadedCheckpoint or a bare transformers model."""
    if hasattr(model_or_ck, "adapter") and hasattr(model_or_ck, "model"):
        return model_or_ck.model, model_or_ck.adapter, model_or_ck.geometry
    model = model_or_ck
    return model, adapter_of(model), ModelGeometry.from_config(model.config, "model")


def o_proj_modules(model_or_ck: Any) -> dict[int, Any]:
    """{absolute decoder layer index: attention output projection}, through the family adapter.

    Layers without softmax attention (hybrid decoders) are absent rather than shifting the
    indices of the others.
    """
    model, adapter, _ = _parts(model_or_ck)
    return {layer.index: layer.o_proj for layer in adapter.attention_layers(model)}


def heads_by_layer(
    heads: Iterable[HeadSpec],
    geometry: ModelGeometry,
    attention_layers: Sequence[int] | None = None,
) -> dict[int, list[int]]:
    """Expand (layer | None, head) specs to {layer: sorted heads}; out-of-range -> error.

    `attention_layers`: the decoder layers that have attention heads (default: all); layer
    None expands over those only, and naming any other layer is an error.
    """
    with_attention = (
        range(geometry.num_layers) if attention_layers is None else sorted(attention_layers)
    )
    out: dict[int, set[int]] = {}
    for layer, head in heads:
        if not 0 <= head < geometry.num_heads:
            raise VlmCreditError(
                f"head {head}: out of range; the model has {geometry.num_heads} query heads "
                f"(0..{geometry.num_heads - 1})"
            )
        if layer is not None and not 0 <= layer < geometry.num_layers:
            raise VlmCreditError(
                f"layer {layer}: out of range; the model has {geometry.num_layers} decoder "
                f"layers (0..{geometry.num_layers - 1})"
            )
        if layer is not None and layer not in with_attention:
            raise VlmCreditError(
                f"layer {layer}: has no self-attention (a linear-attention layer of a hybrid "
                "decoder); choose one of " + ", ".join(map(str, with_attention))
            )
        for target in with_attention if layer is None else (layer,):
            out.setdefault(target, set()).add(head)
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def _replace_hook(
    head_dim: int, heads: list[int], values: torch.Tensor | None
) -> Callable[[Any, tuple[Any, ...]], tuple[Any, ...]]:
    """A pre-hook writing zeros (values None) or `values[k]` (D,) into each head's slice."""
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def hook(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()  # the caller's tensor stays untouched
        if values is not None:
            key = (x.device, x.dtype)
            if key not in cache:  # move/cast the means once per device and dtype
                cache[key] = values.to(device=x.device, dtype=x.dtype)
            filled = cache[key]
        for k, h in enumerate(heads):
            block = x[..., h * head_dim : (h + 1) * head_dim]
            if values is None:
                block.zero_()
            else:
                block.copy_(filled[k].expand_as(block))
        return (x, *args[1:])

    return hook


@contextmanager
def ablate_heads(
    model_or_ck: Any,
    heads: Sequence[HeadSpec] | Iterable[HeadSpec],
    mode: str = "zero",
    means: torch.Tensor | None = None,
) -> Iterator[dict[int, list[int]]]:
    """Ablate query heads inside the `with` block; yields {layer: heads} actually hooked.

    `heads` holds (layer, head) pairs; layer None ablates that head index in every decoder layer
    at once (the KAWHI protocol). `mode="zero"` zeroes the heads' slices of the `o_proj` input;
    `mode="mean"` writes `means[layer, head]` (shape (layers, heads, head_dim), from
    `head_means`) there instead. Works for plain forwards and inside `generate()`.
    """
    if mode not in ABLATION_MODES:
        raise VlmCreditError(f"--ablation {mode}: choose one of {', '.join(ABLATION_MODES)}")
    _, _, geo = _parts(model_or_ck)
    modules = o_proj_modules(model_or_ck)
    plan = heads_by_layer(heads, geo, list(modules))
    if mode == "mean":
        expected = (geo.num_layers, geo.num_heads, geo.head_dim)
        if means is None or tuple(means.shape) != expected:
            got = None if means is None else tuple(means.shape)
            raise VlmCreditError(f"mean ablation needs means of shape {expected}, got {got}")
    handles = []
    try:
        for layer, layer_heads in plan.items():
            values = None if means is None or mode == "zero" else means[layer, layer_heads]
            hook = _replace_hook(geo.head_dim, layer_heads, values)
            handles.append(modules[layer].register_forward_pre_hook(hook))
        yield plan
    finally:
        for handle in handles:
            handle.remove()


def head_means(
    model_or_ck: Any,
    batches: Iterable[Mapping[str, Any]],
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Mean `o_proj` input per (layer, head) over every non-padding token of `batches`.

    Each batch is a dict of model inputs with an `attention_mask` (1 = real token); the model
    runs unablated. Returns float32 (layers, heads, head_dim), accumulated in float64 so a long
    reference set does not lose precision; rows of layers without attention stay zero.
    `on_batch(n)` is called with each batch's size.
    """
    model, adapter, geo = _parts(model_or_ck)
    modules = o_proj_modules(model_or_ck)
    sums = torch.zeros(geo.num_layers, geo.num_heads * geo.head_dim, dtype=torch.float64)
    count = 0
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int) -> Callable[[Any, tuple[Any, ...]], None]:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = current["mask"].to(x.device, torch.bool)
            sums[layer] += x[mask].sum(dim=0, dtype=torch.float64).cpu()

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in modules.items()]
    device = model_device(model)
    try:
        for batch in batches:
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            current["mask"] = inputs["attention_mask"]
            count += int(inputs["attention_mask"].sum())
            with torch.no_grad():  # explicit positions: independent of the model's rope cache
                model(**adapter.with_positions(model, inputs), logits_to_keep=1)
            if on_batch:
                on_batch(int(inputs["attention_mask"].shape[0]))
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise VlmCreditError("head means: no tokens in the reference batches; give some inputs")
    return (sums / count).to(torch.float32).reshape(geo.num_layers, geo.num_heads, geo.head_dim)
