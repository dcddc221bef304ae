"""How two credit methods agree on the same responses: overlap of their selected tokens and
rank correlation of their per-token scores (pure numpy; `vlmcredit compare` reads the files).

Every figure pools the tokens of the responses both methods scored (same sample_id and
response_id), so a long response counts for its tokens, as in the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vlmcredit.analysis.anchors import agreement
from vlmcredit.errors import VlmCreditError

Key = tuple[str, str]  # (sample_id, response_id)


@dataclass
class MethodTokens:
    """One method's selection and score per response."""

    label: str  # the method name, or "method@run" when a method appears in several runs
    selected: Mapping[Key, np.ndarray]  # (T,) bool
    score: Mapping[Key, np.ndarray]  # (T,) float
    score_column: str  # which signals column the score came from


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (Spearman's convention)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # group boundaries of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, dtype=np.float64)
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of ranks s+1 .. e
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None when either side is
    constant or there are fewer than two tokens (the correlation is undefined)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise VlmCreditError(f"scores differ in length ({x.size} vs {y.size})")
    if x.size < 2:
        return None
    rx, ry = rank_average(x), rank_average(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return None if denom == 0.0 else float((rx * ry).sum() / denom)


def common_keys(a: MethodTokens, b: MethodTokens) -> list[Key]:
    """Responses both methods hold with the same length, in a fixed order."""
    keys = sorted(set(a.selected) & set(b.selected))
    bad = [k for k in keys if len(a.selected[k]) != len(b.selected[k])]
    if bad:
        raise VlmCreditError(
            f"{a.label} and {b.label}: response {bad[0]} has different lengths; the runs do not "
            "hold the same tokens"
        )
    return keys


def compare_pair(a: MethodTokens, b: MethodTokens) -> dict[str, object]:
    """Overlap and rank correlation of two methods over their common responses.

    precision = |A & B| / |A| (share of a's selection that b also selects), recall = |A & B| /
    |B|; spearman over the pooled scores of all common tokens.
    """
    keys = common_keys(a, b)
    if not keys:
        return {"a": a.label, "b": b.label, "responses": 0, "tokens": 0}
    sa = np.concatenate([np.asarray(a.selected[k], bool) for k in keys])
    sb = np.concatenate([np.asarray(b.selected[k], bool) for k in keys])
    xa = np.concatenate([np.asarray(a.score[k], np.float64) for k in keys])
    xb = np.concatenate([np.asarray(b.score[k], np.float64) for k in keys])
    overlap = agreement(sa, sb)
    return {
        "a": a.label,
        "b": b.label,
        "responses": len(keys),
        "tokens": int(sa.size),
        "selected_a": int(sa.sum()),
        "selected_b": int(sb.sum()),
        "both": int((sa & sb).sum()),
        "jaccard": overlap["jaccard"],
        "precision": overlap["precision"],
        "recall": overlap["recall"],
        "spearman": spearman(xa, xb),
        "score_a": a.score_column,
        "score_b": b.score_column,
    }


def compare_all(methods: Sequence[MethodTokens]) -> list[dict[str, object]]:
    """`compare_pair` for every unordered pair, in the order given."""
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise VlmCreditError(f"methods to compare must have distinct labels (got {labels})")
    return [
        compare_pair(methods[i], methods[j])
        for i in range(len(methods))
        for j in range(i + 1, len(methods))
    ]
