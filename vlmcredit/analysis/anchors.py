"""Anchor tokens (AT-RL): cluster response tokens by attention topology, take the most
image-connected clusters until about `ratio` of the tokens are covered.

Pipeline for one sample, `label_anchors(att, cfg)` with att the (T, N) aggregated response x
image attention: sink handling -> connectivity -> graph (bipartite or similarity) -> clustering
-> clusters ranked by mean connectivity -> selection toward the ratio. The default fill
("clusters-then-tokens") takes whole clusters from the most connected down while they fit in
round(ratio * T) tokens, then the best-connected tokens of the next cluster, so every response
gets exactly that many anchors; "whole-clusters" (the earlier behaviour) stops at the cluster
boundary nearest the ratio, which holds the ratio only on average over responses.
`ratio_scope="batch"` applies the same selection to the pooled clusters of a batch
(`select_batch`). A threshold-only labelling (top `ratio` by connectivity, no graph) is always
computed alongside for comparison; mode "threshold" uses it as the answer.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vlmcredit.analysis.clustering import ClusterConfig, cluster_graph
from vlmcredit.analysis.connectivity import SINK_MODES, check_attention, connectivity, debias_sinks
from vlmcredit.analysis.graphs import bipartite_graph, similarity_graph
from vlmcredit.errors import VlmCreditError

ANCHOR_MODES = ("bipartite", "similarity", "threshold")
RATIO_SCOPES = ("response", "batch")  # where the ratio holds: each response, or the batch
FILLS = ("clusters-then-tokens", "whole-clusters")
# Named settings. "paper": the AT-RL paper as its public summaries describe it (token-token
# attention-pattern similarity graph, METIS). A preset sets these fields where they still hold
# their defaults; a different non-default value with it is refused (two answers to one question).
PRESETS: dict[str, dict[str, str]] = {
    "none": {},
    "paper": {"mode": "similarity", "cluster.backend": "metis"},
}
# The per-response share is held to +-RATIO_TOLERANCE of the target when the response has at
# least MIN_TOKENS_FOR_TOLERANCE tokens (an exact count is within 0.5 / T of ratio * T / T).
RATIO_TOLERANCE = 0.02
MIN_TOKENS_FOR_TOLERANCE = math.ceil(0.5 / RATIO_TOLERANCE)


@dataclass
class AnchorConfig:
    """Every parameter of anchor labelling (recorded in run manifests via to_dict)."""

    mode: str = "bipartite"
    ratio: float = 0.15
    other_weight: float = 0.0
    top_k: int | None = 16  # bipartite: image edges kept per token
    min_mass: float | None = None  # bipartite: keep edges >= min_mass * the token's image mass
    knn: int = 10  # similarity: neighbours per token
    sink: str = "none"
    sink_k: int = 0
    ratio_scope: str = "response"
    fill: str = "clusters-then-tokens"
    preset: str = "none"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def apply_preset(self) -> None:
        """Set the preset's fields that still hold their defaults; refuse a conflicting one."""
        if self.preset not in PRESETS:
            raise VlmCreditError(
                f"anchor preset (--preset) {self.preset!r} is unknown; use one of "
                f"{', '.join(PRESETS)}"
            )
        defaults = {"mode": AnchorConfig.mode, "cluster.backend": ClusterConfig.backend}
        for key, value in PRESETS[self.preset].items():
            holder = self.cluster if key.startswith("cluster.") else self
            name = key.rsplit(".", 1)[-1]
            current = getattr(holder, name)
            if current not in (value, defaults[key]):
                flag = "--" + name.replace("_", "-")
                raise VlmCreditError(
                    f"--preset {self.preset} sets {flag} {value}, but {flag} {current} was "
                    f"given; drop one of them"
                )
            setattr(holder, name, value)

    def check(self) -> None:
        """Raise VlmCreditError for an impossible parameter (after applying the preset)."""
        self.apply_preset()
        if self.ratio_scope not in RATIO_SCOPES:
            raise VlmCreditError(
                f"ratio scope (--ratio-scope) {self.ratio_scope!r} is unknown; use one of "
                f"{', '.join(RATIO_SCOPES)}"
            )
        if self.fill not in FILLS:
            raise VlmCreditError(
                f"fill rule (--fill) {self.fill!r} is unknown; use one of {', '.join(FILLS)}"
            )
        if self.mode not in ANCHOR_MODES:
            raise VlmCreditError(
                f"anchor mode (--mode) {self.mode!r} is unknown; use one of "
                f"{', '.join(ANCHOR_MODES)}"
            )
        if not (math.isfinite(float(self.ratio)) and 0.0 < float(self.ratio) <= 1.0):
            raise VlmCreditError(f"ratio (--ratio) must be in (0, 1] (got {self.ratio})")
        if not (math.isfinite(float(self.other_weight)) and float(self.other_weight) >= 0.0):
            raise VlmCreditError(
                f"other_weight (--other-weight) must be >= 0 (got {self.other_weight})"
            )
        if self.top_k is not None and int(self.top_k) < 1:
            raise VlmCreditError(f"top_k (--top-k) must be >= 1 or None (got {self.top_k})")
        if self.min_mass is not None and not (0.0 < float(self.min_mass) <= 1.0):
            raise VlmCreditError(
                f"min_mass (--min-mass) must be in (0, 1] or None (got {self.min_mass})"
            )
        if int(self.knn) < 1:
            raise VlmCreditError(f"knn (--knn) must be >= 1 (got {self.knn})")
        if self.sink not in SINK_MODES:
            raise VlmCreditError(
                f"sink mode (--sink) {self.sink!r} is unknown; use one of {', '.join(SINK_MODES)}"
            )
        if int(self.sink_k) < 0 or (self.sink == "topk" and int(self.sink_k) < 1):
            raise VlmCreditError(
                f"sink_k (--sink-k) must be >= 1 with --sink topk and >= 0 otherwise (got "
                f"{self.sink_k})"
            )
        if self.mode == "similarity" and self.cluster.objective == "bipartite":
            raise VlmCreditError(
                "objective 'bipartite' needs anchor mode 'bipartite'; change --objective or --mode"
            )
        self.cluster.check()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClusterInfo:
    id: int
    size: int
    mean_connectivity: float
    anchor: bool  # some of its tokens are anchors (all of them unless it was the filled one)
    num_anchors: int = 0


