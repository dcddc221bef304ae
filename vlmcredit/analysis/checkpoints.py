"""How connectivity, anchors and vision-critical heads change between checkpoints (pure numpy).

`vlmcredit compare --ckpt A --ckpt B ...` labels anchors with every checkpoint on the same
rollouts (and ablates heads on the same MME set); the pipeline reads the tables into the
dataclasses below and this module turns them into per-checkpoint figures and the shift of every
pair (A -> B): the change of each figure, the overlap of the anchor tokens (keyed by sample_id and
token_index), the rank correlation of per-token connectivity, and the change of each head's drop.
Every difference is later minus earlier (b - a).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vlmcredit.analysis.anchors import agreement
from vlmcredit.analysis.compare import spearman
from vlmcredit.analysis.connectivity import BIMODALITY_THRESHOLD, bimodality_coefficient
from vlmcredit.errors import VlmCreditError

HeadKey = tuple[int | None, int]  # (layer or None = the head index in every layer, head)

# The per-checkpoint token figures whose change a pair reports (key -> key + "_change").
TOKEN_FIGURES = (
    "anchor_share",
    "connectivity_mean",
    "connectivity_median",
    "bimodality_coefficient",
    "anchor_connectivity_mean",
    "other_connectivity_mean",
    "anchor_contrast",
)
HEAD_FIGURES = ("baseline", "baseline_total", "num_critical", "mean_drop", "max_drop")


@dataclass
class CheckpointTokens:
    """One checkpoint's anchors table: one entry per response token."""

    label: str
    sample_id: np.ndarray  # (n,) str
    token_index: np.ndarray  # (n,) int
    connectivity: np.ndarray  # (n,) float
    anchor: np.ndarray  # (n,) bool
    token_id: np.ndarray | None = None  # (n,) int, when the table has it

    def __post_init__(self) -> None:
        self.sample_id = np.asarray(self.sample_id).astype(str)
        self.token_index = np.asarray(self.token_index, dtype=np.int64)
        self.connectivity = np.asarray(self.connectivity, dtype=np.float64)
        self.anchor = np.asarray(self.anchor, dtype=bool)
        if self.token_id is not None:
            self.token_id = np.asarray(self.token_id, dtype=np.int64)
        n = self.sample_id.size
        sizes = [self.token_index.size, self.connectivity.size, self.anchor.size]
        if self.token_id is not None:
            sizes.append(self.token_id.size)
        if any(s != n for s in sizes):
            raise VlmCreditError(f"{self.label}: token columns differ in length")
        if n and not np.isfinite(self.connectivity).all():
            raise VlmCreditError(f"{self.label}: connectivity holds NaN or inf values")

    def order(self) -> np.ndarray:
        """Indices sorting the tokens by (sample_id, token_index)."""
        return np.lexsort((self.token_index, self.sample_id))


@dataclass
class CheckpointHeads:
    """One checkpoint's head ablation: the baseline score and each configuration's drop."""

    label: str
    metric: str  # the score the drops are measured on (total | perception)
    baseline: float  # baseline score on `metric`
    baseline_total: float
    drops: Mapping[HeadKey, float]  # configuration -> baseline - ablated score on `metric`
    critical: set[HeadKey] = field(default_factory=set)
    mode: str = "head-index"


# -- one checkpoint -------------------------------------------------------------------------------
def token_stats(t: CheckpointTokens) -> dict[str, object]:
    """Anchor share, connectivity mean / median, Sarle's bimodality coefficient, and the mean
    connectivity of anchors, of the other tokens and their difference (anchor_contrast; None
    when either group is empty)."""
    conn, anchor = t.connectivity, t.anchor
    n, k = int(conn.size), int(anchor.sum())
    mean_a = float(conn[anchor].mean()) if k else None
    mean_o = float(conn[~anchor].mean()) if k < n else None
    bc = bimodality_coefficient(conn)
    return {
        "tokens": n,
        "samples": int(np.unique(t.sample_id).size),
        "anchors": k,
        "anchor_share": k / n if n else None,
        "connectivity_mean": float(conn.mean()) if n else None,
        "connectivity_median": float(np.median(conn)) if n else None,
        "bimodality_coefficient": bc,
        "bimodal": bool(bc > BIMODALITY_THRESHOLD),
        "anchor_connectivity_mean": mean_a,
        "other_connectivity_mean": mean_o,
        "anchor_contrast": None if mean_a is None or mean_o is None else mean_a - mean_o,
    }


def _drops(h: CheckpointHeads) -> np.ndarray:
    return np.array([h.drops[k] for k in sorted_keys(h.drops)], dtype=np.float64)


