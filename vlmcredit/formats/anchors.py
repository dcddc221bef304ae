"""anchors.parquet + anchors.json of an anchors run: the one writer and the one validating reader.

`vlmcredit.pipelines.anchors_tables` assembles the token table and the summary object from the
run's shards (docs/FORMATS.md, "anchors run"); this module puts them on disk and reads them
back. The reader is strict about what every consumer needs (the columns in `REQUIRED_COLUMNS`,
`ratio_target` / `ratio_achieved`, a well-formed histogram when there is one) and leaves the
optional columns and keys to the caller, so a table from an older run still reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_json, atomic_write_parquet
from vlmcredit.formats.run import Run

ANCHORS_PARQUET = "anchors.parquet"
ANCHORS_JSON = "anchors.json"
COLUMNS = (
    "sample_id",
    "token_index",
    "token_id",
    "token",
    "connectivity",
    "cluster",
    "anchor",
    "weight",
    "threshold_anchor",
)
REQUIRED_COLUMNS = ("sample_id", "token_index", "token", "connectivity", "anchor")
HINT = "rerun vlmcredit anchors"


@dataclass
class AnchorsTables:
    """What an anchors run's tables hold: one row per response token, and the summary."""

    tokens: Any  # pandas DataFrame in file order (sample by sample, token_index ascending)
    summary: dict[str, Any]  # anchors.json


# -- writing --------------------------------------------------------------------------------------
def write_anchors(run_dir: Path, tokens: Any, summary: dict[str, Any]) -> None:
    """Write anchors.parquet (the token table, columns as `COLUMNS`) and then anchors.json."""
    if tuple(tokens.columns) != COLUMNS:  # a bug in whoever built the table
        raise ValueError(f"anchors.parquet columns {list(tokens.columns)}, expected {COLUMNS}")
    atomic_write_parquet(Path(run_dir) / ANCHORS_PARQUET, tokens)
    atomic_write_json(Path(run_dir) / ANCHORS_JSON, summary)


# -- reading --------------------------------------------------------------------------------------
def read_anchor_tokens(
    run_dir: Path, columns: tuple[str, ...] | None = None, required: tuple[str, ...] | None = None
) -> Any:
    """anchors.parquet as a DataFrame (only `columns` when given; those are then required).

    Without `columns` every stored column is read and `REQUIRED_COLUMNS` must be among them.
    """
    import pyarrow.parquet as pq

    file = Path(run_dir) / ANCHORS_PARQUET
    if not file.is_file():
        raise VlmCreditError(f"{run_dir}: missing {ANCHORS_PARQUET}; {HINT}")
    try:
        present = set(pq.read_schema(file).names)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise VlmCreditError(f"{file}: unreadable parquet ({exc}); {HINT}") from None
    needed = tuple(columns) if columns is not None else (required or REQUIRED_COLUMNS)
    missing = [c for c in needed if c not in present]
    if missing:
        raise VlmCreditError(f"{file}: missing column(s) {', '.join(missing)}; {HINT}")
    try:
        table = pq.read_table(file, columns=list(columns) if columns is not None else None)
    except Exception as exc:
        raise VlmCreditError(f"{file}: unreadable parquet ({exc}); {HINT}") from None
    return table.to_pandas()


