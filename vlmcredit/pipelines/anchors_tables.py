"""The tables of an anchors run, assembled from its shards when the run finishes.

anchors.parquet (one row per response token), anchors.json (summary + per-sample clusters) and
the trainer contract signals.parquet (docs/FORMATS.md). Built from the shards alone, so a
resumed run writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmcredit.analysis.anchors import AnchorConfig, agreement, ratio_spread
from vlmcredit.analysis.connectivity import connectivity_stats
from vlmcredit.formats.anchors import COLUMNS, write_anchors
from vlmcredit.formats.run import Run, row_sample_id
from vlmcredit.methods.registry import Method
from vlmcredit.pipelines.method_signals import write_method_signals


def write_tables(
    run: Run, processor: Any, analysis: AnchorConfig, finish_seconds: float, method: Method
) -> dict[str, Any]:
    """anchors.parquet, signals.parquet and anchors.json from the run's shards.

    `timing.total` = the wall seconds each shard booked (every invocation, killed ones up to
    their last commit) + `finish_seconds`, this invocation's time since its last batch."""
    import pandas as pd

    tok = processor.tokenizer
    ratio = analysis.ratio
    token_rows: list[pd.DataFrame] = []
    signal_rows: list[dict[str, Any]] = []
    per_sample: list[dict[str, Any]] = []
    all_conn, all_anchor, all_thresh = [], [], []
    timing = np.zeros(4)  # capture, graph, cluster, wall
    for row in run.rows:
        if row["status"] != "done":
            continue
        sid = row["id"]
        t = run.tensors(sid)
        ids = t["response_ids"].tolist()
        conn = t["connectivity"].numpy()
        anchor = t["anchor"].numpy().astype(bool)
        thresh = t["threshold_anchor"].numpy().astype(bool)
        cluster = t["cluster"].numpy()
        weight = t["weight"].numpy()
        recorded = t["timing"].numpy()
        timing[: recorded.size] += recorded  # shards of older versions hold 3 fields
        token_rows.append(
            pd.DataFrame(
                {
                    "sample_id": sid,
                    "token_index": np.arange(len(ids), dtype=np.int32),
                    "token_id": np.asarray(ids, dtype=np.int64),
                    "token": [tok.decode([i]) for i in ids],
                    "connectivity": conn.astype(np.float32),
                    "cluster": cluster.astype(np.int32),
                    "anchor": anchor,
                    "weight": weight.astype(np.float32),
                    "threshold_anchor": thresh,
                }
            )
        )
        signal_rows.append(
            {
                "sample_id": row_sample_id(row),  # the trainer's id: shared within a group
                "token_ids": ids,
                "weight": weight.astype(np.float32).tolist(),
                "mask": anchor.tolist(),
                "cluster_id": cluster.astype(np.int32).tolist(),
            }
        )
        clusters = t["clusters"].numpy()
        per_sample.append(
            {
                "sample_id": sid,
                "num_tokens": len(ids),
                "num_anchors": int(anchor.sum()),
                "ratio_achieved": float(anchor.mean()) if len(ids) else 0.0,
                "modularity": float(t["modularity"][0]) if "modularity" in t else None,
                "clusters": [
                    {
                        "id": i,
                        "size": int(c[0]),
                        "mean_connectivity": float(c[1]),
                        "anchor": bool(c[2]),
                        # below the size only for the cluster the fill split
                        "num_anchors": int(anchor[cluster == i].sum()),
                    }
                    for i, c in enumerate(clusters)
                ],
            }
        )
        all_conn.append(conn)
        all_anchor.append(anchor)
        all_thresh.append(thresh)
    table = (
        pd.concat(token_rows, ignore_index=True)
        if token_rows
        else pd.DataFrame(columns=list(COLUMNS))
    )
    conn = np.concatenate(all_conn) if all_conn else np.zeros(0)
    anchor = np.concatenate(all_anchor) if all_anchor else np.zeros(0, bool)
    thresh = np.concatenate(all_thresh) if all_thresh else np.zeros(0, bool)
    stats = connectivity_stats(conn, anchor)
    modularities = [s["modularity"] for s in per_sample if s["modularity"] is not None]
    summary = {
        "ratio_target": ratio,
        "ratio_achieved": float(anchor.mean()) if anchor.size else 0.0,
        "num_samples": len(per_sample),
        "num_tokens": int(anchor.size),
        "num_anchors": int(anchor.sum()),
        "mean_modularity": float(np.mean(modularities)) if modularities else None,
        # the ratio per response, not only over the run (ratio_scope / fill in parameters)
        "ratio_per_response": ratio_spread(
            np.array([s["ratio_achieved"] for s in per_sample]),
            np.array([s["num_tokens"] for s in per_sample]),
            ratio,
        ),
        "ratio_scope": analysis.ratio_scope,
        "fill": analysis.fill,
        "agreement": agreement(anchor, thresh),
        "connectivity": stats.to_dict(),
        "timing": {
            "capture": float(timing[0]),
            "graph": float(timing[1]),
            "cluster": float(timing[2]),
            "total": float(timing[3] + finish_seconds),
        },
        # the invocations `timing` sums: the first and each --resume
        "invocations": 1 + len(run.manifest.get("resumed_at", [])),
    }
    write_anchors(
        run.path,
        table,
        {**summary, "parameters": run.manifest["parameters"], "samples": per_sample},
    )
    write_method_signals(run, method, analysis, signal_rows)
    return summary