@dataclass
class AnchorResult:
    """Per-token labels of one sample plus per-cluster summary (docs/FORMATS.md, anchors)."""

    connectivity: np.ndarray  # (T,) float64, after sink handling
    cluster: np.ndarray  # (T,) int32, 0 = highest mean connectivity; -1 in threshold mode
    anchor: np.ndarray  # (T,) bool
    weight: np.ndarray  # (T,) float32: 1.0 anchors, other_weight others
    threshold_anchor: np.ndarray  # (T,) bool, top ratio by connectivity
    clusters: list[ClusterInfo]
    # weighted modularity of the clustered graph (bipartite: tokens + image cells);
    # None in threshold mode and for an empty response
    modularity: float | None
    ratio_achieved: float  # anchors / T, 0.0 for T == 0
    note: str | None
    timing: dict[str, float]  # seconds: graph, cluster
    # the clustered igraph graph, its token vertices annotated with connectivity, cluster and
    # anchor (for GraphML / networkx export); None in threshold mode and degenerate cases
    graph: Any = field(default=None, repr=False, compare=False)

    def columns(self) -> dict[str, np.ndarray]:
        """Per-token columns with the dtypes of anchors.parquet."""
        return {
            "connectivity": self.connectivity.astype(np.float32),
            "cluster": self.cluster.astype(np.int32),
            "anchor": self.anchor.astype(bool),
            "weight": self.weight.astype(np.float32),
            "threshold_anchor": self.threshold_anchor.astype(bool),
        }

    def summary(self) -> dict:
        """Per-sample entry of anchors.json `samples` (without sample_id)."""
        return {
            "num_tokens": int(self.anchor.size),
            "num_anchors": int(self.anchor.sum()),
            "ratio_achieved": float(self.ratio_achieved),
            "modularity": self.modularity,
            "clusters": [asdict(c) for c in self.clusters],
            "note": self.note,
        }


