"""Image features computed once per image and reused: the vision tower's outputs, a bounded
cache keyed by the pixels, and the `mm_encoder_outputs` argument that hands them back to the
model (also inside `generate()`), so head ablation never re-runs the vision tower."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import adapter_of, model_device


@dataclass
class ImageFeatures:
    """One image's vision-tower outputs: merged-token embeddings (+ Qwen3-VL deepstack maps)."""

    embeds: torch.Tensor  # (tokens, hidden)
    deepstack: tuple[torch.Tensor, ...]  # one (tokens, hidden) per deepstack layer; () otherwise
    output_type: type  # the model's own output class, rebuilt for `mm_encoder_outputs`

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, *self.deepstack))


class ImageFeatureCache:
    """Image features by key, bounded in bytes (`max_bytes` 0 disables caching).

    Admission is first come until full, without eviction: a head-ablation run scans the same
    images in the same order once per configuration, and on such a cyclic scan LRU would evict
    every entry just before its reuse (0 hits) while keeping the first ones gives
    capacity / set-size hits.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise VlmCreditError(f"--feature-cache-mb: must be >= 0, got {max_bytes} bytes")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.rejected = 0
        self.computed = 0  # vision-tower runs made through this cache's users
        self._items: dict[str, ImageFeatures] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> ImageFeatures | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
        else:
            self.hits += 1
        return item

    def fits(self, nbytes: int) -> bool:
        return self.nbytes + nbytes <= self.max_bytes

    def put(self, key: str, features: ImageFeatures) -> bool:
        """Store unless it would exceed the bound; True when stored (or already there)."""
        if key in self._items:
            return True
        if not self.fits(features.nbytes):
            self.rejected += 1
            return False
        self._items[key] = features
        self.nbytes += features.nbytes
        return True

    def stats(self) -> dict[str, int]:
        return {
            "max_bytes": self.max_bytes,
            "bytes": self.nbytes,
            "entries": len(self._items),
            "hits": self.hits,
            "misses": self.misses,
            "rejected": self.rejected,
            "vision_runs": self.computed,
        }


def image_key(pixel_values: torch.Tensor, grid: Sequence[int]) -> str:
    """sha1 of one image's processed pixels, their dtype/shape and its (t, h, w) patch grid."""
    pixels = pixel_values.detach().to("cpu").contiguous()
    h = hashlib.sha1()
    h.update(f"{tuple(int(g) for g in grid)}|{pixels.dtype}|{tuple(pixels.shape)}".encode())
    h.update(pixels.view(torch.uint8).numpy().data if pixels.numel() else b"")
    return h.hexdigest()


def compute_image_features(model: Any, pixel_values: torch.Tensor, grid: Any) -> ImageFeatures:
    """Run the vision tower on one image ((patches, dim) pixels, (1, 3) grid)."""
    device = model_device(model)
    grid = torch.as_tensor(grid, dtype=torch.long).reshape(1, 3)
    with torch.no_grad():
        out = adapter_of(model).image_features(model, pixel_values.to(device), grid.to(device))
    deepstack = getattr(out, "deepstack_features", None) or ()
    return ImageFeatures(out.pooler_output[0], tuple(f[0] for f in deepstack), type(out))


def encoder_outputs(features: Sequence[ImageFeatures]) -> dict[str, Any]:
    """`mm_encoder_outputs` for a batch whose image tokens belong to `features`, in order."""
    first = features[0]
    kwargs: dict[str, Any] = {"pooler_output": tuple(f.embeds for f in features)}
    if first.deepstack:
        kwargs["deepstack_features"] = [
            tuple(f.deepstack[layer] for f in features) for layer in range(len(first.deepstack))
        ]
    return {"image": first.output_type(**kwargs)}
