"""Matplotlib figures for the report, returned as PNG (and SVG) bytes.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly (never pyplot), so
the report neither needs a display nor changes the global backend of a caller's process. Titles
carry sample ids: they are drawn with math text off, so a `$` prints as a dollar sign rather
than failing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Text properties for any string that may come from data (sample ids, run folder names).
PLAIN = {"parse_math": False}

# Long side of an attention canvas when the run stored no thumbnail (matches the stored thumbs).
CANVAS_PX = 448

_RC = {
    "svg.hashsalt": "vlmcredit",  # stable SVG ids: same input, same file
    "svg.fonttype": "none",  # text stays text in the SVG (smaller, searchable)
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

CRITICAL = "#d62728"
NEUTRAL = "#8c8c8c"
ANCHOR = "#e6550d"


@dataclass(frozen=True)
class Figure:
    """One rendered figure: file stem, a human title, PNG bytes and optional SVG bytes."""

    name: str
    title: str
    png: bytes
    svg: bytes | None = None


def _new(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _render(fig, name: str, title: str, dpi: int, svg: bool, palette: bool = False) -> Figure:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, metadata={"Software": None})
    if palette:
        png = _palette_png(png.getvalue())
    vector = None
    if svg:
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        vector = buf.getvalue()
    return Figure(name, title, png.getvalue(), vector)


def _palette_png(data: bytes) -> io.BytesIO:
    """The PNG with a 256-colour palette: photo-like panels shrink ~2.3x, which keeps a report
    of 50 samples at a few MB (no dithering: it would cost the size back)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        small = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out


