"""Graphs (bipartite, similarity) against brute-force edge lists; clustering backends against
planted communities and networkx's modularity."""

from __future__ import annotations

import random
import sys

import igraph
import networkx as nx
import numpy as np
import pytest

from vlmcredit.analysis.clustering import ClusterConfig, cluster_graph, modularity
from vlmcredit.analysis.graphs import (
    bipartite_graph,
    similarity_graph,
    to_networkx,
    write_graphml,
)
from vlmcredit.errors import VlmCreditError


def _edges(graph: igraph.Graph) -> dict[tuple[int, int], float]:
    return {(min(e.source, e.target), max(e.source, e.target)): e["weight"] for e in graph.es}


# ---- bipartite -------------------------------------------------------------------------------


def test_bipartite_hand_example():
    att = np.array(
        [
            [0.50, 0.10, 0.00, 0.20],
            [0.05, 0.05, 0.30, 0.00],
        ]
    )
    g = bipartite_graph(att, top_k=2)
    assert g.vcount() == 6 and g["num_tokens"] == 2
    assert g.vs["type"] == [False, False, True, True, True, True]
    # token 0 -> cells 0 (0.5) and 3 (0.2); token 1 -> cell 2 (0.3) and one of the 0.05 ties
    e = _edges(g)
    assert e[(0, 2)] == 0.5 and e[(0, 5)] == 0.2 and e[(1, 4)] == 0.3
    assert len(e) == 4
    assert ((1, 2) in e) != ((1, 3) in e)


def test_bipartite_min_mass_and_both_and_dense():
    att = np.array(
        [
            [0.50, 0.10, 0.00, 0.20],  # row mass 0.8
            [0.05, 0.05, 0.30, 0.00],  # row mass 0.4
        ]
    )
    # min_mass 0.2: token 0 keeps >= 0.16 (0.5, 0.2); token 1 keeps >= 0.08 (0.3)
    e = _edges(bipartite_graph(att, top_k=None, min_mass=0.2))
    assert set(e) == {(0, 2), (0, 5), (1, 4)}
    # both: top_k=1 and min_mass 0.2 -> intersection
    e = _edges(bipartite_graph(att, top_k=1, min_mass=0.2))
    assert set(e) == {(0, 2), (1, 4)}
    # neither: every positive entry, zeros never become edges
    e = _edges(bipartite_graph(att, top_k=None))
    assert set(e) == {(0, 2), (0, 3), (0, 5), (1, 2), (1, 3), (1, 4)}
    assert e[(1, 3)] == 0.05


def test_bipartite_matches_brute_force():
    rng = np.random.default_rng(0)
    att = rng.random((20, 30)) * (rng.random((20, 30)) > 0.3)
    t, n, k, m = 20, 30, 5, 0.05
    ref = {}
    for i in range(t):
        row_mass = sum(att[i])
        order = sorted(range(n), key=lambda v: -att[i, v])[:k]
        for v in order:
            if att[i, v] > 0 and att[i, v] >= m * row_mass:
                ref[(i, t + v)] = att[i, v]
    got = _edges(bipartite_graph(att, top_k=k, min_mass=m))
    assert got == ref


@pytest.mark.parametrize(
    ("kwargs", "att", "match"),
    [
        ({"top_k": 0}, np.full((2, 3), 0.1), "top_k"),
        ({"min_mass": 0.0}, np.full((2, 3), 0.1), "min_mass"),
        ({"min_mass": 1.5}, np.full((2, 3), 0.1), "min_mass"),
        ({}, -np.full((2, 3), 0.1), "negative"),
        ({}, np.full((2, 3, 4), 0.1), "expected"),
    ],
)
def test_bipartite_rejects_bad_input(kwargs, att, match):
    with pytest.raises(VlmCreditError, match=match):
        bipartite_graph(att, **kwargs)


# ---- similarity ------------------------------------------------------------------------------