def read_anchors_summary(run_dir: Path) -> dict[str, Any]:
    """anchors.json, checked: an object with numeric ratio_target / ratio_achieved and, when
    present, a histogram with one more edge than counts."""
    file = Path(run_dir) / ANCHORS_JSON
    if not file.is_file():
        raise VlmCreditError(f"{run_dir}: missing {ANCHORS_JSON}; {HINT}")
    try:
        summary = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmCreditError(f"{file}: not valid JSON ({exc}); {HINT}") from None
    if not isinstance(summary, dict):
        raise VlmCreditError(f"{file}: expected a JSON object; {HINT}")
    for key in ("ratio_target", "ratio_achieved"):
        if key not in summary:
            raise VlmCreditError(f"{file}: missing key '{key}'; {HINT}")
        value = summary[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise VlmCreditError(f"{file}: '{key}' is not a number ({value!r}); {HINT}")
    conn = summary.get("connectivity")
    if conn is not None and not isinstance(conn, dict):
        raise VlmCreditError(f"{file}: 'connectivity' is not an object; {HINT}")
    hist = (conn or {}).get("histogram")
    if hist is not None:
        edges = hist.get("edges") if isinstance(hist, dict) else None
        counts = hist.get("counts") if isinstance(hist, dict) else None
        if not isinstance(edges, list) or not isinstance(counts, list):
            raise VlmCreditError(f"{file}: connectivity.histogram lacks edges/counts; {HINT}")
        if len(edges) != len(counts) + 1:
            raise VlmCreditError(
                f"{file}: connectivity.histogram has {len(edges)} edges for {len(counts)} "
                f"counts (need one more edge than counts); {HINT}"
            )
    return summary


def read_anchors(run_dir: Path) -> AnchorsTables:
    """anchors.parquet and anchors.json of an anchors run folder, validated."""
    return AnchorsTables(read_anchor_tokens(run_dir), read_anchors_summary(run_dir))


@dataclass
class SampleImages:
    """What an anchors shard stores for one sample's picture side, as numpy arrays."""

    attention: np.ndarray  # (T, N) float64, response tokens x image tokens
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 in original-image pixels
    owner: np.ndarray  # (N,) image index of each image token
    thumbs: dict[int, tuple[np.ndarray, float]]  # image -> (h, w, 3) uint8, thumb px per px


def read_sample_images(run: Run, sample_id: str, num_tokens: int) -> SampleImages | None:
    """A sample's stored attention, image geometry and thumbnails (numpy, no torch import);
    None when the run stored no tensors for it. `num_tokens`: its rows in anchors.parquet."""
    if run.shard_of(sample_id) is None:
        return None
    tensors = run.tensors(sample_id, framework="np")
    where = f"{run.path / str(run.shard_of(sample_id))} sample {sample_id!r}"
    for name in ("attention", "image_boxes"):
        if name not in tensors:
            raise VlmCreditError(f"{where}: missing tensor '{name}'; {HINT}")
    attention = np.asarray(tensors["attention"], dtype=np.float64)
    boxes = np.asarray(tensors["image_boxes"], dtype=np.float64)
    if attention.ndim != 2 or attention.shape[0] != num_tokens:
        raise VlmCreditError(
            f"{where}: attention has shape {tuple(attention.shape)}, expected ({num_tokens}, N) "
            f"for its tokens in {ANCHORS_PARQUET}; {HINT}"
        )
    n = attention.shape[1]
    if boxes.shape != (n, 4):
        raise VlmCreditError(
            f"{where}: image_boxes has shape {tuple(boxes.shape)}, expected ({n}, 4); {HINT}"
        )
    owner = tensors.get("image_owner")
    owner = np.zeros(n, dtype=np.int64) if owner is None else np.asarray(owner, dtype=np.int64)
    if owner.shape != (n,):
        raise VlmCreditError(
            f"{where}: image_owner has shape {tuple(owner.shape)}, expected ({n},); {HINT}"
        )
    thumbs = {}
    for name, value in tensors.items():
        if not name.startswith("thumb."):
            continue
        k = int(name.split(".", 1)[1])
        arr = np.asarray(value)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise VlmCreditError(f"{where}: {name} is not an (h, w, 3) uint8 image; {HINT}")
        scale = tensors.get(f"thumb_scale.{k}")
        if scale is None:
            # No recorded scale: infer it from the boxes of that image (thumb spans the image).
            mine = boxes[owner == k]
            extent = float(mine[:, 2].max()) if mine.size else float(arr.shape[1])
            scale = arr.shape[1] / extent if extent > 0 else 1.0
        thumbs[k] = (arr, float(np.asarray(scale).reshape(-1)[0]))
    return SampleImages(attention, boxes, owner, thumbs)


__all__ = [
    "ANCHORS_JSON",
    "ANCHORS_PARQUET",
    "COLUMNS",
    "REQUIRED_COLUMNS",
    "AnchorsTables",
    "SampleImages",
    "read_anchor_tokens",
    "read_anchors",
    "read_anchors_summary",
    "read_sample_images",
    "write_anchors",
]