def sorted_keys(keys: object) -> list[HeadKey]:
    """Configurations in (layer, head) order, every-layer ones (layer None) first."""
    return sorted(keys, key=lambda k: (-1 if k[0] is None else k[0], k[1]))  # type: ignore[arg-type]


def head_stats(h: CheckpointHeads) -> dict[str, object]:
    """Baseline, how many configurations are critical, and the mean / largest drop."""
    drops = _drops(h)
    if drops.size and not np.isfinite(drops).all():
        raise VlmCreditError(f"{h.label}: a head's drop is NaN or inf")
    return {
        "metric": h.metric,
        "mode": h.mode,
        "baseline": float(h.baseline),
        "baseline_total": float(h.baseline_total),
        "configurations": int(drops.size),
        "num_critical": len(h.critical),
        "critical": [{"layer": k[0], "head": k[1]} for k in sorted_keys(h.critical)],
        "mean_drop": float(drops.mean()) if drops.size else None,
        "max_drop": float(drops.max()) if drops.size else None,
    }


# -- a pair ---------------------------------------------------------------------------------------
def rollout_mismatch(a: CheckpointTokens, b: CheckpointTokens) -> str | None:
    """Why the two tables do not hold the same response tokens (None when they do): a sample
    only one holds, a response of another length, or (when both have token ids) other ids."""
    ia, ib = a.order(), b.order()
    sa, sb = set(a.sample_id.tolist()), set(b.sample_id.tolist())
    if sa != sb:
        only = sorted(sa - sb)
        side, other = (a.label, b.label) if only else (b.label, a.label)
        sample = only[0] if only else sorted(sb - sa)[0]
        return f"sample {sample!r} is only in {side}, not in {other}"
    if a.sample_id.size != b.sample_id.size or not (
        np.array_equal(a.sample_id[ia], b.sample_id[ib])
        and np.array_equal(a.token_index[ia], b.token_index[ib])
    ):
        counts_a = dict(zip(*np.unique(a.sample_id, return_counts=True), strict=True))
        counts_b = dict(zip(*np.unique(b.sample_id, return_counts=True), strict=True))
        bad = sorted(s for s in sa if counts_a[s] != counts_b[s])
        if bad:
            return (
                f"sample {bad[0]!r} has {counts_a[bad[0]]} response tokens in {a.label} and "
                f"{counts_b[bad[0]]} in {b.label}"
            )
        return f"{a.label} and {b.label} number their response tokens differently"
    if a.token_id is not None and b.token_id is not None:
        differ = np.flatnonzero(a.token_id[ia] != b.token_id[ib])
        if differ.size:
            i = differ[0]
            return (
                f"sample {str(a.sample_id[ia][i])!r} token {int(a.token_index[ia][i])} is token id "
                f"{int(a.token_id[ia][i])} in {a.label} and {int(b.token_id[ib][i])} in {b.label}"
            )
    return None


def _change(a: Mapping[str, object], b: Mapping[str, object], keys: Sequence[str]) -> dict:
    out: dict[str, float | None] = {}
    for key in keys:
        x, y = a.get(key), b.get(key)
        out[f"{key}_change"] = None if x is None or y is None else float(y) - float(x)  # type: ignore[arg-type]
    return out


def token_shift(a: CheckpointTokens, b: CheckpointTokens) -> dict[str, object]:
    """The shift from a to b on the same tokens: change of every `TOKEN_FIGURES` figure,
    overlap of the anchor tokens (jaccard, precision = share of a's anchors still anchors in b,
    recall = share of b's anchors that were anchors in a) and Spearman of connectivity."""
    problem = rollout_mismatch(a, b)
    if problem:
        raise VlmCreditError(
            f"{a.label} and {b.label} do not hold the same rollouts ({problem}); compare "
            "anchors runs made on the same --data with the same tokenizer"
        )
    ia, ib = a.order(), b.order()
    anchor_a, anchor_b = a.anchor[ia], b.anchor[ib]
    overlap = agreement(anchor_a, anchor_b)
    return {
        "tokens": int(anchor_a.size),
        "anchors_a": int(anchor_a.sum()),
        "anchors_b": int(anchor_b.sum()),
        "both": int((anchor_a & anchor_b).sum()),
        "jaccard": overlap["jaccard"],
        "precision": overlap["precision"],
        "recall": overlap["recall"],
        "connectivity_spearman": spearman(a.connectivity[ia], b.connectivity[ib]),
        **_change(token_stats(a), token_stats(b), TOKEN_FIGURES),
    }


