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
(several times faster here than generic 1-D correlation), run over bands of a few cell rows
into reused buffers that stay in cache, the grid statistics are reshaped sums, and the
union-find is a connected-component labelling of the merge edges on the grid (the components
of union-find over those edges; the tests compare with a plain union-find).
Gaussian: radius ceil(3 sigma) (7 taps at sigma 1, OpenCV's size), reflect-101 borders for the
blur and the Sobel; gradient scale does not matter (every threshold is a ratio or relative to
the median).
"""

from __future__ import annotations

import itertools
import math
import threading
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
def _luminance_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-point tables: per channel 8-bit -> linear-light share of Y (sum <= 65535), the
    red + green shares indexed by g * 256 + r, and the 16-bit Y -> L table. Two gathers, one
    add and one lookup replace pow/cbrt per pixel; L is off by at most ~0.02 (Y quantised to
    1/65535, steepest near black)."""
    c = np.arange(256) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    # sRGB -> XYZ (D65) Y row; the three weights sum to 1, so the sum fits in 16 bits
    weights = (0.2126729, 0.7151522, 0.0721750)
    per_channel = np.stack([np.floor(linear * w * 65535.0 + 0.5) for w in weights])
    per_channel[:, -1] += 65535 - per_channel[:, -1].sum()  # white maps to Y = 1 exactly
    red_green = (per_channel[1][:, None] + per_channel[0][None, :]).ravel()  # [g * 256 + r]
    y = np.arange(65536) / 65535.0
    f = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29)
    to_l = (116.0 * f - 16.0).astype(np.float32)
    return per_channel.astype(np.uint16), red_green.astype(np.uint16), to_l


_CHANNEL_Y, _RED_GREEN_Y, _Y_TO_L = _luminance_tables()


def _luma_y(rgb: np.ndarray) -> np.ndarray:
    """16-bit Y of a C-contiguous (H, W, 3) uint8 image (or (H, W) grey).

    The red and green bytes of a pixel, read together as one little-endian uint16 (an
    unaligned strided view, no copy), index the joint red + green table: one gather instead
    of two over the interleaved channels, the costliest step of the conversion."""
    if rgb.ndim == 2:
        return np.take(_CHANNEL_Y.sum(axis=0, dtype=np.uint32).astype(np.uint16), rgb)
    red_green = np.ndarray(rgb.shape[:2], dtype="<u2", buffer=rgb, strides=rgb.strides[:2])
    y = np.take(_RED_GREEN_Y, red_green)
    y += np.take(_CHANNEL_Y[2], rgb[..., 2])
    return y