def _similarity_reference(att: np.ndarray, k: int) -> dict[tuple[int, int], float]:
    t = att.shape[0]
    cos = np.zeros((t, t))
    for i in range(t):
        for j in range(t):
            ni, nj = np.sqrt(sum(att[i] ** 2)), np.sqrt(sum(att[j] ** 2))
            cos[i, j] = sum(att[i] * att[j]) / (ni * nj) if ni > 0 and nj > 0 else 0.0
    ref = {}
    for i in range(t):
        others = sorted((j for j in range(t) if j != i), key=lambda j: -cos[i, j])[:k]
        for j in others:
            if cos[i, j] > 0:
                ref[(min(i, j), max(i, j))] = cos[i, j]
    return ref


def test_similarity_matches_brute_force():
    rng = np.random.default_rng(1)
    att = rng.random((25, 12)) ** 3
    att[7] = 0.0  # a token with no image attention: isolated
    g = similarity_graph(att, k=4)
    assert g.vcount() == 25 and g["num_tokens"] == 25
    got = _edges(g)
    ref = _similarity_reference(att, 4)
    assert set(got) == set(ref)
    for key, w in ref.items():
        assert got[key] == pytest.approx(w, abs=1e-6)
    assert g.degree(7) == 0
    assert not any(g.is_multiple())


def test_similarity_small_and_capped():
    assert similarity_graph(np.array([[0.3, 0.1]]), k=5).ecount() == 0
    g = similarity_graph(np.array([[0.3, 0.1], [0.1, 0.3], [0.2, 0.2]]), k=10)  # k -> 2
    assert g.ecount() == 3
    with pytest.raises(VlmCreditError, match="knn"):
        similarity_graph(np.full((3, 2), 0.1), k=0)


# ---- export ----------------------------------------------------------------------------------


def test_networkx_and_graphml_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    g = bipartite_graph(rng.random((6, 5)), top_k=2)
    nxg = to_networkx(g)
    assert nxg.number_of_nodes() == 11 and nxg.number_of_edges() == g.ecount()
    for e in g.es:
        assert nxg.edges[e.source, e.target]["weight"] == e["weight"]
    assert nxg.nodes[0]["type"] is False and nxg.nodes[6]["type"] is True

    path = tmp_path / "g.graphml"
    write_graphml(g, path)
    back = nx.read_graphml(path)
    assert back.number_of_edges() == g.ecount()
    weights = sorted(d["weight"] for _, _, d in back.edges(data=True))
    np.testing.assert_allclose(weights, sorted(g.es["weight"]), rtol=1e-12)
    with pytest.raises(VlmCreditError, match="folder does not exist"):
        write_graphml(g, tmp_path / "missing" / "g.graphml")


# ---- clustering ------------------------------------------------------------------------------


def _two_blocks(seed: int = 0) -> tuple[igraph.Graph, np.ndarray]:
    """Two dense weighted blocks of 12 vertices joined by a few light edges (shuffled ids)."""
    rng = np.random.default_rng(seed)
    n = 24
    perm = rng.permutation(n)
    truth = np.zeros(n, dtype=int)
    truth[perm[12:]] = 1
    edges, weights = [], []
    for i in range(n):
        for j in range(i + 1, n):
            same = truth[i] == truth[j]
            if (same and rng.random() < 0.7) or (not same and rng.random() < 0.05):
                edges.append((i, j))
                weights.append(float(rng.uniform(0.5, 1.0) if same else rng.uniform(0.01, 0.1)))
    g = igraph.Graph(n=n, edges=edges)
    g.es["weight"] = weights
    return g, truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a, b, strict=True)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _nx_modularity(g: igraph.Graph, membership: np.ndarray) -> float:
    nxg = nx.Graph()
    nxg.add_nodes_from(range(g.vcount()))
    nxg.add_weighted_edges_from((e.source, e.target, e["weight"]) for e in g.es)
    groups = [set(np.flatnonzero(membership == c).tolist()) for c in np.unique(membership)]
    return nx.algorithms.community.modularity(nxg, groups, weight="weight")


