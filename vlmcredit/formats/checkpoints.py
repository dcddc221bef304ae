"""The checkpoint comparison of `vlmcredit compare --ckpt ...` (or `--anchors-run ...`): the one
writer and the one validating reader of checkpoints.json, checkpoints.parquet and
checkpoint_heads.parquet (docs/FORMATS.md, "checkpoint comparison").

checkpoints.json: {"kind": "checkpoints", "source": "checkpoints" | "runs", "rollouts",
"mme", "checkpoints": [{"index", "label", "checkpoint", "weights_sha1", "anchors_run",
"heads_run", "anchors": stats | null, "heads": stats + "drops" | null}], "pairs": [{"a", "b",
"kind", "anchors": shift | null, "heads": shift | null}]}.
checkpoints.parquet: one row per checkpoint (`CHECKPOINT_COLUMNS`).
checkpoint_heads.parquet (when heads were compared): one row per checkpoint and ablated
configuration (`HEAD_COLUMNS`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_json, atomic_write_parquet

CHECKPOINTS_JSON = "checkpoints.json"
CHECKPOINTS_PARQUET = "checkpoints.parquet"
CHECKPOINT_HEADS_PARQUET = "checkpoint_heads.parquet"
KIND = "checkpoints"
ANCHOR_COLUMNS = (
    "tokens", "samples", "anchors", "anchor_share", "connectivity_mean", "connectivity_median",
    "bimodality_coefficient", "bimodal", "anchor_connectivity_mean", "other_connectivity_mean",
    "anchor_contrast",
)  # fmt: skip
HEAD_FIGURE_COLUMNS = (
    "metric", "baseline", "baseline_total", "configurations", "num_critical", "mean_drop",
    "max_drop",
)  # fmt: skip
CHECKPOINT_COLUMNS = (
    "index", "label", "checkpoint", "weights_sha1", "anchors_run", "heads_run",
    *ANCHOR_COLUMNS, *HEAD_FIGURE_COLUMNS,
)  # fmt: skip
HEAD_COLUMNS = ("index", "label", "layer", "head", "drop", "critical", "change")
HINT = "rerun vlmcredit compare"


def checkpoints_table(result: dict[str, Any]) -> Any:
    """checkpoints.parquet as a DataFrame: a checkpoint's figures, null where not measured."""
    import pandas as pd

    rows = []
    for c in result["checkpoints"]:
        anchors, heads = c.get("anchors") or {}, c.get("heads") or {}
        row = {k: c.get(k) for k in CHECKPOINT_COLUMNS[:6]}
        row.update({k: anchors.get(k) for k in ANCHOR_COLUMNS})
        row.update({k: heads.get(k) for k in HEAD_FIGURE_COLUMNS})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(CHECKPOINT_COLUMNS))
    for column in ANCHOR_COLUMNS + HEAD_FIGURE_COLUMNS:
        if column not in ("bimodal", "metric"):
            frame[column] = frame[column].astype("Float64")
    frame["bimodal"] = frame["bimodal"].astype("boolean")
    return frame


def checkpoint_heads_table(result: dict[str, Any]) -> Any:
    """checkpoint_heads.parquet: each checkpoint's drop per configuration (layer -1 = every
    layer) and its change from the previous checkpoint (null for the first)."""
    import pandas as pd

    rows, previous = [], {}
    for c in result["checkpoints"]:
        drops = (c.get("heads") or {}).get("drops") or []
        current = {}
        for d in drops:
            key = (d["layer"], d["head"])
            before = previous.get(key)
            rows.append(
                {
                    "index": c["index"],
                    "label": c["label"],
                    "layer": -1 if d["layer"] is None else d["layer"],
                    "head": d["head"],
                    "drop": d["drop"],
                    "critical": d["critical"],
                    "change": None if before is None else d["drop"] - before,
                }
            )
            current[key] = d["drop"]
        previous = current
    frame = pd.DataFrame(rows, columns=list(HEAD_COLUMNS))
    frame["change"] = frame["change"].astype("Float64")
    return frame


def write_checkpoints(folder: Path, result: dict[str, Any]) -> None:
    """Write the tables, then checkpoints.json (atomically; the caller finishes the manifest)."""
    folder = Path(folder)
    atomic_write_parquet(folder / CHECKPOINTS_PARQUET, checkpoints_table(result))
    if any(c.get("heads") for c in result["checkpoints"]):
        atomic_write_parquet(folder / CHECKPOINT_HEADS_PARQUET, checkpoint_heads_table(result))
    atomic_write_json(folder / CHECKPOINTS_JSON, result)


def read_checkpoints(folder: Path) -> dict[str, Any]:
    """checkpoints.json of a checkpoint comparison folder, checked, or a one-line error."""
    file = Path(folder) / CHECKPOINTS_JSON
    try:
        result = json.loads(file.read_text())
    except FileNotFoundError:
        raise VlmCreditError(
            f"{folder}: no {CHECKPOINTS_JSON}; run vlmcredit compare --ckpt"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmCreditError(f"{file}: unreadable ({exc}); {HINT}") from None
    if not isinstance(result, dict) or result.get("kind") != KIND:
        raise VlmCreditError(f"{file}: not a checkpoint comparison; {HINT}")
    checkpoints, pairs = result.get("checkpoints"), result.get("pairs")
    if not isinstance(checkpoints, list) or len(checkpoints) < 2:
        raise VlmCreditError(f"{file}: fewer than two checkpoints; {HINT}")
    if not isinstance(pairs, list):
        raise VlmCreditError(f"{file}: no pairs list; {HINT}")
    labels = []
    for i, c in enumerate(checkpoints):
        if not isinstance(c, dict) or not isinstance(c.get("label"), str):
            raise VlmCreditError(f"{file}: checkpoints[{i}] has no label; {HINT}")
        for part in ("anchors", "heads"):
            if c.get(part) is not None and not isinstance(c[part], dict):
                raise VlmCreditError(f"{file}: checkpoints[{i}].{part} is not an object; {HINT}")
        drops = (c.get("heads") or {}).get("drops", [])
        if not isinstance(drops, list) or not all(
            isinstance(d, dict) and {"layer", "head", "drop", "critical"} <= d.keys() for d in drops
        ):
            raise VlmCreditError(f"{file}: checkpoints[{i}].heads.drops is malformed; {HINT}")
        labels.append(c["label"])
    for i, p in enumerate(pairs):
        if not isinstance(p, dict) or p.get("a") not in labels or p.get("b") not in labels:
            raise VlmCreditError(f"{file}: pairs[{i}] does not name two checkpoints; {HINT}")
        heads = p.get("heads")
        if heads is not None and not isinstance((heads or {}).get("heads"), list):
            raise VlmCreditError(f"{file}: pairs[{i}].heads lacks its per-head list; {HINT}")
    return result


__all__ = [
    "CHECKPOINTS_JSON",
    "CHECKPOINTS_PARQUET",
    "CHECKPOINT_COLUMNS",
    "CHECKPOINT_HEADS_PARQUET",
    "HEAD_COLUMNS",
    "KIND",
    "checkpoint_heads_table",
    "checkpoints_table",
    "read_checkpoints",
    "write_checkpoints",
]
