"""Anchor labelling per sample: graph build + Leiden, igraph vs leidenalg vs threshold-only.

Input: synthetic response x image attention with planted anchors (tests/analysis/planted.py):
T response tokens, N image tokens on a grid, 15% of tokens attending sharply to one region.
Each variant runs `label_anchors` (sink handling, connectivity, graph, clustering, selection)
on every sample; time per sample = median of --repeats runs after one warm-up, and the table
shows the median over samples, the graph / cluster split, and recovery of the planted anchors.

    python benchmarks/anchors.py                      # T = N = 1000, 10 samples
    python benchmarks/anchors.py --tokens 2000 --grid 40 50 --metis

Prints one table and the ratios (time / igraph of the same graph mode, and / threshold-only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.analysis.planted import planted_attention  # noqa: E402
from vlmcredit.analysis.anchors import AnchorConfig, agreement, label_anchors  # noqa: E402
from vlmcredit.analysis.clustering import ClusterConfig  # noqa: E402


def variants(metis: bool) -> list[tuple[str, AnchorConfig]]:
    out = [("threshold", AnchorConfig(mode="threshold"))]
    backends = ["igraph", "leidenalg"] + (["metis"] if metis else [])
    for mode in ("bipartite", "similarity"):
        for backend in backends:
            out.append(
                (f"{mode}/{backend}", AnchorConfig(mode=mode, cluster=ClusterConfig(backend)))
            )
    return out


def run(name: str, cfg: AnchorConfig, samples, repeats: int) -> dict:
    times, graph_t, clus_t, prec, rec, ncl, mod = [], [], [], [], [], [], []
    for att, planted in samples:
        label_anchors(att, cfg)  # warm-up (imports, allocator)
        per = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = label_anchors(att, cfg)
            per.append(time.perf_counter() - t0)
        times.append(statistics.median(per))
        graph_t.append(res.timing["graph"])
        clus_t.append(res.timing["cluster"])
        agr = agreement(res.anchor, planted)
        prec.append(agr["precision"])
        rec.append(agr["recall"])
        ncl.append(len(res.clusters))
        if res.modularity is not None:
            mod.append(res.modularity)
    return {
        "name": name,
        "median_ms": 1000 * statistics.median(times),
        "graph_ms": 1000 * statistics.median(graph_t),
        "cluster_ms": 1000 * statistics.median(clus_t),
        "precision": float(np.mean(prec)),
        "recall": float(np.mean(rec)),
        "min_pr": float(min(min(prec), min(rec))),
        "clusters": statistics.median(ncl),
        "modularity": f"{np.median(mod):.3f}" if mod else "-",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1000, help="response tokens T")
    ap.add_argument("--grid", type=int, nargs=2, default=(25, 40), help="image grid (N = r*c)")
    ap.add_argument("--region", type=int, default=4, help="side of the planted region in cells")
    ap.add_argument("--anchor-share", type=float, default=0.15)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--metis", action="store_true", help="also time the METIS backend")
    args = ap.parse_args()

    samples = [
        planted_attention(
            num_tokens=args.tokens,
            grid=tuple(args.grid),
            num_anchors=round(args.anchor_share * args.tokens),
            region=args.region,
            seed=s,
        )
        for s in range(args.samples)
    ]
    n_image = args.grid[0] * args.grid[1]
    print(
        f"T={args.tokens} N={n_image} samples={args.samples} repeats={args.repeats} "
        f"(planted anchors {args.anchor_share:.0%}, region {args.region}x{args.region})"
    )
    rows = [run(name, cfg, samples, args.repeats) for name, cfg in variants(args.metis)]
    by = {r["name"]: r for r in rows}
    header = (
        f"{'variant':22s} {'median ms':>9s} {'graph ms':>8s} {'clust ms':>8s} "
        f"{'prec':>5s} {'recall':>6s} {'min P/R':>7s} {'clusters':>8s} {'modul.':>6s} "
        f"{'/ igraph':>8s} {'/ thresh':>8s}"
    )
    print(header)
    for r in rows:
        mode = r["name"].split("/")[0]
        ref = by.get(f"{mode}/igraph", r)
        print(
            f"{r['name']:22s} {r['median_ms']:9.2f} {r['graph_ms']:8.2f} {r['cluster_ms']:8.2f} "
            f"{r['precision']:5.3f} {r['recall']:6.3f} {r['min_pr']:7.3f} {r['clusters']:8.1f} "
            f"{r['modularity']:>6s} {r['median_ms'] / ref['median_ms']:8.2f} "
            f"{r['median_ms'] / by['threshold']['median_ms']:8.1f}"
        )
    for mode in ("bipartite", "similarity"):
        ms = by[f"{mode}/igraph"]["median_ms"]
        verdict = "met" if ms <= 100 else "NOT met"
        print(f"target {mode}/igraph median <= 100 ms per sample: {ms:.1f} ms ({verdict})")


if __name__ == "__main__":
    main()