def threshold_anchors(connectivity: np.ndarray, ratio: float) -> np.ndarray:
    """The top n = round-half-up(ratio * T) tokens by connectivity, at least 1 when T > 0.

    Ties are broken by token index (earlier token first), so the result is deterministic.
    """
    conn = np.asarray(connectivity, dtype=np.float64).ravel()
    if not 0.0 < float(ratio) <= 1.0:
        raise VlmCreditError(f"ratio must be in (0, 1] (got {ratio})")
    num = conn.size
    out = np.zeros(num, dtype=bool)
    if num == 0:
        return out
    out[np.argsort(-conn, kind="stable")[: anchor_count(num, ratio)]] = True
    return out


def anchor_count(num_tokens: int, ratio: float) -> int:
    """round-half-up(ratio * T), at least 1 when T > 0: the anchors a response (or batch) gets."""
    if num_tokens <= 0:
        return 0
    # 1e-9 absorbs binary rounding (0.15 * 200 = 29.999999999999996).
    return min(num_tokens, max(1, math.floor(float(ratio) * num_tokens + 0.5 + 1e-9)))


def fill_clusters(connectivity: np.ndarray, cluster: np.ndarray, count: int) -> np.ndarray:
    """Exactly `count` anchors: whole clusters, most image-connected first, while they fit; then
    the best-connected tokens of the first cluster that does not fit (ties: earlier token).

    Clusters are ranked by mean connectivity (ties: lower cluster id first), as in
    `select_clusters`. A cluster larger than the room left is split rather than skipped, so the
    selection stays a prefix of the cluster ranking: no lower-ranked cluster is taken whole
    while a higher-ranked one is passed over.
    """
    conn = np.asarray(connectivity, dtype=np.float64).ravel()
    clus = np.asarray(cluster).ravel()
    if conn.shape != clus.shape:
        raise VlmCreditError(
            f"connectivity has {conn.size} values but cluster has {clus.size}; pass one per token"
        )
    out = np.zeros(conn.size, dtype=bool)
    if conn.size == 0 or count <= 0:
        return out
    ids, inverse, sizes, means = _cluster_means(conn, clus)
    taken = 0
    for c in np.lexsort((ids, -means)):
        members = np.nonzero(inverse == c)[0]
        room = int(count) - taken
        if sizes[c] <= room:
            out[members] = True
            taken += int(sizes[c])
        else:
            best = members[np.argsort(-conn[members], kind="stable")[:room]]
            out[best] = True
            taken += room
        if taken >= count:
            break
    return out


def select_anchors(
    connectivity: np.ndarray, cluster: np.ndarray, ratio: float, fill: str
) -> np.ndarray:
    """The anchor mask of one selection unit (a response, or a pooled batch) by `fill`."""
    if fill == "whole-clusters":
        return select_clusters(connectivity, cluster, ratio)
    return fill_clusters(connectivity, cluster, anchor_count(np.asarray(cluster).size, ratio))


