"""Cross-modal connectivity of response tokens: attention mass on image tokens (AT-RL).

Input is the response x image block of softmax attention as capture stores it, (L, H, T, N)
(H may be 1 after a head mean) or already aggregated (T, N). Everything here is pure numpy and
returns float64 so statistics over many samples do not accumulate float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from vlmcredit.errors import VlmCreditError

SINK_MODES = ("none", "mean", "topk")

# Sarle's bimodality coefficient of a uniform distribution; values above suggest bimodality.
BIMODALITY_THRESHOLD = 5.0 / 9.0


def _finite(arr: np.ndarray, name: str) -> None:
    if arr.size and not np.isfinite(arr).all():
        raise VlmCreditError(
            f"{name} contains NaN or inf values; recapture the attention (fp32) or drop the sample"
        )


def aggregate_attention(
    attention: np.ndarray, layer_heads: Sequence[tuple[int, int]] | None = None
) -> np.ndarray:
    """(L, H, T, N) attention -> (T, N) float64 mean over all or the given (layer, head) pairs.

    `layer_heads` indexes the L and H axes of the array (not model layer numbers). A (T, N)
    input is returned as float64 unchanged (layer_heads must then be None).
    """
    arr = np.asarray(attention)
    if arr.ndim == 2:
        if layer_heads is not None:
            raise VlmCreditError(
                "attention is already aggregated (T, N); pass layer_heads=None or the (L, H, T, N) "
                "array"
            )
        _finite(arr, "attention")
        return arr.astype(np.float64, copy=False)
    if arr.ndim != 4:
        raise VlmCreditError(
            f"attention has shape {arr.shape}; expected (layers, heads, T, N) or (T, N)"
        )
    _finite(arr, "attention")
    num_layers, num_heads = arr.shape[:2]
    if layer_heads is None:
        if num_layers == 0 or num_heads == 0:
            raise VlmCreditError(
                f"attention has shape {arr.shape} with no layers or heads; recapture with at "
                "least one layer"
            )
        # Mean over layers, then heads: both axes are complete, so this equals the pair mean.
        return arr.mean(axis=(0, 1), dtype=np.float64)
    pairs = [tuple(int(x) for x in p) for p in layer_heads]
    if not pairs:
        raise VlmCreditError("layer_heads is empty; pass None for all heads or at least one pair")
    for layer, head in pairs:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise VlmCreditError(
                f"layer_heads pair ({layer}, {head}) is outside the captured array "
                f"({num_layers} layers x {num_heads} heads); use indices into the captured axes"
            )
    layers = np.array([p[0] for p in pairs])
    heads = np.array([p[1] for p in pairs])
    return arr[layers, heads].mean(axis=0, dtype=np.float64)


def check_attention(att: np.ndarray, name: str = "attention") -> np.ndarray:
    """The input as a (T, N) array; VlmCreditError for another rank or NaN/inf values."""
    arr = np.asarray(att)
    if arr.ndim != 2:
        raise VlmCreditError(
            f"{name} has shape {arr.shape}; expected (T, N) — aggregate layers/heads first"
        )
    _finite(arr, name)
    return arr


def debias_sinks(att: np.ndarray, mode: str = "none", k: int = 0) -> np.ndarray:
    """Remove attention-sink mass from a (T, N) matrix; returns a new (T, N) float64 array.

    - "none": unchanged.
    - "mean": subtract each image column's mean over the response tokens, clip at 0, so a cell
      that every token attends to equally (a sink) contributes nothing.
    - "topk": zero the k columns with the largest mean attention (ties: lower column first).
    """
    arr = check_attention(att).astype(np.float64, copy=True)
    if mode not in SINK_MODES:
        raise VlmCreditError(f"sink mode {mode!r} is unknown; use one of {', '.join(SINK_MODES)}")
    num_tokens, num_image = arr.shape
    if mode == "none":
        return arr
    if mode == "mean":
        if num_tokens == 0:
            return arr
        arr -= arr.mean(axis=0, keepdims=True)
        np.maximum(arr, 0.0, out=arr)
        return arr
    # topk
    k = int(k)
    if k < 1:
        raise VlmCreditError(f"sink mode 'topk' needs k >= 1 (got {k}); set --sink-k")
    if k >= num_image:
        raise VlmCreditError(
            f"sink k={k} would drop all {num_image} image tokens; use a smaller --sink-k"
        )
    if num_tokens == 0:
        return arr
    col_mean = arr.mean(axis=0)
    drop = np.argsort(-col_mean, kind="stable")[:k]
    arr[:, drop] = 0.0
    return arr


def connectivity(att: np.ndarray) -> np.ndarray:
    """(T, N) -> (T,) float64: each response token's attention mass on image tokens."""
    return check_attention(att).sum(axis=1, dtype=np.float64)


