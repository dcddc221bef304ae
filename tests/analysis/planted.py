"""Synthetic response x image attention with planted anchor tokens (tests and benchmark)."""

from __future__ import annotations

import numpy as np


def planted_attention(
    num_tokens: int = 200,
    grid: tuple[int, int] = (16, 16),
    num_anchors: int = 30,
    region: int = 3,
    seed: int = 0,
    anchor_mass: tuple[float, float] = (0.6, 0.9),
    diffuse_mass: tuple[float, float] = (0.05, 0.2),
    sharpness: float = 0.85,
) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) attention and the planted anchor mask.

    Image tokens form a grid (rows x cols, N = rows * cols). `num_anchors` tokens at random
    positions put a row mass drawn from `anchor_mass` on the image: `sharpness` of it on one
    region x region block of cells (Dirichlet(2) over the block, the same block for all of them),
    the rest spread over all cells. The other tokens put a row mass from `diffuse_mass` spread
    over all cells (Dirichlet(1)). The remaining row mass (text) is not part of the matrix.
    """
    rng = np.random.default_rng(seed)
    rows, cols = grid
    num_image = rows * cols
    r0 = int(rng.integers(0, rows - region + 1))
    c0 = int(rng.integers(0, cols - region + 1))
    cells = np.array(
        [(r0 + i) * cols + (c0 + j) for i in range(region) for j in range(region)], dtype=np.int64
    )
    anchor = np.zeros(num_tokens, dtype=bool)
    anchor[rng.choice(num_tokens, size=num_anchors, replace=False)] = True

    att = rng.dirichlet(np.ones(num_image), size=num_tokens)
    mass = rng.uniform(*diffuse_mass, size=num_tokens)
    n_a = int(anchor.sum())
    mass[anchor] = rng.uniform(*anchor_mass, size=n_a)
    sharp = np.zeros((n_a, num_image))
    sharp[:, cells] = rng.dirichlet(np.full(cells.size, 2.0), size=n_a)
    att[anchor] = sharpness * sharp + (1.0 - sharpness) * att[anchor]
    return att * mass[:, None], anchor
