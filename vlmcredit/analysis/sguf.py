"""SGUF (KAWHI Sec. 3.2, Alg. 1): structure-guided union-find key regions on the token grid.

One image, as the model's processor resized it, cut into the merged-token grid (cell side =
patch_size x merge_size: 28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL), one cell per image token:

1. CIELab luminance L in [0, 100] (sRGB, D65), Gaussian blur (sigma 1.0), Sobel gx, gy;
2. per cell the structure tensor normalised by its area (mean of gx^2, gx gy, gy^2 over the
   cell, Eq. 5-6), its eigenvalues l_max >= l_min >= 0 and the cell's mean (blurred) L;
3. union-find over 4-neighbour cells with the dual threshold of Eq. 8 (both strict):
   ||diag(l_max, l_min)_i - diag(...)_j||_F / max(l_max_i, l_max_j, l_min_i, l_min_j, eps)
   < delta_s and |L_i - L_j| < delta_l;
4. component energy E = mean(l_max + l_min) over its cells (Eq. 9), tau = beta x median(E)
   (Eq. 10); key components have E > tau;
5. selection (Eq. 11): every cell of a key component, plus a random (1 - r_skip) share of the
   background cells (seeded). Ablations (paper Table 3): "all" cells, "random" cells (as many
   as SGUF selects), "inverse" (the cells SGUF leaves out).

Everything is vectorised numpy: the filters are written as shifted-slice sums on float32
(several times faster here than generic 1-D correlation), the grid statistics are reshaped
sums, and the union-find is scipy's connected components over the merge edges (the
components of union-find over those edges; the tests compare with a plain union-find).
Gaussian: radius ceil(3 sigma) (7 taps at sigma 1, OpenCV's size), reflect-101 borders for the
blur and the Sobel; gradient scale does not matter (every threshold is a ratio or relative to
the median).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError

SELECTIONS = ("sguf", "all", "random", "inverse")


@dataclass
class SgufConfig:
    """SGUF parameters; defaults are the paper's (Sec. 3.2 and appendix A)."""

    sigma: float = 1.0  # Gaussian blur of L before the Sobel
    delta_s: float = 0.5  # structure threshold of the merge rule (Eq. 8)
    delta_l: float = 30.0  # luminance threshold of the merge rule, L units
    beta: float = 0.1  # tau = beta * median component energy (the "energy threshold")
    r_skip: float = 0.7  # share of background cells *not* kept (Eq. 11)
    selection: str = "sguf"  # sguf | all | random | inverse (ablations)
    seed: int = 0  # background sampling (and "random") seed; mixed with each image's key
    eps: float = 1e-8  # floor of the structure term's denominator

    def check(self) -> None:
        if not self.sigma > 0:
            raise VlmCreditError(f"sguf sigma={self.sigma}: must be > 0")
        if not (self.delta_s > 0 and self.delta_l > 0 and self.beta >= 0 and self.eps > 0):
            raise VlmCreditError(
                f"sguf thresholds delta_s={self.delta_s}, delta_l={self.delta_l}, "
                f"beta={self.beta}, eps={self.eps}: delta_s, delta_l, eps > 0 and beta >= 0"
            )
        if not 0.0 <= self.r_skip <= 1.0:
            raise VlmCreditError(f"sguf r_skip={self.r_skip}: must lie in [0, 1]")
        if self.selection not in SELECTIONS:
            raise VlmCreditError(
                f"sguf selection={self.selection!r}: choose one of {', '.join(SELECTIONS)}"
            )


@dataclass
class SgufResult:
    """One image's SGUF, per cell in row-major order (index = row * cols + col)."""

    rows: int
    cols: int
    l_max: np.ndarray  # (C,) float32
    l_min: np.ndarray  # (C,) float32
    luminance: np.ndarray  # (C,) float32 mean blurred L of the cell
    component: np.ndarray  # (C,) int32, components numbered by their first cell
    energy: np.ndarray  # (K,) float64 per component
    tau: float
    key: np.ndarray  # (C,) bool: cell of a key component
    selected: np.ndarray  # (C,) bool: cell kept by the chosen selection

    @property
    def cell_energy(self) -> np.ndarray:
        return self.energy[self.component]

    @property
    def num_cells(self) -> int:
        return self.rows * self.cols


