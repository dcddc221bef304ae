"""SGUF per image and KAWHI weights vs one teacher-forced forward (CPU).

    python benchmarks/sguf.py                      # both parts
    python benchmarks/sguf.py --part sguf --rounds 30

Part 1, SGUF on a 1,000-cell image (40 x 25 cells of 28 px = 1120 x 700 px: a rendered bar
chart and a noise image): `vlmcredit.analysis.sguf.sguf` (filters run in cache-sized bands of
cell rows) vs the previous whole-image way (`gradients` on the full image, then the same cell
sums; bit-identical features, asserted) and a reference way (scipy.ndimage Gaussian + Sobel,
per-cell numpy eigvalsh, a Python union-find); rounds in shuffled order after a warm-up of
every mode; min / median / max ms and the ratios of medians. `sguf` runs after whatever mode
came before (caches mostly cold); `sguf_warm` is a second call right after one on the same
image (as in the pipeline, where the image was just resized). Run it single-threaded
(OMP_NUM_THREADS=1): SGUF is numpy/scipy on one core.

Part 2, KAWHI overhead: a mid-size Qwen2.5-VL text model (hidden 512, 8 layers, 8 heads /
2 kv heads, random weights; the tiny checkpoint's tokenizer and processor), a batch of B charts
(448 px: 256 image tokens each) with a ~T-token multi-paragraph response. Interleaved rounds of
(a) one teacher-forced forward of the batch (plain SDPA, no grad) and (b) `online.weights(...,
method="kawhi")` on the same batch (its own Q/K capture forward + SGUF + alignment + paragraph
weights) and (c) the same with `alignment=key-key` (Table 3 ablation: a plain forward with the
Q/K-states hook); the ratio (b) / (a) is the cost of KAWHI weights in units of one forward.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.charts import bar_chart  # noqa: E402
from vlmcredit.analysis.sguf import (  # noqa: E402
    _CHANNEL_Y,
    _Y_TO_L,
    SgufConfig,
    _cell_means,
    cell_features,
    components,
    gaussian_kernel,
    gradients,
    lab_luminance,
    merge_edges,
    sguf,
)


def whole_image_lab(rgb: np.ndarray) -> np.ndarray:
    """The previous L: one gather per interleaved channel (same tables, same integers)."""
    y = np.take(_CHANNEL_Y[0], rgb[..., 0])
    y += np.take(_CHANNEL_Y[1], rgb[..., 1])
    y += np.take(_CHANNEL_Y[2], rgb[..., 2])
    return np.take(_Y_TO_L, y)


def whole_image_features(rgb: np.ndarray, cell: int, sigma: float) -> tuple[np.ndarray, ...]:
    """The previous `cell_features`: full-image temporaries, same float32 operations."""
    rows, cols = rgb.shape[0] // cell, rgb.shape[1] // cell
    blurred, gx, gy = gradients(whole_image_lab(rgb), sigma)
    a = _cell_means(gx * gx, rows, cols, cell)
    b = _cell_means(gx * gy, rows, cols, cell)
    c = _cell_means(gy * gy, rows, cols, cell)
    lum = _cell_means(blurred, rows, cols, cell)
    half_trace = 0.5 * (a + c)
    root = np.sqrt(0.25 * (a - c) ** 2 + b * b)
    l_max = (half_trace + root).astype(np.float32)
    return l_max, np.maximum(half_trace - root, 0.0).astype(np.float32), lum


def whole_image_sguf(rgb: np.ndarray, cell: int, cfg: SgufConfig) -> np.ndarray:
    """The previous SGUF up to the key cells (selection is the same code in both)."""
    l_max, l_min, lum = whole_image_features(rgb, cell, cfg.sigma)
    first, second = merge_edges(l_max, l_min, lum, cfg.delta_s, cfg.delta_l, cfg.eps)
    label = components(l_max.size, first, second)
    energy = np.bincount(label, (l_max + l_min).ravel().astype(np.float64)) / np.bincount(label)
    return (energy > cfg.beta * np.median(energy))[label]


def reference_sguf(rgb: np.ndarray, cell: int, cfg: SgufConfig) -> np.ndarray:
    """The direct way: scipy filters, a loop over cells, a Python union-find. Returns keys."""
    from scipy import ndimage

    lum = lab_luminance(rgb).astype(np.float64)
    k = gaussian_kernel(cfg.sigma).astype(np.float64)
    blurred = ndimage.correlate1d(
        ndimage.correlate1d(lum, k, 1, mode="mirror"), k, 0, mode="mirror"
    )
    gx = ndimage.sobel(blurred, 1, mode="mirror")
    gy = ndimage.sobel(blurred, 0, mode="mirror")
    rows, cols = rgb.shape[0] // cell, rgb.shape[1] // cell
    lmax = np.zeros(rows * cols)
    lmin = np.zeros(rows * cols)
    lumc = np.zeros(rows * cols)
    for r in range(rows):
        for c in range(cols):
            sl = (slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell))
            x, y = gx[sl], gy[sl]
            t = np.array([[np.mean(x * x), np.mean(x * y)], [np.mean(x * y), np.mean(y * y)]])
            lo, hi = np.linalg.eigvalsh(t)
            lmax[r * cols + c], lmin[r * cols + c] = hi, max(lo, 0.0)
            lumc[r * cols + c] = blurred[sl].mean()
    parent = list(range(rows * cols))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(rows):
        for c in range(cols):
            for rr, cc in ((r, c + 1), (r + 1, c)):
                if rr < rows and cc < cols:
                    a, b = r * cols + c, rr * cols + cc
                    num = np.hypot(lmax[a] - lmax[b], lmin[a] - lmin[b])
                    den = max(lmax[a], lmax[b], lmin[a], lmin[b], cfg.eps)
                    if num / den < cfg.delta_s and abs(lumc[a] - lumc[b]) < cfg.delta_l:
                        parent[find(a)] = find(b)
    labels = np.array([find(i) for i in range(rows * cols)])
    _, labels = np.unique(labels, return_inverse=True)
    energy = np.bincount(labels, lmax + lmin) / np.bincount(labels)
    return (energy > cfg.beta * np.median(energy))[labels]


def stats(values: list[float]) -> str:
    return f"{min(values):8.2f} {statistics.median(values):8.2f} {max(values):8.2f}"


def part_sguf(rounds: int) -> None:
    rng = np.random.default_rng(0)
    chart = np.asarray(bar_chart(1120, 700))
    noise = rng.integers(0, 256, (700, 1120, 3), dtype=np.uint8)
    cfg = SgufConfig()
    shuffle = random.Random(0)
    for name, img in (("chart", chart), ("noise", noise)):
        new, old = cell_features(img, 28), whole_image_features(img, 28, cfg.sigma)
        assert all(np.array_equal(x, y) for x, y in zip(new, old, strict=True)), name
        assert np.array_equal(sguf(img, 28, cfg).key, whole_image_sguf(img, 28, cfg)), name
        assert np.array_equal(sguf(img, 28, cfg).key, reference_sguf(img, 28, cfg)), name

        def timed(fn: Any) -> float:
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)

        def again(i: np.ndarray = img) -> float:
            sguf(i, 28, cfg)  # the same image just before: image, tables, buffers in cache
            return timed(lambda: sguf(i, 28, cfg))

        modes = [
            ("sguf", lambda i=img: timed(lambda: sguf(i, 28, cfg))),
            ("sguf_warm", again),
            ("whole", lambda i=img: timed(lambda: whole_image_sguf(i, 28, cfg))),
            ("reference", lambda i=img: timed(lambda: reference_sguf(i, 28, cfg))),
        ]
        times: dict[str, list[float]] = {mode: [] for mode, _ in modes}
        for r in range(rounds + 1):
            shuffle.shuffle(modes)
            for mode, fn in modes:
                ms = fn()
                if r:  # round 0 is the warm-up of every mode
                    times[mode].append(ms)
        print(f"SGUF, 1000-cell {name} image (1120x700 px), ms over {rounds} rounds")
        print("mode            min   median      max")
        for mode in ("sguf", "sguf_warm", "whole", "reference"):
            print(f"{mode:10s} {stats(times[mode])}")
        med = {mode: statistics.median(v) for mode, v in times.items()}
        print(f"sguf / whole (medians): {med['sguf'] / med['whole']:.3f}")
        print(f"sguf / reference (medians): {med['sguf'] / med['reference']:.3f}")


def part_kawhi(rounds: int, batch_size: int, response_tokens: int) -> None:
    import torch

    from benchmarks.online_overhead import mid_model
    from vlmcredit import online
    from vlmcredit.data.sample import Sample
    from vlmcredit.methods.kawhi import KawhiConfig
    from vlmcredit.models.families import ModelGeometry, adapter_for
    from vlmcredit.models.inputs import encode_samples
    from vlmcredit.models.loading import load_processor
    from vlmcredit.models.tiny import make_tiny

    ckpt = Path(tempfile.mkdtemp()) / "tiny"
    make_tiny("qwen2.5-vl", ckpt, seed=0)
    model = mid_model(ckpt).eval()
    processor = load_processor(ckpt, adapter_for("qwen2_5_vl"))
    geo = ModelGeometry.from_config(model.config)
    words = ["The", "red", "bar", "is", "tall", "and", "the", "blue", "bar", "short", "wins"]
    paragraph = " ".join(words * 3) + "."
    text = "\n\n".join([paragraph] * 50)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"][:response_tokens]
    samples = [
        Sample([bar_chart(448, 448, seed=i)], "Which bar is tallest?", ids, f"s{i}")
        for i in range(batch_size)
    ]
    enc = encode_samples(processor, geo, samples)
    batch = dict(enc.inputs)
    batch["response_mask"] = torch.ones(batch_size, len(ids), dtype=torch.long)
    forward_inputs = dict(enc.inputs)

    def forward() -> None:
        with torch.no_grad():
            model(**forward_inputs)

    def forward_last() -> None:
        # the same forward without the all-position lm_head: what KAWHI's own Q/K pass runs
        with torch.no_grad():
            model(**forward_inputs, logits_to_keep=1)

    def kawhi() -> None:
        online.weights(model, batch, method="kawhi", heads=[0, 1, 3, 6], processor=processor)

    def key_key() -> None:
        # the Table 3 ablation: a plain forward with the states hook instead of the capture
        online.weights(
            model,
            batch,
            method="kawhi",
            config=KawhiConfig(alignment="key-key"),
            heads=[0, 1, 3, 6],
            processor=processor,
        )

    modes = [
        ("forward", forward),
        ("forward_last", forward_last),
        ("kawhi", kawhi),
        ("key_key", key_key),
    ]
    times: dict[str, list[float]] = {mode: [] for mode, _ in modes}
    shuffle = random.Random(0)
    for r in range(rounds + 1):
        shuffle.shuffle(modes)  # a new order every round; round 0 warms every mode up
        for mode, fn in modes:
            t = time.perf_counter()
            fn()
            if r:
                times[mode].append(1e3 * (time.perf_counter() - t))
    n_img = int((enc.inputs["input_ids"][0] == geo.image_token_id).sum())
    print(
        f"KAWHI weights vs one teacher-forced forward: B={batch_size}, S="
        f"{enc.inputs['input_ids'].shape[1]}, T={len(ids)}, N={n_img} image tokens/row, "
        f"ms over {rounds} rounds"
    )
    print("mode            min   median      max")
    for mode, v in times.items():
        print(f"{mode:10s} {stats(v)}")
    ratio = statistics.median(times["kawhi"]) / statistics.median(times["forward"])
    print(f"kawhi / forward (medians): {ratio:.3f}")
    same = statistics.median(times["kawhi"]) / statistics.median(times["forward_last"])
    print(f"kawhi / forward_last (medians, the same forward work + KAWHI): {same:.3f}")
    ablation = statistics.median(times["key_key"]) / statistics.median(times["forward_last"])
    print(f"key_key / forward_last (medians, alignment=key-key): {ablation:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["sguf", "kawhi", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    if args.part in ("sguf", "both"):
        part_sguf(args.rounds)
    if args.part in ("kawhi", "both"):
        part_kawhi(max(3, args.rounds // 4), args.batch_size, args.response_tokens)


if __name__ == "__main__":
    main()
