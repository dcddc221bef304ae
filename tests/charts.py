"""Rendered test images with known structure (SGUF / KAWHI tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def bar_chart(width: int = 112, height: int = 84, seed: int = 0) -> Any:
    """A white canvas with black axes, three coloured bars and a text label (PIL RGB)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(8, 4), (8, height - 8), (width - 4, height - 8)], fill="black", width=2)
    for k, color in enumerate(["#d62728", "#1f77b4", "#2ca02c"]):
        top = int(rng.integers(10, height - 20))
        x0 = 16 + k * (width - 24) // 3
        draw.rectangle([x0, top, x0 + (width - 24) // 5, height - 9], fill=color)
    draw.text((width // 2, 2), "Q3", fill="black")
    return img


def quadrant_drawing(size: int = 112, cell: int = 28) -> tuple[Any, np.ndarray]:
    """A white canvas with a black line drawing in the top-left quadrant only; returns the
    image and the (rows, cols) mask of cells covering ink."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    q = size // 2
    draw.rectangle([4, 4, q - 6, q - 6], outline="black", width=2)
    draw.line([(4, 4), (q - 6, q - 6)], fill="black", width=2)
    draw.text((10, q // 2), "x1", fill="black")
    ink = np.asarray(img.convert("L")) < 128
    rows = cols = size // cell
    # cells covering ink: at least 1% of their pixels (a diagonal grazing a cell corner with one
    # pixel leaves a weak tensor that the median rule may rightly call background)
    counts = ink.reshape(rows, cell, cols, cell).sum(axis=(1, 3))
    return img, counts >= 0.01 * cell * cell


def write_chart_rollouts(folder: Path, responses: list[str], seed: int = 0) -> Path:
    """A rollouts.jsonl of rendered bar charts with the given responses."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, response in enumerate(responses):
        name = f"chart-{i}.png"
        bar_chart(seed=seed + i).save(folder / name)
        rows.append(
            {
                "id": f"c{i}",
                "images": [name],
                "prompt": "Which bar is tallest?",
                "response": response,
            }
        )
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
