"""Graph clustering backends: igraph's Leiden, leidenalg's Leiden, METIS (pymetis, optional).

Every parameter that changes the result (backend, objective, resolution, iterations, seed,
METIS parts) lives in ClusterConfig and is recorded by the caller. All backends report the
same quality number, the weighted Newman modularity of the returned partition, so they compare.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import igraph
import numpy as np

from vlmcredit.errors import VlmCreditError

BACKENDS = ("igraph", "leidenalg", "metis")
# "bipartite": Barber's weighted bipartite modularity (leidenalg only, bipartite graphs only).
OBJECTIVES = ("modularity", "CPM", "bipartite")


def _have_pymetis() -> bool:
    try:
        import pymetis  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ClusterConfig:
    """How to cluster. `objective`/`resolution`/`n_iterations` apply to the Leiden backends;
    `parts` (K) to METIS, which ignores them. n_iterations < 0 runs Leiden until stable.

    resolution: for "modularity" the usual gamma (1.0 = Newman modularity); for "CPM" a density
    threshold in edge-weight units (attention weights are small: try 0.001-0.05); for
    "bipartite" the gamma of Barber's modularity (1.0 = standard).
    """

    backend: str = "igraph"
    objective: str = "modularity"
    resolution: float = 1.0
    n_iterations: int = 2
    seed: int = 0
    parts: int = 8

    def check(self) -> None:
        """Raise VlmCreditError for an impossible or unavailable setting."""
        if self.backend not in BACKENDS:
            raise VlmCreditError(
                f"cluster backend (--backend) {self.backend!r} is unknown; use one of "
                f"{', '.join(BACKENDS)}"
            )
        if self.objective not in OBJECTIVES:
            raise VlmCreditError(
                f"cluster objective (--objective) {self.objective!r} is unknown; use one of "
                f"{', '.join(OBJECTIVES)}"
            )
        if self.objective == "bipartite" and self.backend != "leidenalg":
            raise VlmCreditError(
                "objective 'bipartite' needs backend 'leidenalg'; set --backend leidenalg"
            )
        if not (math.isfinite(float(self.resolution)) and float(self.resolution) > 0):
            raise VlmCreditError(f"resolution (--resolution) must be > 0 (got {self.resolution})")
        if int(self.n_iterations) == 0:
            raise VlmCreditError(
                "n_iterations (--n-iterations) must be >= 1, or negative to iterate until stable "
                "(got 0)"
            )
        if int(self.seed) < 0:
            raise VlmCreditError(f"seed (--seed) must be >= 0 (got {self.seed})")
        if int(self.parts) < 1:
            raise VlmCreditError(f"METIS parts (--parts) must be >= 1 (got {self.parts})")
        if self.backend == "metis" and not _have_pymetis():
            raise VlmCreditError(
                "cluster backend 'metis' needs pymetis; pip install 'vlmcredit[metis]' or use "
                "--backend igraph"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Clustering:
    """membership: community id per vertex (0..K-1, int64); quality: weighted modularity."""

    membership: np.ndarray
    quality: float


def modularity(graph: igraph.Graph, membership: np.ndarray) -> float:
    """Weighted Newman modularity (resolution 1) of a partition; 0.0 for a graph without edge
    weight, where modularity is undefined (igraph would return NaN)."""
    weights = graph.es["weight"] if "weight" in graph.es.attributes() else None
    total = float(np.sum(weights)) if weights is not None else float(graph.ecount())
    if graph.ecount() == 0 or total <= 0:
        return 0.0
    return float(graph.modularity([int(m) for m in membership], weights=weights))


def _compact(membership) -> np.ndarray:
    """Relabel ids to 0..K-1 in order of first appearance (backends differ in numbering)."""
    _, first, inverse = np.unique(
        np.asarray(membership, dtype=np.int64), return_index=True, return_inverse=True
    )
    order = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    return order[inverse].astype(np.int64)


def _igraph_leiden(graph: igraph.Graph, cfg: ClusterConfig) -> list[int]:
    # igraph draws from a process-wide generator; a private random.Random(seed) makes the result
    # reproducible without touching the caller's `random` state. Restore igraph's default (the
    # `random` module) afterwards.
    igraph.set_random_number_generator(random.Random(int(cfg.seed)))
    try:
        result = graph.community_leiden(
            objective_function=cfg.objective,
            weights="weight" if graph.ecount() else None,
            resolution=float(cfg.resolution),
            n_iterations=int(cfg.n_iterations),
        )
    finally:
        igraph.set_random_number_generator(random)
    return list(result.membership)


def _leidenalg(graph: igraph.Graph, cfg: ClusterConfig) -> list[int]:
    import leidenalg

    weights = "weight" if graph.ecount() else None
    n_iter = int(cfg.n_iterations)
    if cfg.objective == "bipartite":
        if "type" not in graph.vs.attributes():
            raise VlmCreditError(
                "objective 'bipartite' needs a bipartite graph (vertex attribute 'type'); use "
                "graph mode 'bipartite'"
            )
        types = [bool(t) for t in graph.vs["type"]]
        if len(set(types)) < 2:
            return [0] * graph.vcount()
        strength = graph.strength(weights=weights)
        total = float(sum(strength)) / 2.0
        if total <= 0:
            return list(range(graph.vcount()))
        # Barber's modularity sum_c [w_c - gamma K_c(0) K_c(1) / m] as leidenalg's three-layer
        # CPM construction (CPMVertexPartition.Bipartite) with weighted degrees as node sizes.
        gamma = float(cfg.resolution) / (2.0 * total)
        empty = graph.subgraph_edges([], delete_vertices=False)
        layers = [
            leidenalg.CPMVertexPartition(
                graph, weights=weights, node_sizes=strength, resolution_parameter=gamma
            ),
            leidenalg.CPMVertexPartition(
                empty,
                node_sizes=[s if not t else 0.0 for s, t in zip(strength, types, strict=True)],
                resolution_parameter=gamma,
            ),
            leidenalg.CPMVertexPartition(
                empty,
                node_sizes=[s if t else 0.0 for s, t in zip(strength, types, strict=True)],
                resolution_parameter=gamma,
            ),
        ]
        opt = leidenalg.Optimiser()
        opt.set_rng_seed(int(cfg.seed))
        opt.optimise_partition_multiplex(layers, layer_weights=[1, -1, -1], n_iterations=n_iter)
        return list(layers[0].membership)
    if cfg.objective == "CPM":
        kind, extra = leidenalg.CPMVertexPartition, {"resolution_parameter": cfg.resolution}
    elif float(cfg.resolution) == 1.0:
        kind, extra = leidenalg.ModularityVertexPartition, {}
    else:
        kind, extra = (
            leidenalg.RBConfigurationVertexPartition,
            {"resolution_parameter": cfg.resolution},
        )
    part = leidenalg.find_partition(
        graph, kind, weights=weights, n_iterations=n_iter, seed=int(cfg.seed), **extra
    )
    return list(part.membership)


def _metis(graph: igraph.Graph, cfg: ClusterConfig) -> list[int]:
    import pymetis

    n = graph.vcount()
    parts = min(int(cfg.parts), n)
    if parts <= 1:
        return [0] * n
    if graph.ecount() == 0:
        # No structure to cut: K contiguous, balanced blocks (what METIS aims for anyway).
        return (np.arange(n) * parts // n).tolist()
    edges = np.asarray(graph.get_edgelist(), dtype=np.int64)
    w = np.asarray(graph.es["weight"], dtype=np.float64)
    keep = edges[:, 0] != edges[:, 1]  # METIS takes no self-loops
    edges, w = edges[keep], w[keep]
    # METIS wants positive integer weights: scale so the heaviest edge is 1000, floor at 1.
    wint = np.maximum(1, np.rint(w / max(float(w.max()), 1e-300) * 1000.0)).astype(np.int64)
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    ww = np.concatenate([wint, wint])
    order = np.lexsort((dst, src))
    src, dst, ww = src[order], dst[order], ww[order]
    xadj = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n))])
    opts = pymetis.Options(seed=int(cfg.seed))
    if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2; xadj/adjncy is deprecated there
        graph_arg = {"adjacency": pymetis.CSRAdjacency(xadj.tolist(), dst.tolist())}
    else:
        graph_arg = {"xadj": xadj.tolist(), "adjncy": dst.tolist()}
    _, membership = pymetis.part_graph(parts, eweights=ww.tolist(), options=opts, **graph_arg)
    return list(membership)


def cluster_graph(graph: igraph.Graph, cfg: ClusterConfig) -> Clustering:
    """Partition the graph's vertices with the configured backend (deterministic per seed).

    Edge attribute "weight" is used when present. Membership ids are compacted to 0..K-1 in
    order of first vertex; quality is the weighted modularity of that partition.
    """
    cfg.check()
    if graph.vcount() == 0:
        return Clustering(membership=np.zeros(0, dtype=np.int64), quality=0.0)
    if graph.ecount() and "weight" not in graph.es.attributes():
        graph = graph.copy()
        graph.es["weight"] = [1.0] * graph.ecount()
    if cfg.backend == "igraph":
        raw = _igraph_leiden(graph, cfg)
    elif cfg.backend == "leidenalg":
        raw = _leidenalg(graph, cfg)
    else:
        raw = _metis(graph, cfg)
    membership = _compact(raw)
    return Clustering(membership=membership, quality=modularity(graph, membership))
