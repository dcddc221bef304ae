"""Helpers shared by tests (not fixtures): real images, the family list."""

from __future__ import annotations

import numpy as np

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe"]


def noise_image(height: int, width: int, seed: int = 0):
    """A real RGB PIL image of the given size with structured content (not flat)."""
    from PIL import Image

    rs = np.random.RandomState(seed)
    arr = (rs.rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(arr)