CONFIGS = [
    ClusterConfig(backend="igraph"),
    ClusterConfig(backend="igraph", objective="CPM", resolution=0.2),
    ClusterConfig(backend="leidenalg"),
    ClusterConfig(backend="leidenalg", resolution=0.8),
    ClusterConfig(backend="leidenalg", objective="CPM", resolution=0.2),
    ClusterConfig(backend="metis", parts=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.backend}-{c.objective}-{c.resolution}")
def test_backends_recover_planted_blocks(cfg):
    g, truth = _two_blocks()
    res = cluster_graph(g, cfg)
    assert res.membership.dtype == np.int64 and res.membership.shape == (24,)
    assert _same_partition(res.membership, truth)
    # quality = weighted Newman modularity, checked against networkx
    assert res.quality == pytest.approx(_nx_modularity(g, res.membership), abs=1e-9)
    assert res.quality > 0.3


def test_bipartite_objective_recovers_blocks():
    # tokens 0-9, cells 10-19; tokens 0-4 attend cells 10-14, tokens 5-9 cells 15-19
    rng = np.random.default_rng(3)
    att = rng.random((10, 10)) * 0.01
    att[:5, :5] += rng.uniform(0.1, 0.2, (5, 5))
    att[5:, 5:] += rng.uniform(0.1, 0.2, (5, 5))
    g = bipartite_graph(att, top_k=6)
    res = cluster_graph(g, ClusterConfig(backend="leidenalg", objective="bipartite"))
    truth = np.array([0] * 5 + [1] * 5 + [0] * 5 + [1] * 5)
    assert _same_partition(res.membership, truth)


@pytest.mark.parametrize("backend", ["igraph", "leidenalg", "metis"])
def test_same_seed_same_clusters(backend):
    rng = np.random.default_rng(4)
    att = rng.random((60, 40)) ** 4
    g = similarity_graph(att, k=6)
    cfg = ClusterConfig(backend=backend, seed=7, parts=4)
    first = cluster_graph(g, cfg).membership
    random.seed(12345)  # the caller's global RNG state must not matter ...
    random.random()
    second = cluster_graph(g, cfg).membership
    np.testing.assert_array_equal(first, second)


def test_igraph_backend_leaves_global_random_alone():
    g, _ = _two_blocks(1)
    random.seed(99)
    expected = [random.random() for _ in range(3)]
    random.seed(99)
    cluster_graph(g, ClusterConfig(backend="igraph"))
    assert [random.random() for _ in range(3)] == expected


def test_graphs_without_edges_give_finite_quality():
    g = igraph.Graph(n=5)
    g.es["weight"] = []
    for cfg in (ClusterConfig(), ClusterConfig(backend="leidenalg"), ClusterConfig("metis")):
        res = cluster_graph(g, cfg)
        assert res.quality == 0.0
        assert res.membership.shape == (5,)
    empty = cluster_graph(igraph.Graph(n=0), ClusterConfig())
    assert empty.membership.shape == (0,) and empty.quality == 0.0
    assert modularity(g, np.zeros(5, dtype=int)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "louvain"}, "backend"),
        ({"objective": "surprise"}, "objective"),
        ({"objective": "bipartite"}, "needs backend 'leidenalg'"),
        ({"resolution": 0.0}, "resolution"),
        ({"resolution": float("nan")}, "resolution"),
        ({"n_iterations": 0}, "n_iterations"),
        ({"seed": -1}, "seed"),
        ({"backend": "metis", "parts": 0}, "parts"),
    ],
)
def test_cluster_config_rejects_bad_values(kwargs, match):
    with pytest.raises(VlmCreditError, match=match):
        ClusterConfig(**kwargs).check()


def test_metis_without_pymetis_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymetis", None)  # import pymetis -> ImportError
    with pytest.raises(VlmCreditError, match=r"pip install 'vlmcredit\[metis\]'"):
        ClusterConfig(backend="metis").check()