# -- luminance ------------------------------------------------------------------------------
def _luminance_tables() -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point tables: per channel 8-bit -> linear-light share of Y (sum <= 65535), and
    the 16-bit Y -> L table. Three gathers and one lookup replace pow/cbrt per pixel; L is off
    by at most ~0.02 (Y quantised to 1/65535, steepest near black)."""
    c = np.arange(256) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    # sRGB -> XYZ (D65) Y row; the three weights sum to 1, so the sum fits in 16 bits
    weights = (0.2126729, 0.7151522, 0.0721750)
    per_channel = np.stack([np.floor(linear * w * 65535.0 + 0.5) for w in weights])
    per_channel[:, -1] += 65535 - per_channel[:, -1].sum()  # white maps to Y = 1 exactly
    y = np.arange(65536) / 65535.0
    f = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29)
    return per_channel.astype(np.uint16), (116.0 * f - 16.0).astype(np.float32)


_CHANNEL_Y, _Y_TO_L = _luminance_tables()


def lab_luminance(rgb: np.ndarray) -> np.ndarray:
    """CIELab L in [0, 100] of an (H, W, 3) uint8 sRGB image (or (H, W) grey), float32."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise VlmCreditError(f"sguf: image must be uint8, got {rgb.dtype}")
    if rgb.ndim == 2:
        return _Y_TO_L[np.take(_CHANNEL_Y.sum(axis=0, dtype=np.uint32).astype(np.uint16), rgb)]
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise VlmCreditError(f"sguf: image must be (H, W, 3) RGB, got shape {rgb.shape}")
    y = np.take(_CHANNEL_Y[0], rgb[..., 0])
    y += np.take(_CHANNEL_Y[1], rgb[..., 1])
    y += np.take(_CHANNEL_Y[2], rgb[..., 2])
    return np.take(_Y_TO_L, y)


# -- filters ----------------------------------------------------------------------------------
def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _symmetric_pass(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Valid correlation of `x` with a symmetric kernel along `axis` (shrinks by 2 radius)."""
    r = len(kernel) // 2
    n = x.shape[axis] - 2 * r

    def part(offset: int) -> np.ndarray:
        return x[r + offset : r + offset + n] if axis == 0 else x[:, r + offset : r + offset + n]

    out = part(0) * kernel[r]
    pair = np.empty_like(out)
    for k in range(1, r + 1):
        np.add(part(-k), part(k), out=pair)
        pair *= kernel[r + k]
        out += pair
    return out


def gradients(luminance: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(blurred L, gx, gy), each (H, W) float32: Gaussian(sigma) then 3x3 Sobel.

    Padded once by reflect-101 (radius + 1): for a symmetric kernel, blurring the padded image
    gives exactly the reflect-101 padding of the blurred image, so the Sobel's own border comes
    out right without a second pad.
    """
    kernel = gaussian_kernel(sigma)
    r = len(kernel) // 2
    pad = r + 1
    h, w = luminance.shape
    if h < 2 or w < 2:
        raise VlmCreditError(f"sguf: image {w}x{h} px is too small for a gradient")
    # reflect-101 needs pad < side; wrap small images with repeated reflection (np.pad does)
    padded = np.pad(luminance.astype(np.float32, copy=False), pad, mode="reflect")
    blurred = _symmetric_pass(_symmetric_pass(padded, kernel, 1), kernel, 0)  # (H+2, W+2)
    dx = blurred[:, 2:] - blurred[:, :-2]  # (H+2, W)
    gx = dx[:-2] + dx[2:]
    gx += 2.0 * dx[1:-1]
    dy = blurred[2:] - blurred[:-2]  # (H, W+2)
    gy = dy[:, :-2] + dy[:, 2:]
    gy += 2.0 * dy[:, 1:-1]
    return blurred[1:-1, 1:-1], gx, gy


def _cell_means(x: np.ndarray, rows: int, cols: int, cell: int) -> np.ndarray:
    """(rows, cols) mean of each cell x cell block (two reshaped sums: rows, then columns)."""
    per_row = x.reshape(rows, cell, cols * cell).sum(axis=1)
    return per_row.reshape(rows, cols, cell).sum(axis=2) / float(cell * cell)


def cell_features(
    rgb: np.ndarray, cell: int, sigma: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(l_max, l_min, mean L) per cell, each (rows, cols): structure-tensor eigenvalues of the
    area-normalised tensor (Eq. 5-6) and the cell's mean blurred luminance."""
    h, w = rgb.shape[:2]
    if cell < 1 or h % cell or w % cell:
        raise VlmCreditError(
            f"sguf: image {w}x{h} px is not a whole number of {cell}-px cells; resize it to "
            "the token grid first (resize_for_grid)"
        )
    rows, cols = h // cell, w // cell
    blurred, gx, gy = gradients(lab_luminance(rgb), sigma)
    a = _cell_means(gx * gx, rows, cols, cell)
    b = _cell_means(gx * gy, rows, cols, cell)
    c = _cell_means(gy * gy, rows, cols, cell)
    lum = _cell_means(blurred, rows, cols, cell)
    # closed-form eigenvalues of [[a, b], [b, c]] (PSD): mean +- sqrt(((a - c) / 2)^2 + b^2)
    half_trace = 0.5 * (a + c)
    root = np.sqrt(0.25 * (a - c) ** 2 + b * b)
    l_max = half_trace + root
    l_min = np.maximum(half_trace - root, 0.0)  # rounding can dip below 0
    return l_max.astype(np.float32), l_min.astype(np.float32), lum.astype(np.float32)


# -- union-find ---------------------------------------------------------------------------------
def merge_edges(
    l_max: np.ndarray,
    l_min: np.ndarray,
    luminance: np.ndarray,
    delta_s: float,
    delta_l: float,
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """The 4-neighbour pairs (i, j) (flat row-major indices) that Eq. 8 merges."""
    rows, cols = l_max.shape
    index = np.arange(rows * cols).reshape(rows, cols)
    lo = np.asarray(l_max, np.float64)
    mn = np.asarray(l_min, np.float64)
    lum = np.asarray(luminance, np.float64)
    firsts, seconds = [], []
    for sl_a, sl_b in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),  # right neighbour
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),  # lower neighbour
    ):
        structure = np.hypot(lo[sl_a] - lo[sl_b], mn[sl_a] - mn[sl_b])
        scale = np.maximum(np.maximum(lo[sl_a], lo[sl_b]), np.maximum(mn[sl_a], mn[sl_b]))
        merge = (structure / np.maximum(scale, eps) < delta_s) & (
            np.abs(lum[sl_a] - lum[sl_b]) < delta_l
        )
        firsts.append(index[sl_a][merge])
        seconds.append(index[sl_b][merge])
    return np.concatenate(firsts), np.concatenate(seconds)