def ratio_spread(
    ratios: np.ndarray,
    num_tokens: np.ndarray,
    target: float,
    tolerance: float = RATIO_TOLERANCE,
) -> dict[str, float | int | None]:
    """How the per-response anchor shares spread around the target (anchors.json, report).

    `within_tolerance`: share of responses within +-tolerance of the target; `long_enough`:
    responses with at least ceil(0.5 / tolerance) tokens, the length from which an exact count
    can land within the tolerance; `within_tolerance_long_enough`: the share among those.
    """
    r = np.asarray(ratios, dtype=np.float64).ravel()
    n = np.asarray(num_tokens, dtype=np.int64).ravel()
    keep = n > 0  # an empty response has no share
    r, n = r[keep], n[keep]
    inside = np.abs(r - float(target)) <= float(tolerance) + 1e-12
    long = n >= math.ceil(0.5 / float(tolerance))
    return {
        "tolerance": float(tolerance),
        "num_responses": int(r.size),
        "min": float(r.min()) if r.size else None,
        "median": float(np.median(r)) if r.size else None,
        "max": float(r.max()) if r.size else None,
        "within_tolerance": float(inside.mean()) if r.size else None,
        "long_enough": int(long.sum()),
        "within_tolerance_long_enough": float(inside[long].mean()) if long.any() else None,
    }


def _cluster_means(conn: np.ndarray, cluster: np.ndarray):
    ids, inverse = np.unique(cluster, return_inverse=True)
    sizes = np.bincount(inverse, minlength=ids.size)
    means = np.bincount(inverse, weights=conn, minlength=ids.size) / sizes
    return ids, inverse, sizes, means


def select_clusters(connectivity: np.ndarray, cluster: np.ndarray, ratio: float) -> np.ndarray:
    """Anchor mask from whole clusters, most image-connected first.

    Clusters are ranked by mean connectivity (ties: lower cluster id first). The top cluster is
    always taken; each next cluster is added while adding it brings the anchor share strictly
    closer to `ratio`, and selection stops at the first cluster that does not (a tie stops).
    So |achieved - ratio| <= (largest cluster size) / T.
    """
    conn = np.asarray(connectivity, dtype=np.float64).ravel()
    clus = np.asarray(cluster).ravel()
    if conn.shape != clus.shape:
        raise VlmCreditError(
            f"connectivity has {conn.size} values but cluster has {clus.size}; pass one per token"
        )
    if not 0.0 < float(ratio) <= 1.0:
        raise VlmCreditError(f"ratio must be in (0, 1] (got {ratio})")
    num = conn.size
    if num == 0:
        return np.zeros(0, dtype=bool)
    ids, inverse, sizes, means = _cluster_means(conn, clus)
    order = np.lexsort((ids, -means))
    chosen = [order[0]]
    taken = int(sizes[order[0]])
    for c in order[1:]:
        if abs((taken + sizes[c]) / num - ratio) < abs(taken / num - ratio):
            chosen.append(c)
            taken += int(sizes[c])
        else:
            break
    return np.isin(inverse, np.asarray(chosen))


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Overlap of two anchor masks: jaccard, precision = |a & b| / |a|, recall = |a & b| / |b|.

    An empty denominator gives 1.0 when both masks are empty (they agree) and 0.0 otherwise.
    """
    x = np.asarray(a, dtype=bool).ravel()
    y = np.asarray(b, dtype=bool).ravel()
    if x.shape != y.shape:
        raise VlmCreditError(f"anchor masks differ in length ({x.size} vs {y.size})")
    inter = int(np.sum(x & y))
    union = int(np.sum(x | y))
    na, nb = int(x.sum()), int(y.sum())
    both_empty = 1.0 if na == 0 and nb == 0 else 0.0
    return {
        "jaccard": inter / union if union else both_empty,
        "precision": inter / na if na else both_empty,
        "recall": inter / nb if nb else both_empty,
    }


def _rank_clusters(conn: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..K-1 by mean connectivity (descending; ties: earlier first token)."""
    ids, first, inverse = np.unique(membership, return_index=True, return_inverse=True)
    sizes = np.bincount(inverse, minlength=ids.size)
    means = np.bincount(inverse, weights=conn, minlength=ids.size) / sizes
    order = np.lexsort((first, -means))
    rank = np.empty(ids.size, dtype=np.int32)
    rank[order] = np.arange(ids.size, dtype=np.int32)
    return rank[inverse]


