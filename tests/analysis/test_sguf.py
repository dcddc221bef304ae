"""SGUF (KAWHI Sec. 3.2) on images with known structure, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tests.charts import quadrant_drawing
from vlmcredit.analysis.sguf import (
    SgufConfig,
    cell_features,
    components,
    gaussian_kernel,
    gradients,
    grid_components,
    lab_luminance,
    merge_edges,
    merge_masks,
    sguf,
)
from vlmcredit.errors import VlmCreditError


def test_ink_cells_are_key_and_flat_background_is_only_sampled() -> None:
    img, ink = quadrant_drawing(size=224, cell=28)
    rgb = np.asarray(img)
    result = sguf(rgb, 28, SgufConfig(seed=3))
    key = result.key.reshape(8, 8)
    assert key[ink].all()  # every cell covering ink
    # flat cells away from the drawing (no ink within the blur + Sobel reach) are not key
    far = ~ndimage.binary_dilation(ink, iterations=1)
    assert far.sum() > 30 and not key[far].any()
    # background: round(0.3 x count) of its cells are sampled, the key cells all kept
    n_bg = int((~result.key).sum())
    assert int((result.selected & ~result.key).sum()) == round(0.3 * n_bg)
    assert result.selected[result.key].all()
    again = sguf(rgb, 28, SgufConfig(seed=3))
    assert np.array_equal(again.selected, result.selected)  # seeded
    other = sguf(rgb, 28, SgufConfig(seed=4))
    assert not np.array_equal(other.selected, result.selected)


def _union_find(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


@pytest.mark.parametrize("seed", range(5))
def test_components_equal_a_plain_union_find_of_the_merge_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = 9, 13
    l_max = rng.choice([0.0, 1.0, 1.3, 5.0], size=(rows, cols))
    l_min = l_max * rng.choice([0.0, 0.5], size=(rows, cols))
    lum = rng.choice([10.0, 30.0, 90.0], size=(rows, cols))
    first, second = merge_edges(l_max, l_min, lum, 0.5, 30.0)
    labels = components(rows * cols, first, second)
    # reference: the merge rule evaluated pair by pair in plain Python, then union-find
    pairs = []
    for r in range(rows):
        for c in range(cols):
            for dr, dc in ((0, 1), (1, 0)):
                rr, cc = r + dr, c + dc
                if rr >= rows or cc >= cols:
                    continue
                a, b = (r, c), (rr, cc)
                num = np.sqrt((l_max[a] - l_max[b]) ** 2 + (l_min[a] - l_min[b]) ** 2)
                den = max(l_max[a], l_max[b], l_min[a], l_min[b], 1e-8)
                if num / den < 0.5 and abs(lum[a] - lum[b]) < 30.0:
                    pairs.append((r * cols + c, rr * cols + cc))
    assert _same_partition(labels, _union_find(rows * cols, pairs))
    # numbered by first appearance
    firsts = [int(np.flatnonzero(labels == k)[0]) for k in range(labels.max() + 1)]
    assert firsts == sorted(firsts)
    # the grid labelling sguf uses gives the very same labels
    assert np.array_equal(grid_components(*merge_masks(l_max, l_min, lum, 0.5, 30.0)), labels)


@pytest.mark.parametrize("shape", [(1, 7), (6, 1), (1, 1), (2, 2)])
def test_grid_components_on_single_row_and_column_grids(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    l_max = rng.choice([0.0, 1.0, 5.0], size=shape)
    lum = rng.choice([10.0, 90.0], size=shape)
    right, down = merge_masks(l_max, np.zeros(shape), lum, 0.5, 30.0)
    first, second = merge_edges(l_max, np.zeros(shape), lum, 0.5, 30.0)
    expected = components(l_max.size, first, second)
    assert np.array_equal(grid_components(right, down), expected)


def test_dual_threshold_is_strict_at_its_boundary_values() -> None:
    def merges(lmax_b: float, lum_b: float) -> bool:
        l_max = np.array([[2.0, lmax_b]])
        first, _ = merge_edges(l_max, np.zeros((1, 2)), np.array([[50.0, lum_b]]), 0.5, 30.0)
        return len(first) == 1

    # structure term: |2 - 1| / max(2, 1) = 0.5 exactly -> no merge; just under -> merge
    assert not merges(1.0, 50.0)
    assert merges(1.0 + 1e-6, 50.0)
    # luminance: |50 - 80| = 30 exactly -> no merge; 29.999 -> merge
    assert not merges(2.0, 80.0)
    assert merges(2.0, 79.999)
    # two flat cells (all eigenvalues 0) merge: 0 / eps < delta_s
    first, _ = merge_edges(np.zeros((1, 2)), np.zeros((1, 2)), np.full((1, 2), 5.0), 0.5, 30.0)
    assert len(first) == 1


def test_lab_luminance_matches_the_cie_formula() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 128, 128]]
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = linear @ np.array([0.2126729, 0.7151522, 0.0721750])
    f = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29)
    expected = 116 * f - 16
    got = lab_luminance(rgb)
    assert np.abs(got - expected).max() < 0.02
    assert got[0, 0] == pytest.approx(0.0, abs=1e-3) and got[0, 1] == pytest.approx(100.0)


def test_gradients_match_scipy_blur_and_sobel() -> None:
    rng = np.random.default_rng(1)
    lum = (rng.random((37, 45)) * 100).astype(np.float32)
    blurred, gx, gy = gradients(lum, 1.0)
    k = gaussian_kernel(1.0).astype(np.float64)
    ref = ndimage.correlate1d(lum.astype(np.float64), k, axis=1, mode="mirror")
    ref = ndimage.correlate1d(ref, k, axis=0, mode="mirror")  # mirror = reflect-101
    assert np.allclose(blurred, ref, atol=1e-3)
    assert np.allclose(gx, ndimage.sobel(ref, axis=1, mode="mirror"), atol=1e-3)
    assert np.allclose(gy, ndimage.sobel(ref, axis=0, mode="mirror"), atol=1e-3)


def test_cell_eigenvalues_match_eigvalsh_of_the_area_normalised_tensor() -> None:
    img, _ = quadrant_drawing(size=112, cell=28)
    rgb = np.asarray(img)
    l_max, l_min, lum = cell_features(rgb, 28)
    blurred, gx, gy = gradients(lab_luminance(rgb), 1.0)
    for r in range(4):
        for c in range(4):
            sl = (slice(28 * r, 28 * r + 28), slice(28 * c, 28 * c + 28))
            x, y = gx[sl].astype(np.float64), gy[sl].astype(np.float64)
            tensor = np.array([[np.mean(x * x), np.mean(x * y)], [np.mean(x * y), np.mean(y * y)]])
            lo, hi = np.linalg.eigvalsh(tensor)
            assert l_max[r, c] == pytest.approx(hi, rel=1e-4, abs=1e-3)
            assert l_min[r, c] == pytest.approx(max(lo, 0.0), rel=1e-4, abs=1e-3)
            assert lum[r, c] == pytest.approx(blurred[sl].mean(), rel=1e-5)


def test_ablation_selections() -> None:
    img, _ = quadrant_drawing(size=224, cell=28)
    rgb = np.asarray(img)
    base = sguf(rgb, 28, SgufConfig())
    every = sguf(rgb, 28, SgufConfig(selection="all"))
    rand = sguf(rgb, 28, SgufConfig(selection="random"))
    inverse = sguf(rgb, 28, SgufConfig(selection="inverse"))
    assert every.selected.all()
    assert rand.selected.sum() == base.selected.sum()
    assert np.array_equal(inverse.selected, ~base.selected)


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(VlmCreditError, match="whole number of 28-px cells"):
        cell_features(np.zeros((30, 28, 3), np.uint8), 28)
    with pytest.raises(VlmCreditError, match="r_skip"):
        SgufConfig(r_skip=1.5).check()
    with pytest.raises(VlmCreditError, match="selection"):
        SgufConfig(selection="best").check()


def _whole_image_features(rgb: np.ndarray, cell: int) -> tuple[np.ndarray, ...]:
    """The whole-image way: `gradients` over the full image, then per-cell means."""
    from vlmcredit.analysis.sguf import _cell_means

    rows, cols = rgb.shape[0] // cell, rgb.shape[1] // cell
    blurred, gx, gy = gradients(lab_luminance(rgb), 1.0)
    a, b, c, lum = (_cell_means(x, rows, cols, cell) for x in (gx * gx, gx * gy, gy * gy, blurred))
    half_trace = 0.5 * (a + c)
    root = np.sqrt(0.25 * (a - c) ** 2 + b * b)
    return half_trace + root, np.maximum(half_trace - root, 0.0), lum


@pytest.mark.parametrize(
    ("height", "width", "cell"),
    [
        (700, 1120, 28),
        (96, 160, 32),
        (28, 28, 28),
        (840, 56, 28),
        (40, 20, 2),
        (4, 4, 2),
        (2, 6, 1),
    ],
)
@pytest.mark.parametrize("band_pixels", [None, 1])
def test_banded_cell_features_equal_the_whole_image_computation_bit_for_bit(
    height: int, width: int, cell: int, band_pixels: int | None, monkeypatch
) -> None:
    # the band loop (halo rows, rows carried between bands, reflected borders, tiny images
    # padded by repeated reflection) must reproduce the full-image float32 arithmetic
    # exactly, RGB and grey; band_pixels=1 forces one cell row per band
    from vlmcredit.analysis import sguf as module

    if band_pixels is not None:
        monkeypatch.setattr(module, "_BAND_PIXELS", band_pixels)
    rng = np.random.default_rng(height * width)
    for rgb in (
        rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(height, width), dtype=np.uint8),
    ):
        got = cell_features(rgb, cell)
        want = _whole_image_features(rgb, cell)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float32 and np.array_equal(g, w)


def _reference_sguf(rgb: np.ndarray, cell: int, cfg: SgufConfig) -> tuple[np.ndarray, ...]:
    """Independent SGUF: float64 CIE L, scipy blur + Sobel, per-cell eigvalsh, a plain
    union-find over the Eq. 8 pairs; returns (labels, key)."""
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = linear @ np.array([0.2126729, 0.7151522, 0.0721750])
    f = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29)
    k = gaussian_kernel(cfg.sigma).astype(np.float64)
    blurred = ndimage.correlate1d(116 * f - 16, k, axis=1, mode="mirror")
    blurred = ndimage.correlate1d(blurred, k, axis=0, mode="mirror")
    gx = ndimage.sobel(blurred, axis=1, mode="mirror")
    gy = ndimage.sobel(blurred, axis=0, mode="mirror")
    rows, cols = rgb.shape[0] // cell, rgb.shape[1] // cell
    l_max, l_min, lum = np.zeros((3, rows * cols))
    for i in range(rows * cols):
        sl = np.s_[
            i // cols * cell : (i // cols + 1) * cell, i % cols * cell : (i % cols + 1) * cell
        ]
        x, z = gx[sl], gy[sl]
        lo, hi = np.linalg.eigvalsh(
            [[np.mean(x * x), np.mean(x * z)], [np.mean(x * z), np.mean(z * z)]]
        )
        l_max[i], l_min[i], lum[i] = hi, max(lo, 0.0), blurred[sl].mean()
    pairs = []
    for i in range(rows * cols):
        for j in (i + 1, i + cols):
            if (j == i + 1 and j % cols == 0) or j >= rows * cols:
                continue
            num = np.hypot(l_max[i] - l_max[j], l_min[i] - l_min[j])
            den = max(l_max[i], l_max[j], l_min[i], l_min[j], cfg.eps)
            if num / den < cfg.delta_s and abs(lum[i] - lum[j]) < cfg.delta_l:
                pairs.append((i, j))
    labels = _union_find(rows * cols, pairs)
    _, dense = np.unique(labels, return_inverse=True)
    energy = np.bincount(dense, l_max + l_min) / np.bincount(dense)
    return labels, (energy > cfg.beta * np.median(energy))[dense]


@pytest.mark.parametrize("seed", range(4))
def test_sguf_equals_an_independent_float64_reference_on_random_images(seed: int) -> None:
    # random blocky images (flat patches, textured patches, lines) so that the partition has
    # several components of different energy, at both cell sizes
    rng = np.random.default_rng(seed)
    cell = (28, 32)[seed % 2]
    rows, cols = 6 + seed, 9 - seed
    # flat patches of 3 x 3 cells in a few colours: their inner cells have zero energy
    palette = rng.integers(0, 256, (4, 3))[rng.integers(0, 4, (rows // 3 + 1, cols // 3 + 1))]
    rgb = np.repeat(np.repeat(palette, 3 * cell, 0), 3 * cell, 1)[: rows * cell, : cols * cell]
    noisy = rng.random((rows, cols)) < 0.2
    noise = rng.integers(-60, 60, rgb.shape)
    rgb = np.where(np.repeat(np.repeat(noisy, cell, 0), cell, 1)[..., None], rgb + noise, rgb)
    rgb[rng.integers(0, rows * cell), :] = 0  # a line through several cells
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    result = sguf(rgb, cell, SgufConfig())
    labels, key = _reference_sguf(rgb, cell, SgufConfig())
    assert _same_partition(result.component, labels)
    assert np.array_equal(result.key, key)
    assert 1 < result.energy.size < rows * cols and 0 < key.sum() < key.size
