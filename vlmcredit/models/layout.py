"""Token layout: where the prompt, the response and every image cell sit in a sequence.

This is the one place that knows how Qwen-VL lays images out in the token stream, so every
probe, signal and report agrees on it. For each sample: the prompt span, the response span
(teacher-forced: response tokens appended after the generation prompt), each image's token
positions with their (image, t, row, col) cell in the merged grid, and the pixel box of each
cell in the *original* image. Handles several images per sample and left-padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import ModelGeometry


@dataclass(frozen=True)
class ImageLayout:
    """One image's tokens in one sample."""

    image_index: int  # index of the image within its sample
    grid_thw: tuple[int, int, int]  # patch grid (t, h, w) as in image_grid_thw
    positions: np.ndarray  # (N,) sequence positions of this image's tokens
    cells: np.ndarray  # (N, 3) (t, row, col) in the merged grid, row-major
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 in original-image pixels
    resized_size: tuple[int, int]  # (height, width) the vision tower saw
    original_size: tuple[int, int] | None  # (height, width) of the user's image

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def merged_grid(self) -> tuple[int, int, int]:
        """(t, rows, cols) of merged tokens."""
        return (int(self.cells[:, 0].max()) + 1, *self._rows_cols())

    def _rows_cols(self) -> tuple[int, int]:
        return int(self.cells[:, 1].max()) + 1, int(self.cells[:, 2].max()) + 1


@dataclass(frozen=True)
class SampleLayout:
    """Spans of one sample (one row of a possibly left-padded batch)."""

    batch_index: int
    seq_len: int  # padded length of the row
    prompt_span: tuple[int, int]  # [start, end) positions, start = first non-pad token
    response_span: tuple[int, int]  # [start, end)
    images: list[ImageLayout] = field(default_factory=list)

    @property
    def image_positions(self) -> np.ndarray:
        """All image-token positions of the sample, in image order."""
        if not self.images:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([im.positions for im in self.images])

    @property
    def image_token_owner(self) -> np.ndarray:
        """For each entry of `image_positions`, the index of the image it belongs to."""
        if not self.images:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.full(im.num_tokens, im.image_index) for im in self.images])

    @property
    def response_positions(self) -> np.ndarray:
        return np.arange(*self.response_span, dtype=np.int64)

    @property
    def num_response_tokens(self) -> int:
        return self.response_span[1] - self.response_span[0]


def build_mm_token_type_ids(input_ids: Any, geometry: ModelGeometry) -> Any:
    """0 = text, 1 = image token, 2 = video token, for the full sequence (torch or numpy)."""
    types = (input_ids == geometry.image_token_id) * 1 + (input_ids == geometry.video_token_id) * 2
    return types


def prompt_mm_token_type_ids(input_ids: Any, geometry: ModelGeometry, prompt_width: int) -> Any:
    """Type ids of a trainer batch (prompt block, then response block): image and video tokens
    count only in the prompt. A sampled response can contain the image pad id (a small or
    untrained policy emits any token); as the trainer's own forward does, it is text there, or
    M-RoPE would look for an image grid that does not exist."""
    types = build_mm_token_type_ids(input_ids, geometry)
    types[:, prompt_width:] = 0
    return types


def prompt_vision_ids(input_ids: Any, geometry: ModelGeometry, prompt_width: int) -> Any:
    """A copy of a trainer batch's ids whose response block holds no vision special ids (they
    become -1, which matches no token): layouts then see only the prompt's images."""
    ids = input_ids.clone()
    response = ids[:, prompt_width:]
    special = (
        geometry.image_token_id,
        geometry.video_token_id,
        geometry.vision_start_token_id,
        geometry.vision_end_token_id,
    )
    for token in special:
        response[response == token] = -1
    return ids


def prompt_image_positions(row_ids: Any, geometry: ModelGeometry, prompt_width: int) -> Any:
    """Image-token positions of one trainer-batch row, in its prompt block only (torch)."""
    import torch

    return torch.nonzero(row_ids[:prompt_width] == geometry.image_token_id).flatten()


def _runs(positions: np.ndarray) -> list[np.ndarray]:
    """Split sorted positions into maximal runs of consecutive integers."""
    if positions.size == 0:
        return []
    breaks = np.nonzero(np.diff(positions) != 1)[0] + 1
    return np.split(positions, breaks)


