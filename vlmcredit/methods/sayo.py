"""SAYO: a sequence-level reward for attention on the target region of the image.

On the top `ratio` (20%) highest-entropy tokens of each response: a = mean attention to the
image tokens of the target boxes, v = mean attention to all image tokens (each averaged per
token over those tokens, then over the selected tokens), from decoder layer `layer` (default
-1 = the last, as the paper), averaged over the run's heads of that layer (all heads, or the
vision-critical heads of `--heads-json` that lie in it). Reward = tanh(log((a + eps) / (v + eps)))
(form "tanh", the code) or 0.5 (1 + tanh(...)) (form "paper"): > 0 (> 0.5) when the selected
tokens look at the box more than at the image on average.

Boxes come with the data: the rollout row's `boxes` field (`box_key`), a list of [x0, y0, x1, y1]
in pixels of the original first image, or of {"image": k, "box": [x0, y0, x1, y1]}. An image
token belongs to a box when its cell's centre lies inside it; a box that holds no cell centre
takes every cell it overlaps. The reward is a sequence reward (add it to the rollout's reward
before GRPO's normalisation); the token weights stay 1. Exported per token: `sayo_reward` (the
response's reward on every token), `region_attention` and `image_attention` (a_t, v_t).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from vlmcredit.analysis.selection import top_share
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods.logprob_options import check_score, entropy_of
from vlmcredit.methods.registry import Method, MethodOutput, Needs, SamplePasses, register


@dataclass
class SayoConfig:
    ENTROPY_VARIANTS: ClassVar[tuple[str, ...]] = ("image",)  # passes whose entropy is read
    ratio: float = 0.2  # top-entropy share of each response that is scored (paper: 20-40%)
    eps: float = 1e-6
    form: str = "tanh"  # "tanh" (code: in [-1, 1]) or "paper" (0.5 (1 + tanh), in [0, 1])
    layer: int = -1  # decoder layer whose attention is read; negative counts from the last
    box_key: str = "boxes"  # rollout field holding the target boxes
    temperature: float = 1.0
    top_p: float = 1.0

    def check(self) -> None:
        if not 0.0 < float(self.ratio) <= 1.0:
            raise VlmCreditError(f"sayo ratio {self.ratio}: must be in (0, 1]")
        if not float(self.eps) > 0:
            raise VlmCreditError(f"sayo eps {self.eps}: must be > 0")
        if self.form not in ("tanh", "paper"):
            raise VlmCreditError(f"sayo form {self.form!r}: use tanh or paper")
        check_score(self.temperature, self.top_p)


def region_reward(a: float, v: float, eps: float, form: str) -> float:
    r = float(np.tanh(np.log((a + eps) / (v + eps))))
    return 0.5 * (1.0 + r) if form == "paper" else r


def layer_attention(sample: SamplePasses, layer: int) -> np.ndarray:
    """(T, N) attention of decoder layer `layer`, averaged over the run's heads in it."""
    if sample.attention is None:
        raise VlmCreditError(f"sample {sample.sample_id}: the attention pass did not run")
    if sample.attention_layers is None or sample.num_layers is None:
        raise VlmCreditError(
            f"sample {sample.sample_id}: the attention pass does not say which layers it holds"
        )
    absolute = layer % sample.num_layers if layer < 0 else layer
    if absolute not in sample.attention_layers:
        raise VlmCreditError(
            f"sayo reads decoder layer {absolute}, which the run did not capture: add it to "
            f"--layers (now {sample.attention_layers}) or set -p sayo.layer=N"
        )
    li = sample.attention_layers.index(absolute)
    if sample.pairs is None:
        return sample.attention[li].mean(axis=0)
    heads = [h for layer_index, h in sample.pairs if layer_index == li]
    if not heads:
        raise VlmCreditError(
            f"sayo reads decoder layer {absolute}, but none of the run's chosen heads lies in it"
        )
    return sample.attention[li, heads].mean(axis=0)