@dataclass
class ConnectivityStats:
    """Distribution of connectivity values (anchors.json `connectivity`)."""

    histogram_edges: list[float]
    histogram_counts: list[int]
    bimodality_coefficient: float
    cut: float | None
    share_above_cut: float

    def to_dict(self) -> dict:
        d = asdict(self)
        return {
            "histogram": {"edges": d.pop("histogram_edges"), "counts": d.pop("histogram_counts")},
            **d,
        }


def bimodality_coefficient(values: np.ndarray) -> float:
    """Sarle's bimodality coefficient (g^2 + 1) / (k + 3 (n-1)^2 / ((n-2)(n-3))).

    g and k are the bias-corrected sample skewness and excess kurtosis (as pandas' skew/kurt).
    Values above 5/9 suggest a bimodal distribution. Returns 0.0 (not NaN) when it is undefined:
    fewer than 4 values or zero variance.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n < 4:
        return 0.0
    d = x - x.mean()
    m2 = float(np.mean(d**2))
    # Relative test: connectivity values are O(1e-3..1); exact zero variance would divide by 0.
    if m2 <= 1e-24 * max(1.0, float(np.mean(x**2))):
        return 0.0
    m3 = float(np.mean(d**3))
    m4 = float(np.mean(d**4))
    g1 = m3 / m2**1.5
    g2 = m4 / m2**2 - 3.0
    skew = np.sqrt(n * (n - 1)) / (n - 2) * g1
    kurt = (n - 1) / ((n - 2) * (n - 3)) * ((n + 1) * g2 + 6.0)
    denom = kurt + 3.0 * (n - 1) ** 2 / ((n - 2) * (n - 3))
    return float((skew**2 + 1.0) / denom)


def connectivity_stats(
    values: np.ndarray, anchor: np.ndarray | None = None, bins: int = 30
) -> ConnectivityStats:
    """Histogram, bimodality coefficient and the anchor cut of connectivity values.

    cut = lowest connectivity among anchors (None when there are none); share_above_cut = share
    of all values >= cut (0.0 without a cut). Empty input gives zero counts, coefficient 0.0.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    _finite(x, "connectivity")
    if int(bins) < 1:
        raise VlmCreditError(f"bins must be >= 1 (got {bins})")
    counts, edges = np.histogram(x, bins=int(bins))
    cut: float | None = None
    share = 0.0
    if anchor is not None:
        mask = np.asarray(anchor, dtype=bool).ravel()
        if mask.shape != x.shape:
            raise VlmCreditError(
                f"anchor mask has {mask.size} entries but there are {x.size} connectivity values"
            )
        if mask.any():
            cut = float(x[mask].min())
            share = float(np.mean(x >= cut))
    return ConnectivityStats(
        histogram_edges=[float(e) for e in edges],
        histogram_counts=[int(c) for c in counts],
        bimodality_coefficient=bimodality_coefficient(x),
        cut=cut,
        share_above_cut=share,
    )