def heads_mismatch(a: CheckpointHeads, b: CheckpointHeads) -> str | None:
    """Why the two ablations cannot be compared head by head (None when they can)."""
    if a.metric != b.metric:
        return f"{a.label} measures drops in {a.metric}, {b.label} in {b.metric}"
    if a.mode != b.mode:
        return f"{a.label} ablated in {a.mode} mode, {b.label} in {b.mode} mode"
    if set(a.drops) != set(b.drops):
        only = sorted_keys(set(a.drops) ^ set(b.drops))[0]
        side = a.label if only in a.drops else b.label
        where = "every layer" if only[0] is None else f"layer {only[0]}"
        return f"head {only[1]} ({where}) was ablated only in {side}"
    return None


def heads_shift(a: CheckpointHeads, b: CheckpointHeads) -> dict[str, object]:
    """The change from a to b: of the baseline and `HEAD_FIGURES`, of each configuration's drop
    (`heads`: layer, head, drop_a, drop_b, change, critical_a, critical_b, in (layer, head)
    order), the overlap of the critical sets and the Spearman of the drops over heads."""
    problem = heads_mismatch(a, b)
    if problem:
        raise VlmCreditError(
            f"{a.label} and {b.label}: head ablations differ ({problem}); run probe-heads with "
            "the same options on the same --mme"
        )
    keys = sorted_keys(a.drops)
    drop_a, drop_b = _drops(a), _drops(b)
    crit_a = np.array([k in a.critical for k in keys], dtype=bool)
    crit_b = np.array([k in b.critical for k in keys], dtype=bool)
    overlap = agreement(crit_a, crit_b)
    change = drop_b - drop_a
    return {
        "critical_jaccard": overlap["jaccard"],
        "critical_precision": overlap["precision"],
        "critical_recall": overlap["recall"],
        "drop_spearman": spearman(drop_a, drop_b),
        "mean_abs_drop_change": float(np.abs(change).mean()) if change.size else None,
        **_change(head_stats(a), head_stats(b), HEAD_FIGURES),
        "heads": [
            {
                "layer": k[0],
                "head": k[1],
                "drop_a": float(drop_a[i]),
                "drop_b": float(drop_b[i]),
                "change": float(change[i]),
                "critical_a": bool(crit_a[i]),
                "critical_b": bool(crit_b[i]),
            }
            for i, k in enumerate(keys)
        ],
    }


# -- all checkpoints ------------------------------------------------------------------------------
def pair_indices(n: int) -> list[tuple[int, int, str]]:
    """Consecutive pairs (0->1, 1->2, ...), then first -> last when there are more than two."""
    pairs = [(i, i + 1, "consecutive") for i in range(n - 1)]
    if n > 2:
        pairs.append((0, n - 1, "first-last"))
    return pairs


def compare_checkpoints(
    labels: Sequence[str],
    tokens: Sequence[CheckpointTokens] | None,
    heads: Sequence[CheckpointHeads] | None,
) -> dict[str, object]:
    """Per-checkpoint figures and every pair's shift, for tokens and / or heads.

    `tokens` and `heads` (each None, or one entry per label in the same order) hold the same
    checkpoints. Returns {"checkpoints": [{"label", "anchors": stats | None, "heads": stats +
    "drops" | None}], "pairs": [{"a", "b", "kind", "anchors": shift | None, "heads": shift |
    None}]}.
    """
    n = len(labels)
    if n < 2:
        raise VlmCreditError(f"compare: give at least two checkpoints (got {n})")
    if len(set(labels)) != n:
        raise VlmCreditError(f"compare: checkpoint labels must be distinct (got {list(labels)})")
    for name, side in (("anchors", tokens), ("heads", heads)):
        if side is not None and len(side) != n:
            raise VlmCreditError(f"compare: {len(side)} {name} results for {n} checkpoints")
    if tokens is None and heads is None:
        raise VlmCreditError("compare: nothing to compare (no anchors and no heads results)")
    checkpoints = []
    for i, label in enumerate(labels):
        entry: dict[str, object] = {"label": label, "anchors": None, "heads": None}
        if tokens is not None:
            entry["anchors"] = token_stats(tokens[i])
        if heads is not None:
            h = heads[i]
            entry["heads"] = {
                **head_stats(h),
                "drops": [
                    {
                        "layer": k[0],
                        "head": k[1],
                        "drop": float(h.drops[k]),
                        "critical": k in h.critical,
                    }
                    for k in sorted_keys(h.drops)
                ],
            }
        checkpoints.append(entry)
    pairs = [
        {
            "a": labels[i],
            "b": labels[j],
            "kind": kind,
            "anchors": token_shift(tokens[i], tokens[j]) if tokens is not None else None,
            "heads": heads_shift(heads[i], heads[j]) if heads is not None else None,
        }
        for i, j, kind in pair_indices(n)
    ]
    return {"checkpoints": checkpoints, "pairs": pairs}