def box_tokens(sample: SamplePasses, boxes: Any) -> np.ndarray:
    """(N,) bool: image tokens inside the target boxes (cell centre inside, else overlap)."""
    if sample.image_boxes is None or sample.image_owner is None:
        raise VlmCreditError(f"sample {sample.sample_id}: no image token layout")
    cells = np.asarray(sample.image_boxes, dtype=np.float64)
    owner = np.asarray(sample.image_owner)
    centre_x = (cells[:, 0] + cells[:, 2]) / 2
    centre_y = (cells[:, 1] + cells[:, 3]) / 2
    out = np.zeros(len(cells), dtype=bool)
    for image, (x0, y0, x1, y1) in _parse_boxes(sample, boxes):
        mine = owner == image
        inside = mine & (centre_x >= x0) & (centre_x < x1) & (centre_y >= y0) & (centre_y < y1)
        if not inside.any():
            inside = mine & (cells[:, 0] < x1) & (cells[:, 2] > x0) & (cells[:, 1] < y1)
            inside &= cells[:, 3] > y0
        out |= inside
    return out


def _parse_boxes(sample: SamplePasses, boxes: Any) -> list[tuple[int, tuple[float, ...]]]:
    where = f"sample {sample.sample_id}: boxes"
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise VlmCreditError(f"{where}: give a non-empty list of [x0, y0, x1, y1]")
    out = []
    for item in boxes:
        image, box = (
            (item.get("image", 0), item.get("box")) if isinstance(item, dict) else (0, item)
        )
        try:
            x0, y0, x1, y1 = (float(c) for c in box)
        except (TypeError, ValueError):
            raise VlmCreditError(f"{where}: {item!r} is not [x0, y0, x1, y1]") from None
        if not (x1 > x0 and y1 > y0):
            raise VlmCreditError(f"{where}: {item!r} needs x1 > x0 and y1 > y0")
        out.append((int(image), (x0, y0, x1, y1)))
    return out


def _boxes_of(sample: SamplePasses, key: str) -> Any:
    extra = sample.meta.get("extra") or {}
    boxes = extra.get(key, sample.meta.get(key))
    if boxes is None:
        raise VlmCreditError(
            f"sample {sample.sample_id}: has no {key!r} field; SAYO needs target boxes "
            "([x0, y0, x1, y1] in original-image pixels) per rollout"
        )
    return boxes


def compute(passes: Sequence[SamplePasses], cfg: SayoConfig) -> list[MethodOutput]:
    out = []
    for p in passes:
        entropy = entropy_of(p, "image", cfg.temperature, cfg.top_p)
        att = layer_attention(p, cfg.layer)
        region = box_tokens(p, _boxes_of(p, cfg.box_key))
        if not region.any():
            raise VlmCreditError(f"sample {p.sample_id}: its boxes cover no image token")
        a_t = att[:, region].mean(axis=1) if att.shape[0] else np.zeros(0)
        v_t = att.mean(axis=1) if att.shape[0] else np.zeros(0)
        chosen = top_share(entropy, cfg.ratio)
        reward = (
            region_reward(float(a_t[chosen].mean()), float(v_t[chosen].mean()), cfg.eps, cfg.form)
            if chosen.any()
            else 0.0
        )
        n = len(p.token_ids)
        out.append(
            MethodOutput(
                weight=np.ones(n, dtype=np.float32),
                mask=chosen,
                columns={
                    "sayo_reward": np.full(n, reward, dtype=np.float32),
                    "region_attention": a_t.astype(np.float32),
                    "image_attention": v_t.astype(np.float32),
                },
            )
        )
    return out


SAYO = register(
    Method(
        name="sayo",
        summary="SAYO: sequence reward tanh(log(a/v)) for last-layer attention on target boxes",
        paper="Do MLLMs Really See It: Reinforcing Visual Attention in Multimodal LLMs (SAYO)",
        config=SayoConfig,
        needs=lambda _cfg: Needs(attention=True, logprobs=("image",)),
        compute=compute,
        loss_denominator="all_tokens",
        selection_scope="per_response",
        columns={
            "sayo_reward": "float32",
            "region_attention": "float32",
            "image_attention": "float32",
        },
    )
)