def components(num_cells: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Component label per cell (the union-find partition of the merge edges), numbered
    0, 1, ... in the order of each component's first cell."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix(
        (np.ones(len(first), dtype=np.int8), (first, second)), shape=(num_cells, num_cells)
    )
    _, labels = connected_components(graph, directed=False)
    # renumber by first appearance so labels do not depend on the library's traversal order
    _, first_cell, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_cell))
    return order[inverse].astype(np.int32)


# -- selection ----------------------------------------------------------------------------------
def select_cells(
    key: np.ndarray, cfg: SgufConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(SGUF selection, the chosen selection) over cells.

    Background cells are sampled over all background cells at once: round((1 - r_skip) x
    count) of them. Sampling each background component separately (Eq. 11 read literally)
    would round every small component to zero cells.
    """
    n = key.shape[0]
    background = np.flatnonzero(~key)
    take = round((1.0 - cfg.r_skip) * background.size)
    sguf = key.copy()
    if take:
        sguf[rng.choice(background, size=take, replace=False)] = True
    if cfg.selection == "sguf":
        return sguf, sguf
    if cfg.selection == "all":
        return sguf, np.ones(n, dtype=bool)
    if cfg.selection == "inverse":
        return sguf, ~sguf
    chosen = np.zeros(n, dtype=bool)  # "random": as many cells as SGUF keeps, anywhere
    chosen[rng.choice(n, size=int(sguf.sum()), replace=False)] = True
    return sguf, chosen


def sguf(rgb: np.ndarray, cell: int, cfg: SgufConfig, key: int = 0) -> SgufResult:
    """SGUF of one (H, W, 3) uint8 image already at the grid size (H, W multiples of `cell`).

    `key` (e.g. a crc32 of the sample id and image index) is mixed with `cfg.seed`, so every
    image draws its own background sample, independent of batch order.
    """
    l_max, l_min, lum = cell_features(rgb, cell, cfg.sigma)
    rows, cols = l_max.shape
    first, second = merge_edges(l_max, l_min, lum, cfg.delta_s, cfg.delta_l, cfg.eps)
    label = components(rows * cols, first, second)
    trace = (l_max + l_min).ravel().astype(np.float64)
    sizes = np.bincount(label)
    energy = np.bincount(label, weights=trace) / sizes
    tau = float(cfg.beta * np.median(energy))
    is_key = (energy > tau)[label]
    rng = np.random.default_rng([cfg.seed, key])
    _, selected = select_cells(is_key, cfg, rng)
    return SgufResult(
        rows, cols, l_max.ravel(), l_min.ravel(), lum.ravel(), label, energy, tau, is_key, selected
    )


def resize_for_grid(image: Any, rows: int, cols: int, cell: int) -> np.ndarray:
    """An image (PIL or uint8 array) as the processor resizes it for a rows x cols token
    grid: RGB, bicubic to (rows * cell, cols * cell) px, uint8. Unchanged when it already has
    that size (e.g. rebuilt from a trainer batch's pixel values)."""
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    size = (cols * cell, rows * cell)
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)