def _rows_identical(arr: np.ndarray, conn: np.ndarray) -> bool:
    """All rows equal (to 1e-12 of the largest entry): no attention topology to cluster."""
    if arr.size == 0:
        return True
    tol = 1e-12 * max(1.0, float(arr.max()))
    if float(conn.max() - conn.min()) > tol * arr.shape[1]:
        return False  # cheap exit: row masses already differ
    return bool(np.abs(arr - arr[0]).max() <= tol)


def label_anchors(att: np.ndarray, cfg: AnchorConfig | None = None) -> AnchorResult:
    """Label anchor tokens of one sample from its (T, N) aggregated attention (before sinks).

    Sink handling (cfg.sink, cfg.sink_k) is applied here; connectivity is the debiased row mass.
    Bipartite mode clusters tokens and image cells together and keeps the tokens' cluster ids;
    similarity mode clusters the kNN graph of cosine similarity of the debiased rows.
    Degenerate inputs: T == 0 -> empty result (modularity None) with a note; N == 0 ->
    VlmCreditError; one token, or all tokens attending identically (uniform attention) -> one
    cluster holding every token, all anchors whatever the fill (no evidence to tell tokens
    apart), modularity 0.0, with a note.
    """
    cfg = cfg if cfg is not None else AnchorConfig()
    cfg.check()
    arr = check_attention(att)
    num_tokens, num_image = arr.shape
    if num_image == 0:
        raise VlmCreditError(
            "no image tokens in this sample (attention has 0 image columns); drop text-only "
            "samples or check the image placeholder in the prompt"
        )
    if arr.size and float(arr.min()) < 0:
        raise VlmCreditError("attention has negative entries; pass softmax attention (>= 0)")
    timing = {"graph": 0.0, "cluster": 0.0}
    if num_tokens == 0:
        return AnchorResult(
            connectivity=np.zeros(0),
            cluster=np.zeros(0, dtype=np.int32),
            anchor=np.zeros(0, dtype=bool),
            weight=np.zeros(0, dtype=np.float32),
            threshold_anchor=np.zeros(0, dtype=bool),
            clusters=[],
            modularity=None,
            ratio_achieved=0.0,
            note="empty response: no tokens to label",
            timing=timing,
        )
    deb = debias_sinks(arr, cfg.sink, cfg.sink_k)
    conn = connectivity(deb)
    thr = threshold_anchors(conn, cfg.ratio)
    note: str | None = None
    modularity: float | None
    graph = None
    if cfg.mode == "threshold":
        cluster = np.full(num_tokens, -1, dtype=np.int32)
        anchor = thr.copy()
        modularity = None
        clusters: list[ClusterInfo] = []
    else:
        if num_tokens == 1 or _rows_identical(deb, conn):
            note = (
                "one response token: one cluster"
                if num_tokens == 1
                else "uniform attention (all tokens attend identically): one cluster, all anchors"
            )
            membership = np.zeros(num_tokens, dtype=np.int64)
            modularity = 0.0
        else:
            t0 = time.perf_counter()
            if cfg.mode == "bipartite":
                graph = bipartite_graph(deb, top_k=cfg.top_k, min_mass=cfg.min_mass)
            else:
                graph = similarity_graph(deb, k=cfg.knn)
            t1 = time.perf_counter()
            result = cluster_graph(graph, cfg.cluster)
            timing = {"graph": t1 - t0, "cluster": time.perf_counter() - t1}
            membership = result.membership[:num_tokens]  # bipartite: drop image vertices
            modularity = result.quality
        cluster = _rank_clusters(conn, membership)
        if note is None:
            anchor = select_anchors(conn, cluster, cfg.ratio, cfg.fill)
        else:
            # No evidence to tell tokens apart: every token, not an arbitrary ratio of them by
            # index (the note says so, and the response reads as plain GRPO).
            anchor = np.ones(num_tokens, dtype=bool)
        clusters = _cluster_infos(conn, cluster, anchor)
    weight = np.where(anchor, np.float32(1.0), np.float32(cfg.other_weight)).astype(np.float32)
    if graph is not None:
        _annotate(graph, conn, cluster, anchor)
    return AnchorResult(
        connectivity=conn,
        cluster=cluster,
        anchor=anchor,
        weight=weight,
        threshold_anchor=thr,
        clusters=clusters,
        modularity=modularity,
        ratio_achieved=float(anchor.sum()) / num_tokens,
        note=note,
        timing=timing,
        graph=graph,
    )