def head_drop_bars(
    heads: Sequence[int],
    drops: Sequence[float],
    critical: Sequence[bool],
    threshold: float,
    metric: str,
    name: str,
    title: str,
    dpi: int = 100,
) -> Figure:
    """Drop of the score per ablated head index, threshold line, critical heads in red."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _new(max(6.0, 0.22 * len(heads) + 1.5), 3.2)
        ax = fig.add_subplot()
        colors = [CRITICAL if c else NEUTRAL for c in critical]
        ax.bar(np.asarray(heads), np.asarray(drops, dtype=float), color=colors, width=0.8)
        ax.axhline(threshold, color="#222", linestyle="--", linewidth=1)
        ax.text(
            1.0,
            threshold,
            f" threshold {threshold:g}",
            transform=ax.get_yaxis_transform(),
            va="bottom",
            ha="right",
            fontsize=8,
        )
        ax.axhline(0, color="#444", linewidth=0.6)
        ax.set_xlabel("head index (ablated in every layer)")
        ax.set_ylabel(f"drop in MME {metric}")
        if len(heads) <= 48:
            ax.set_xticks(np.asarray(heads))
            ax.tick_params(axis="x", labelsize=7)
        ax.set_title(title, **PLAIN)
        return _render(fig, name, title, dpi, svg=True)


def head_drop_grid(
    drops: np.ndarray,
    critical: np.ndarray,
    threshold: float,
    metric: str,
    name: str,
    title: str,
    dpi: int = 100,
) -> Figure:
    """Layer x head heat map of the drop (NaN = not probed), critical cells outlined."""
    import matplotlib
    from matplotlib.patches import Rectangle

    layers, heads = drops.shape
    with matplotlib.rc_context(_RC):
        fig = _new(min(16.0, max(5.0, 0.3 * heads + 2.5)), min(14.0, max(3.0, 0.25 * layers + 1.5)))
        ax = fig.add_subplot()
        finite = drops[np.isfinite(drops)]
        span = float(np.abs(finite).max()) if finite.size else 1.0
        span = max(span, abs(threshold), 1e-9)
        image = ax.imshow(
            np.ma.masked_invalid(drops),
            cmap="RdBu_r",
            vmin=-span,
            vmax=span,
            aspect="auto",
            interpolation="nearest",
        )
        for layer, head in zip(*np.nonzero(critical), strict=True):
            ax.add_patch(
                Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#111", lw=1.6)
            )
        bar = fig.colorbar(image, ax=ax, shrink=0.9)
        bar.set_label(f"drop in MME {metric}")
        bar.ax.axhline(threshold, color="#111", linewidth=1.5)
        bar.ax.text(
            1.05,
            threshold,
            f"{threshold:g}",
            transform=bar.ax.get_yaxis_transform(),
            va="center",
            fontsize=7,
        )
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, **PLAIN)
        return _render(fig, name, title, dpi, svg=True)


def connectivity_histogram(
    edges: np.ndarray,
    values: np.ndarray,
    anchors: np.ndarray,
    cut: float | None,
    ratio_target: float,
    ratio_achieved: float,
    name: str,
    title: str,
    dpi: int = 100,
) -> Figure:
    """Stacked histogram of token connectivity (anchors on top) with the anchor cut."""
    import matplotlib

    values = np.asarray(values, dtype=float)
    anchors = np.asarray(anchors, dtype=bool)
    finite = np.isfinite(values)  # a NaN connectivity (empty image span) has no bin
    values, anchors = values[finite], anchors[finite]
    with matplotlib.rc_context(_RC):
        fig = _new(6.4, 3.4)
        ax = fig.add_subplot()
        ax.hist(
            [values[~anchors], values[anchors]],
            bins=np.asarray(edges, dtype=float),
            stacked=True,
            color=[NEUTRAL, ANCHOR],
            label=["other tokens", "anchors"],
        )
        if cut is not None:
            ax.axvline(cut, color="#111", linestyle="--", linewidth=1.2, label=f"cut {cut:.4g}")
        ax.set_xlabel("connectivity (attention mass on image tokens)")
        ax.set_ylabel("tokens")
        ax.set_title(title, **PLAIN)
        ax.legend(title=f"target {ratio_target:.1%}, achieved {ratio_achieved:.1%}", fontsize=8)
        return _render(fig, name, title, dpi, svg=True)


def _image_canvas(
    k: int, boxes: np.ndarray, thumb: tuple[np.ndarray, float] | None
) -> tuple[np.ndarray, float, float, float]:
    """(background RGB, canvas px per original px, width, height) of image k."""
    if thumb is not None:
        arr, scale = thumb
        scale = scale if scale > 0 else 1.0
        return arr, scale, arr.shape[1] / scale, arr.shape[0] / scale
    # No thumbnail stored: a blank canvas of the image's size, recovered from its boxes.
    width = float(boxes[:, 2].max()) if boxes.size else 1.0
    height = float(boxes[:, 3].max()) if boxes.size else 1.0
    scale = min(1.0, CANVAS_PX / max(width, height, 1.0))
    shape = (max(1, round(height * scale)), max(1, round(width * scale)), 3)
    return np.full(shape, 235, dtype=np.uint8), scale, width, height


def _raster(values: np.ndarray, boxes: np.ndarray, shape: tuple[int, int], scale: float):
    """Per-pixel value of the cells (NaN outside every cell), at canvas resolution."""
    out = np.full(shape, np.nan)
    px = np.rint(boxes * scale).astype(np.int64)
    px[:, [0, 2]] = np.clip(px[:, [0, 2]], 0, shape[1])
    px[:, [1, 3]] = np.clip(px[:, [1, 3]], 0, shape[0])
    for (x0, y0, x1, y1), v in zip(px, values, strict=True):
        out[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = v
    return out


def _composite(background: np.ndarray, raster: np.ndarray, vmax: float) -> np.ndarray:
    """The picture with the cells' colour blended on top (one image to draw, not two).

    Opacity follows the value: weak cells leave the picture visible, strong ones cover it.
    """
    from matplotlib import colormaps

    scaled = np.clip(np.nan_to_num(raster, nan=0.0) / (vmax if vmax > 0 else 1.0), 0.0, 1.0)
    rgb = colormaps["inferno"](0.25 + 0.75 * scaled)[..., :3]
    alpha = np.where(np.isnan(raster), 0.0, 0.85 * scaled**0.75)[..., None]
    out = background.astype(np.float64) / 255.0 * (1.0 - alpha) + rgb * alpha
    return (out * 255.0 + 0.5).astype(np.uint8)


def attention_panels(
    groups: Sequence[tuple[str, np.ndarray]],
    boxes: np.ndarray,
    owner: np.ndarray,
    thumbs: dict[int, tuple[np.ndarray, float]],
    name: str,
    title: str,
    dpi: int = 80,
) -> Figure:
    """Rows = token groups (clusters), columns = images: mean attention drawn on cell boxes.

    Each row is scaled to its own maximum (over all images of the sample), so a weak cluster
    still shows where it looks; the maximum is printed beside the row. Opacity follows the
    value, so the picture stays visible where the group does not look.
    """
    import matplotlib

    images = sorted(set(np.asarray(owner).tolist()))
    rows, cols = len(groups), len(images)
    canvases = {k: _image_canvas(k, boxes[owner == k], thumbs.get(k)) for k in images}
    # Panel widths follow the images' aspect ratios so no panel is letterboxed.
    ratios = [canvases[k][2] / max(canvases[k][3], 1e-9) for k in images]
    panel_h = 2.6
    with matplotlib.rc_context(_RC):
        fig = _new(sum(panel_h * r for r in ratios) + 0.6, panel_h * rows + 0.5)
        fig.suptitle(title, fontsize=9, **PLAIN)
        grid = fig.add_gridspec(rows, cols, width_ratios=ratios)
        for r, (label, values) in enumerate(groups):
            vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
            for c, k in enumerate(images):
                ax = fig.add_subplot(grid[r, c])
                mine = owner == k
                background, scale, width, height = canvases[k]
                extent = (0.0, width, height, 0.0)
                overlay = _raster(values[mine], boxes[mine], background.shape[:2], scale)
                ax.imshow(_composite(background, overlay, vmax), extent=extent)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"image {k}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{label}\nmax {vmax:.3g}", fontsize=8)
        return _render(fig, name, title, dpi, svg=False, palette=True)


def weight_histogram(
    weights: np.ndarray,
    name: str,
    title: str,
    sample_weights: np.ndarray | None = None,
    dpi: int = 100,
) -> Figure:
    """Distribution of per-token weights (log counts: weights pile up at a few values)."""
    import matplotlib

    weights = np.asarray(weights, dtype=float)
    with matplotlib.rc_context(_RC):
        two = sample_weights is not None and len(sample_weights) > 0
        fig = _new(9.0 if two else 6.0, 3.2)
        ax = fig.add_subplot(1, 2 if two else 1, 1)
        ax.hist(weights[np.isfinite(weights)], bins=30, color="#2171b5")
        ax.set_yscale("log")
        ax.set_xlabel("per-token weight")
        ax.set_ylabel("tokens (log)")
        share = float((weights != 0).mean()) if weights.size else 0.0
        mean = float(weights.mean()) if weights.size else float("nan")
        ax.set_title(f"{title}\nmean {mean:.3g}, non-zero {share:.1%}", **PLAIN)
        if two:
            ax2 = fig.add_subplot(1, 2, 2)
            ax2.hist(np.asarray(sample_weights, dtype=float), bins=20, color="#6baed6")
            ax2.set_xlabel("sample_weight (per response)")
            ax2.set_ylabel("responses")
        return _render(fig, name, title, dpi, svg=True)


def pair_matrices(
    labels: Sequence[str],
    jaccard: np.ndarray,
    spearman: np.ndarray,
    name: str,
    title: str,
    dpi: int = 100,
) -> Figure:
    """Two method x method heatmaps: Jaccard overlap of selections, Spearman of scores (NaN =
    undefined, drawn blank)."""
    import matplotlib

    n = len(labels)
    with matplotlib.rc_context(_RC):
        fig = _new(max(7.0, 1.1 * n * 2 + 2.0), max(3.2, 0.55 * n + 1.6))
        for k, (values, what, cmap, lo) in enumerate(
            ((jaccard, "Jaccard of selected tokens", "viridis", 0.0),
             (spearman, "Spearman of per-token scores", "RdBu_r", -1.0))
        ):  # fmt: skip
            ax = fig.add_subplot(1, 2, k + 1)
            image = ax.imshow(np.asarray(values, dtype=float), vmin=lo, vmax=1.0, cmap=cmap)
            ax.set_xticks(range(n), labels, rotation=45, ha="right", **PLAIN)
            ax.set_yticks(range(n), labels, **PLAIN)
            for i in range(n):
                for j in range(n):
                    v = float(values[i][j])
                    if np.isfinite(v):
                        dark = v < 0.5 if k == 0 else abs(v) > 0.6  # light text on dark cells
                        color = "white" if dark else "black"
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
            ax.set_title(what, **PLAIN)
            fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(title, **PLAIN)
        return _render(fig, name, title, dpi, svg=True)


def checkpoint_trends(
    labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    drops: np.ndarray | None,
    critical: np.ndarray | None,
    head_labels: Sequence[str],
    metric: str,
    name: str,
    title: str,
    dpi: int = 100,
) -> Figure:
    """Left: connectivity figures per checkpoint (one line per series, None = not measured).
    Right (when `drops` is given): configuration x checkpoint heat map of the ablation drop,
    critical cells outlined."""
    import matplotlib
    from matplotlib.patches import Rectangle

    n = len(labels)
    panels = 1 + (drops is not None)
    with matplotlib.rc_context(_RC):
        rows = 0 if drops is None else drops.shape[0]
        fig = _new(max(6.0, 4.5 * panels + 0.4 * n), max(3.2, min(12.0, 0.22 * rows + 1.6)))
        ax = fig.add_subplot(1, panels, 1)
        x = np.arange(n)
        for key, values in series.items():
            y = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
            ax.plot(x, y, marker="o", label=key)
        ax.set_xticks(x, labels, rotation=30, ha="right", **PLAIN)
        ax.set_xlabel("checkpoint")
        ax.legend(fontsize=7)
        ax.set_title("connectivity and anchors", **PLAIN)
        if drops is not None:
            ax = fig.add_subplot(1, panels, 2)
            finite = drops[np.isfinite(drops)]
            span = float(np.abs(finite).max()) if finite.size else 0.0
            span = span if span > 0 else 1.0  # all zero: a readable scale, not 1e-9
            image = ax.imshow(
                np.ma.masked_invalid(drops), cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto",
                interpolation="nearest",
            )  # fmt: skip
            if critical is not None:
                for i, j in zip(*np.nonzero(critical), strict=True):
                    ax.add_patch(
                        Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#111", lw=1.6)
                    )
            ax.set_xticks(x, labels, rotation=30, ha="right", **PLAIN)
            if rows <= 48:
                ax.set_yticks(np.arange(rows), head_labels, fontsize=7, **PLAIN)
            ax.set_title(f"drop in MME {metric} per ablated head", **PLAIN)
            fig.colorbar(image, ax=ax, shrink=0.9)
        fig.suptitle(title, **PLAIN)
        return _render(fig, name, title, dpi, svg=True)
