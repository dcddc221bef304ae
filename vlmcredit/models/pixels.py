"""Images as the model saw them, rebuilt from a batch's `pixel_values` (trainer batches carry
no PIL images). Inverts the Qwen-VL processor's patch flattening and normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import ModelGeometry


def images_from_pixel_values(
    pixel_values: Any,
    image_grid_thw: Any,
    geometry: ModelGeometry,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> list[np.ndarray]:
    """(H, W, 3) uint8 per image (first frame), H = h * patch, W = w * patch of its grid.

    The processor orders each image's patches as (t, h/m, w/m, m, m) with each patch's values
    as (C, temporal, P, P) and normalises with (x / 255 - mean) / std; this undoes both.
    """
    pv = np.asarray(_numpy(pixel_values), dtype=np.float64)
    grids = np.asarray(_numpy(image_grid_thw), dtype=np.int64).reshape(-1, 3)
    p, m, tp = geometry.patch_size, geometry.merge_size, geometry.temporal_patch_size
    per_patch = 3 * tp * p * p
    if pv.ndim != 2 or pv.shape[1] != per_patch:
        raise VlmCreditError(
            f"batch: pixel_values has shape {tuple(pv.shape)}; expected (patches, {per_patch}) "
            "for this checkpoint's patch geometry"
        )
    if int(grids.prod(axis=1).sum()) != pv.shape[0]:
        raise VlmCreditError(
            f"batch: image_grid_thw covers {int(grids.prod(axis=1).sum())} patches but "
            f"pixel_values holds {pv.shape[0]}"
        )
    mean = np.asarray(image_mean, dtype=np.float64).reshape(3, 1, 1)
    std = np.asarray(image_std, dtype=np.float64).reshape(3, 1, 1)
    out, offset = [], 0
    for t, h, w in grids:
        n = int(t * h * w)
        block = pv[offset : offset + n].reshape(t, h // m, w // m, m, m, 3, tp, p, p)
        offset += n
        # (h/m, m, P, w/m, m, P, C) of the first frame -> (H, W, C)
        frame = block[0, :, :, :, :, :, 0].transpose(4, 0, 2, 5, 1, 3, 6)
        chw = frame.reshape(3, h * p, w * p)
        pixels = (chw * std + mean) * 255.0
        out.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0))
    return out


def _numpy(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x