def _cluster_infos(conn: np.ndarray, cluster: np.ndarray, anchor: np.ndarray) -> list[ClusterInfo]:
    ids, inverse, sizes, means = _cluster_means(conn, cluster)  # ids are 0..K-1 after ranking
    taken = np.bincount(inverse, weights=anchor.astype(np.float64), minlength=ids.size)
    return [
        ClusterInfo(int(i), int(s), float(m), anchor=bool(a > 0), num_anchors=int(a))
        for i, s, m, a in zip(ids, sizes, means, taken, strict=True)
    ]


def _relabel(res: AnchorResult, anchor: np.ndarray, threshold: np.ndarray, cfg: AnchorConfig):
    """`res` with a new anchor mask (batch selection): weights, cluster table, graph follow."""
    res.anchor = anchor
    res.threshold_anchor = threshold
    res.weight = np.where(anchor, np.float32(1.0), np.float32(cfg.other_weight)).astype(np.float32)
    if res.clusters:
        res.clusters = _cluster_infos(res.connectivity, res.cluster, anchor)
    res.ratio_achieved = float(anchor.sum()) / anchor.size if anchor.size else 0.0
    if res.graph is not None:
        _annotate(res.graph, res.connectivity, res.cluster, anchor)


def select_batch(results: list[AnchorResult], cfg: AnchorConfig) -> list[AnchorResult]:
    """Apply `cfg.ratio_scope` to the results of one batch (label_anchors per response first).

    "response": unchanged, each response already holds its ratio. "batch": the clusters of all
    responses are pooled (each stays a cluster of its own response; connectivity is one scale
    across responses) and selected by `cfg.fill` toward ratio x the batch's tokens, so some
    responses get many anchors and others none; the threshold comparison is pooled too.
    Results are updated in place and returned.
    """
    cfg.check()
    if cfg.ratio_scope == "response" or not results:
        return results
    conn = np.concatenate([r.connectivity for r in results])
    bounds = np.cumsum([0] + [r.connectivity.size for r in results])
    threshold = threshold_anchors(conn, cfg.ratio) if conn.size else np.zeros(0, dtype=bool)
    if cfg.mode == "threshold":
        anchor = threshold
    else:
        # pooled cluster ids: offset each response's (ranked) ids past the previous ones
        offsets = np.cumsum([0] + [len(r.clusters) or 1 for r in results])[:-1]
        cluster = np.concatenate([r.cluster + o for r, o in zip(results, offsets, strict=True)])
        anchor = select_anchors(conn, cluster, cfg.ratio, cfg.fill)
    for k, res in enumerate(results):
        lo, hi = bounds[k], bounds[k + 1]
        _relabel(res, anchor[lo:hi].copy(), threshold[lo:hi].copy(), cfg)
    return results


def _annotate(graph: Any, conn: np.ndarray, cluster: np.ndarray, anchor: np.ndarray) -> None:
    """Per-vertex labels for a looked-at graph; image vertices (bipartite) get -1 / False / 0."""
    extra = graph.vcount() - conn.size
    graph.vs["connectivity"] = np.concatenate([conn, np.zeros(extra)]).astype(float).tolist()
    graph.vs["cluster"] = np.concatenate([cluster, np.full(extra, -1)]).astype(int).tolist()
    graph.vs["anchor"] = np.concatenate([anchor, np.zeros(extra, bool)]).tolist()