def _checked_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise VlmCreditError(f"sguf: image must be uint8, got {rgb.dtype}")
    if rgb.ndim != 2 and (rgb.ndim != 3 or rgb.shape[2] != 3):
        raise VlmCreditError(f"sguf: image must be (H, W, 3) RGB, got shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def lab_luminance(rgb: np.ndarray) -> np.ndarray:
    """CIELab L in [0, 100] of an (H, W, 3) uint8 sRGB image (or (H, W) grey), float32."""
    return np.take(_Y_TO_L, _luma_y(_checked_rgb(rgb)))


# -- filters ----------------------------------------------------------------------------------
def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _symmetric_pass(
    x: np.ndarray,
    kernel: np.ndarray,
    axis: int,
    out: np.ndarray | None = None,
    pair: np.ndarray | None = None,
) -> np.ndarray:
    """Valid correlation of `x` with a symmetric kernel along `axis` (shrinks by 2 radius),
    into `out` (scratch `pair`) when given."""
    r = len(kernel) // 2
    n = x.shape[axis] - 2 * r

    def part(offset: int) -> np.ndarray:
        return x[r + offset : r + offset + n] if axis == 0 else x[:, r + offset : r + offset + n]

    out = np.multiply(part(0), kernel[r], out=out)
    pair = np.empty_like(out) if pair is None else pair
    for k in range(1, r + 1):
        np.add(part(-k), part(k), out=pair)
        pair *= kernel[r + k]
        out += pair
    return out


def _sobel(blurred: np.ndarray, out: tuple[np.ndarray, ...]) -> None:
    """3x3 Sobel of (h + 2, w + 2) `blurred` into out = (gx, gy, dx, dy, tmp): gx, gy, tmp
    (h, w), scratch dx (h + 2, w) and dy (h, w + 2)."""
    gx, gy, dx, dy, tmp = out
    np.subtract(blurred[:, 2:], blurred[:, :-2], out=dx)
    np.add(dx[:-2], dx[2:], out=gx)
    gx += np.multiply(dx[1:-1], 2.0, out=tmp)
    np.subtract(blurred[2:], blurred[:-2], out=dy)
    np.add(dy[:, :-2], dy[:, 2:], out=gy)
    gy += np.multiply(dy[:, 1:-1], 2.0, out=tmp)


def gradients(luminance: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(blurred L, gx, gy), each (H, W) float32: Gaussian(sigma) then 3x3 Sobel, whole image.

    Padded once by reflect-101 (radius + 1): for a symmetric kernel, blurring the padded image
    gives exactly the reflect-101 padding of the blurred image, so the Sobel's own border comes
    out right without a second pad. `cell_features` runs the same arithmetic band by band.
    """
    kernel = gaussian_kernel(sigma)
    pad = len(kernel) // 2 + 1
    h, w = luminance.shape
    if h < 2 or w < 2:
        raise VlmCreditError(f"sguf: image {w}x{h} px is too small for a gradient")
    # reflect-101 needs pad < side; wrap small images with repeated reflection (np.pad does)
    padded = np.pad(luminance.astype(np.float32, copy=False), pad, mode="reflect")
    blurred = _symmetric_pass(_symmetric_pass(padded, kernel, 1), kernel, 0)  # (H+2, W+2)
    gx, gy, tmp = (np.empty((h, w), np.float32) for _ in range(3))
    _sobel(
        blurred, (gx, gy, np.empty((h + 2, w), np.float32), np.empty((h, w + 2), np.float32), tmp)
    )
    return blurred[1:-1, 1:-1], gx, gy


def _cell_means(x: np.ndarray, rows: int, cols: int, cell: int) -> np.ndarray:
    """(rows, cols) mean of each cell x cell block (two reshaped sums: rows, then columns)."""
    per_row = x.reshape(rows, cell, cols * cell).sum(axis=1)
    return per_row.reshape(rows, cols, cell).sum(axis=2) / float(cell * cell)


# Pixels per band of cell rows: the band's dozen float32 buffers then stay near the CPU's L2
# cache instead of streaming ~50 full-image temporaries (each freshly page-faulted) through
# memory, which made the whole-image version ~2x slower (benchmarks/RESULTS.md, SGUF).
_BAND_PIXELS = 1 << 17


class _Plan:
    """Everything `cell_features` derives from an image shape: the kernel, the reflect-101
    source row / column of every padded index, the bands of cell rows, and scratch buffers
    sized for the tallest band."""

    def __init__(self, h: int, w: int, cell: int, sigma: float) -> None:
        self.kernel = gaussian_kernel(sigma)
        self.pad = pad = len(self.kernel) // 2 + 1
        # np.pad of the indices gives its own padding's sources (repeated for tiny images)
        self.row_source = np.pad(np.arange(h), pad, mode="reflect")
        self.col_source = np.pad(np.arange(w), pad, mode="reflect")
        rows = h // cell
        per_band = max(1, _BAND_PIXELS // ((w + 2 * pad) * cell))
        bounds = np.linspace(0, rows, -(-rows // per_band) + 1).round().astype(int).tolist()
        self.bands = list(itertools.pairwise(bounds))
        height = max(r1 - r0 for r0, r1 in self.bands) * cell

        def buf(rows: int, width: int, memory: np.ndarray | None = None) -> np.ndarray:
            if memory is None:
                return np.empty((rows, width), np.float32)
            return memory.reshape(-1)[: rows * width].reshape(rows, width)

        # 9 buffers for 12 roles (a small footprint stays in cache): the Sobel differences
        # reuse L (done after the horizontal pass) and the pass scratch (done after the
        # vertical pass); the two passes share one scratch
        self.lum = buf(height + 2 * pad, w + 2 * pad)
        self.row_pass, self.row_pair = buf(height + 2 * pad, w + 2), buf(height + 2 * pad, w + 2)
        self.blurred, self.col_pair = buf(height + 2, w + 2), buf(height + 2, w + 2, self.row_pair)
        self.dx, self.dy = buf(height + 2, w, self.lum), buf(height, w + 2, self.row_pair)
        # gx, gy and the three products stacked, so one call multiplies or sums them all
        self.grad = np.empty((2, height, w), np.float32)
        self.products = np.empty((3, height, w), np.float32)


_PLAN = threading.local()


def _plan(h: int, w: int, cell: int, sigma: float) -> _Plan:
    """This thread's plan for that shape, reused across calls.

    Fresh buffers of this size come from mmap, and touching their pages again on every call
    cost as much as the filtering itself; one image shape (the processor's) is the common case,
    so the last shape's plan (~14 bytes per pixel of a band; ~5 MB at 1120 px wide) is kept per
    thread.
    """
    key = (h, w, cell, sigma, _BAND_PIXELS)
    if getattr(_PLAN, "key", None) != key:
        _PLAN.key, _PLAN.plan = key, _Plan(h, w, cell, sigma)
    return _PLAN.plan


def cell_features(
    rgb: np.ndarray, cell: int, sigma: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(l_max, l_min, mean L) per cell, each (rows, cols): structure-tensor eigenvalues of the
    area-normalised tensor (Eq. 5-6) and the cell's mean blurred luminance.

    Runs in bands of whole cell rows, each with its reflect-101 halo, through the same
    float32 operations as `gradients` + `_cell_means` on the whole image, so the result is
    bit-identical to that (tested) at about half the time.
    """
    rgb = _checked_rgb(rgb)
    h, w = rgb.shape[:2]
    if cell < 1 or h % cell or w % cell:
        raise VlmCreditError(
            f"sguf: image {w}x{h} px is not a whole number of {cell}-px cells; resize it to "
            "the token grid first (resize_for_grid)"
        )
    if h < 2 or w < 2:
        raise VlmCreditError(f"sguf: image {w}x{h} px is too small for a gradient")
    rows, cols = h // cell, w // cell
    plan = _plan(h, w, cell, sigma)
    kernel, pad, row_source = plan.kernel, plan.pad, plan.row_source
    sums = np.empty((4, rows, cols), np.float32)
    last = 0  # padded rows of the previous band (0: none)
    for r0, r1 in plan.bands:
        band = (r1 - r0) * cell
        n = band + 2 * pad
        lum, row_pass = plan.lum[:n], plan.row_pass[:n]
        # the top 2 pad rows of a band are the bottom ones of the previous band: copy their
        # horizontal pass instead of converting and filtering them again
        carry = 2 * pad if last >= 4 * pad else 0
        if carry:
            row_pass[:carry] = plan.row_pass[last - carry : last]
        last = n
        source = row_source[r0 * cell + carry : r1 * cell + 2 * pad]
        lo, hi = int(source[0]), int(source[-1])
        # interior bands are a plain slice; border bands gather their reflected rows
        part = rgb[lo : hi + 1] if hi - lo == len(source) - 1 else rgb[source]
        y = _luma_y(part)
        new = lum[carry:]
        if w > pad:  # reflect-101 columns by slicing (np.pad's result, without its overhead)
            np.take(_Y_TO_L, y, out=new[:, pad:-pad])
            new[:, :pad] = new[:, 2 * pad : pad : -1]
            new[:, -pad:] = new[:, -pad - 2 : -2 * pad - 2 : -1]
        else:
            np.take(_Y_TO_L, np.take(y, plan.col_source, axis=1), out=new)
        _symmetric_pass(new, kernel, 1, row_pass[carry:], plan.row_pair[: n - carry])
        blurred = _symmetric_pass(
            row_pass, kernel, 0, plan.blurred[: band + 2], plan.col_pair[: band + 2]
        )
        grad, products = plan.grad[:, :band], plan.products[:, :band]
        _sobel(blurred, (grad[0], grad[1], plan.dx[: band + 2], plan.dy[:band], products[0]))
        np.multiply(grad[:1], grad, out=products[:2])  # gx gx, gx gy
        np.multiply(grad[1], grad[1], out=products[2])  # gy gy
        k = r1 - r0
        # cell sums as in `_cell_means` (same reduction order), divided by the area below
        per_row = products.reshape(3, k, cell, w).sum(axis=2)
        sums[:3, r0:r1] = per_row.reshape(3, k, cols, cell).sum(axis=3)
        per_row_l = blurred[1:-1, 1:-1].reshape(k, cell, w).sum(axis=1)
        sums[3, r0:r1] = per_row_l.reshape(k, cols, cell).sum(axis=2)
    a, b, c, lum_mean = sums / float(cell * cell)
    # closed-form eigenvalues of [[a, b], [b, c]] (PSD): mean +- sqrt(((a - c) / 2)^2 + b^2)
    half_trace = 0.5 * (a + c)
    root = np.sqrt(0.25 * (a - c) ** 2 + b * b)
    l_max = half_trace + root
    l_min = np.maximum(half_trace - root, 0.0)  # rounding can dip below 0
    return l_max.astype(np.float32), l_min.astype(np.float32), lum_mean


# -- union-find ---------------------------------------------------------------------------------
def merge_masks(
    l_max: np.ndarray,
    l_min: np.ndarray,
    luminance: np.ndarray,
    delta_s: float,
    delta_l: float,
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8 on the grid: (rows, cols - 1) bool "merges with its right neighbour" and
    (rows - 1, cols) bool "merges with the cell below"."""
    lo = np.asarray(l_max, np.float64)
    mn = np.asarray(l_min, np.float64)
    lum = np.asarray(luminance, np.float64)
    masks = []
    for sl_a, sl_b in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),  # right neighbour
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),  # lower neighbour
    ):
        structure = np.hypot(lo[sl_a] - lo[sl_b], mn[sl_a] - mn[sl_b])
        scale = np.maximum(np.maximum(lo[sl_a], lo[sl_b]), np.maximum(mn[sl_a], mn[sl_b]))
        masks.append(
            (structure / np.maximum(scale, eps) < delta_s)
            & (np.abs(lum[sl_a] - lum[sl_b]) < delta_l)
        )
    return masks[0], masks[1]


def merge_edges(
    l_max: np.ndarray,
    l_min: np.ndarray,
    luminance: np.ndarray,
    delta_s: float,
    delta_l: float,
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """The 4-neighbour pairs (i, j) (flat row-major indices) that Eq. 8 merges."""
    rows, cols = np.shape(l_max)
    index = np.arange(rows * cols).reshape(rows, cols)
    right, down = merge_masks(l_max, l_min, luminance, delta_s, delta_l, eps)
    first = np.concatenate([index[:, :-1][right], index[:-1][down]])
    second = np.concatenate([index[:, 1:][right], index[1:][down]])
    return first, second


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


def grid_components(right: np.ndarray, down: np.ndarray) -> np.ndarray:
    """`components` of grid merge masks (`merge_masks`), flat (rows * cols,) int32, by
    labelling a (2 rows - 1, 2 cols - 1) image: cells on even coordinates, a merged edge as
    the pixel between its two cells, 4-connectivity. scipy's raster-order labels number each
    component by its first cell (an edge pixel comes after the cell left of or above it), so
    no renumbering is needed. Several times cheaper than building a sparse graph (tested
    equal to `components`)."""
    from scipy import ndimage

    rows, cols = down.shape[0] + 1, right.shape[1] + 1
    image = np.zeros((2 * rows - 1, 2 * cols - 1), dtype=bool)
    image[::2, ::2] = True
    image[::2, 1::2] = right
    image[1::2, ::2] = down
    labels, _ = ndimage.label(image)
    return (labels[::2, ::2].ravel() - 1).astype(np.int32)


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
    label = grid_components(*merge_masks(l_max, l_min, lum, cfg.delta_s, cfg.delta_l, cfg.eps))
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