def image_cells(
    grid_thw: Sequence[int],
    geometry: ModelGeometry,
    original_size: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(t, row, col) of every merged token of one image, and its box in original pixels.

    Tokens are row-major over (t, h // m, w // m). Cell (r, c) covers pixels
    [c*P, (c+1)*P) x [r*P, (r+1)*P) of the resized image, P = patch * merge; boxes are scaled
    per axis back to the original size (the resize keeps each axis linear).
    """
    t, h, w = (int(x) for x in grid_thw)
    m = geometry.merge_size
    rows, cols = h // m, w // m
    tt, rr, cc = np.meshgrid(np.arange(t), np.arange(rows), np.arange(cols), indexing="ij")
    cells = np.stack([tt.ravel(), rr.ravel(), cc.ravel()], axis=1).astype(np.int64)
    cell_px = geometry.cell_pixels
    resized = (h * geometry.patch_size, w * geometry.patch_size)
    sy, sx = (1.0, 1.0)
    if original_size is not None:
        sy = original_size[0] / resized[0]
        sx = original_size[1] / resized[1]
    x0 = cells[:, 2] * cell_px * sx
    y0 = cells[:, 1] * cell_px * sy
    boxes = np.stack([x0, y0, x0 + cell_px * sx, y0 + cell_px * sy], axis=1)
    return cells, boxes, resized


def build_layouts(
    input_ids: Any,
    attention_mask: Any | None,
    image_grid_thw: Any | None,
    geometry: ModelGeometry,
    response_spans: Sequence[tuple[int, int]],
    original_sizes: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> list[SampleLayout]:
    """Layouts for a batch of token sequences as the model sees them.

    `image_grid_thw` lists the images of row 0, then row 1, ... (processor order).
    `response_spans` gives each row's response [start, end) in padded positions;
    `original_sizes[b][i]` is the (height, width) of image i of row b, for pixel boxes.
    Raises `VlmCreditError` when image tokens and `image_grid_thw` disagree (truncation).
    """
    ids = np.asarray(_to_numpy(input_ids))
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(_to_numpy(attention_mask))
    grids = (
        np.zeros((0, 3), dtype=np.int64) if image_grid_thw is None else _to_numpy(image_grid_thw)
    )
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    if len(response_spans) != ids.shape[0]:
        raise ValueError("response_spans needs one (start, end) per row")
    m2 = geometry.merge_size**2

    layouts: list[SampleLayout] = []
    next_grid = 0
    for b in range(ids.shape[0]):
        row = ids[b]
        if (row == geometry.video_token_id).any():
            raise VlmCreditError(f"sample {b}: contains video tokens; only images are supported")
        valid = np.nonzero(mask[b])[0]
        if valid.size == 0:
            raise VlmCreditError(f"sample {b}: attention_mask is all zeros (empty sequence)")
        start = int(valid[0])
        image_positions = np.nonzero((row == geometry.image_token_id) & (mask[b] > 0))[0]
        runs = _runs(image_positions)
        images: list[ImageLayout] = []
        for i, positions in enumerate(runs):
            if next_grid >= len(grids):
                raise VlmCreditError(
                    f"sample {b}: {len(runs)} image token blocks but image_grid_thw has only "
                    f"{len(grids)} images for the batch; pass every image's grid"
                )
            grid = grids[next_grid]
            next_grid += 1
            expected = int(grid.prod()) // m2
            if positions.size != expected:
                raise VlmCreditError(
                    f"sample {b}, image {i}: {positions.size} image tokens but image_grid_thw "
                    f"{grid.tolist()} needs t*h*w/m^2 = {expected}; the sequence was probably "
                    "truncated: raise the max length or shrink the image (max_pixels)"
                )
            orig = None
            if original_sizes is not None and i < len(original_sizes[b]):
                orig = tuple(int(x) for x in original_sizes[b][i])
            cells, boxes, resized = image_cells(grid, geometry, orig)  # type: ignore[arg-type]
            images.append(
                ImageLayout(
                    i,
                    tuple(int(x) for x in grid),
                    positions.astype(np.int64),
                    cells,
                    boxes,
                    resized,
                    orig,
                )  # type: ignore[arg-type]
            )
        r0, r1 = (int(x) for x in response_spans[b])
        if not (start <= r0 <= r1 <= ids.shape[1]):
            raise VlmCreditError(
                f"sample {b}: response span ({r0}, {r1}) lies outside the sequence "
                f"[{start}, {ids.shape[1]})"
            )
        if images and images[-1].positions[-1] >= r0:
            raise VlmCreditError(f"sample {b}: image tokens inside the response span")
        layouts.append(SampleLayout(b, int(ids.shape[1]), (start, r0), (r0, r1), images))
    if next_grid != len(grids):
        raise VlmCreditError(
            f"image_grid_thw lists {len(grids)} images but the sequences hold {next_grid} image "
            "token blocks; the sequence was probably truncated: raise the max length"
        )
    return layouts


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x
