"""Read run folders into small dataclasses for the report.

Strict about what a section needs (a clear `VlmCreditError` naming the run and the missing
file, key or column) and tolerant of everything optional (missing keys get a fallback computed
from the tables, or the part of the page that needs them is left out).

Shards are read with safetensors' numpy backend: a report needs float32/uint8/int arrays only,
and not importing torch keeps `vlmcredit report` quick.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError

HEADS_JSON = "heads.json"
ANCHORS_PARQUET = "anchors.parquet"
ANCHORS_JSON = "anchors.json"
SIGNALS_PARQUET = "signals.parquet"

ANCHOR_COLUMNS = ("sample_id", "token_index", "token", "connectivity", "anchor")
SIGNAL_COLUMNS = ("sample_id", "token_ids", "weight")


@dataclass
class RunInput:
    """One run folder given to the report: its manifest and samples table."""

    path: Path
    label: str  # short, unique, file-name safe: used for headings, anchors and figure files
    manifest: dict[str, Any]
    rows: list[dict[str, Any]]

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    @property
    def command(self) -> str:
        if self.manifest.get("command"):
            return str(self.manifest["command"])
        # An export folder's manifest may carry only the `signals` object.
        return "signals" if isinstance(self.manifest.get("signals"), dict) else "?"

    def where(self, name: str | None = None) -> str:
        """How error messages name this run (and one of its files)."""
        return str(self.path / name) if name else str(self.path)


def safe_name(text: str, limit: int = 60) -> str:
    """`text` reduced to characters that are safe in file names and HTML ids."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return (cleaned or "x")[:limit]


def load_run(path: Path, index: int) -> RunInput:
    """Open one run folder (manifest + samples table) or raise a one-line error."""
    from vlmcredit.formats.run import MANIFEST, Run

    path = Path(path)
    if not path.exists():
        raise VlmCreditError(f"{path}: no such run folder; pass folders written by vlmcredit")
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise VlmCreditError(
            f"{path}: not a run folder (no {MANIFEST}); pass folders written by vlmcredit"
        )
    try:
        run = Run.load(path)
    except (json.JSONDecodeError, OSError, ValueError) as exc:
        raise VlmCreditError(
            f"{path}: unreadable run ({type(exc).__name__}: {exc}); rerun the command"
        ) from None
    if not isinstance(run.manifest, dict):
        raise VlmCreditError(f"{path / MANIFEST}: not a JSON object; rerun the command")
    label = f"r{index}-{safe_name(path.resolve().name, 40)}"
    return RunInput(path, label, run.manifest, run.rows)


def _read_json(run: RunInput, name: str) -> dict[str, Any]:
    file = run.path / name
    if not file.is_file():
        raise VlmCreditError(f"{run.where()}: missing {name}; rerun the command that writes it")
    try:
        obj = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlmCreditError(f"{file}: not valid JSON ({exc}); rerun the command") from None
    if not isinstance(obj, dict):
        raise VlmCreditError(f"{file}: expected a JSON object; rerun the command")
    return obj


def _read_parquet(run: RunInput, name: str, required: tuple[str, ...]) -> Any:
    import pandas as pd

    file = run.path / name
    if not file.is_file():
        raise VlmCreditError(f"{run.where()}: missing {name}; rerun the command that writes it")
    try:
        frame = pd.read_parquet(file)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise VlmCreditError(f"{file}: unreadable parquet ({exc}); rerun the command") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise VlmCreditError(
            f"{file}: missing column(s) {', '.join(missing)}; rerun the command that writes it"
        )
    return frame


def _get(obj: Any, path: str, where: str) -> Any:
    """obj[a][b]... for path 'a.b', or an error naming the file and the key."""
    value = obj
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise VlmCreditError(f"{where}: missing key '{path}'; rerun the command that writes it")
        value = value[part]
    return value


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VlmCreditError(f"{where}: '{key}' is not a number ({value!r}); rerun the command")
    return float(value)


# -- heads ----------------------------------------------------------------------------------------
@dataclass
class HeadEntry:
    """One ablated configuration: a head in one layer, or (layer None) in every layer."""

    layer: int | None
    head: int
    drop: float  # baseline - ablated, on the run's metric
    scores: dict[str, float]
    subtasks: dict[str, float]
    critical: bool


@dataclass
class HeadsResult:
    """heads.json of a probe-heads run."""

    mode: str  # head-index | layer-head
    metric: str
    threshold: float
    baseline: dict[str, Any]
    heads: list[HeadEntry]
    categories: list[str]
    ablation: str | None = None
    answering: str | None = None
    num_questions: int | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)


def read_heads(run: RunInput) -> HeadsResult:
    """Parse heads.json; the keys the heads section draws from are required."""
    where = run.where(HEADS_JSON)
    obj = _read_json(run, HEADS_JSON)
    mode = _get(obj, "mode", where)
    if mode not in ("head-index", "layer-head"):
        raise VlmCreditError(f"{where}: mode {mode!r} is not head-index or layer-head")
    metric = str(obj.get("metric") or "total")
    threshold = _number(_get(obj, "threshold", where), "threshold", where)
    baseline = _get(obj, "baseline", where)
    _number(_get(baseline, metric, where), f"baseline.{metric}", where)
    raw = _get(obj, "heads", where)
    if not isinstance(raw, list) or not raw:
        raise VlmCreditError(f"{where}: 'heads' is empty; rerun vlmcredit probe-heads")
    heads = []
    for i, item in enumerate(raw):
        key = f"heads[{i}]"
        if not isinstance(item, dict):
            raise VlmCreditError(f"{where}: {key} is not an object; rerun vlmcredit probe-heads")
        head = _get(item, "head", f"{where} {key}")
        drops = _get(item, "drop", f"{where} {key}")
        drop = _number(_get(drops, metric, f"{where} {key}.drop"), f"{key}.drop.{metric}", where)
        layer = item.get("layer")
        if mode == "layer-head" and layer is None:
            raise VlmCreditError(f"{where}: {key} has no layer in layer-head mode")
        subtasks = item.get("subtasks") or {}
        critical = item.get("critical", drop > threshold)
        if not isinstance(critical, bool):
            raise VlmCreditError(
                f"{where}: {key}.critical is {critical!r}, not true/false; rerun probe-heads"
            )
        heads.append(
            HeadEntry(
                layer=None if layer is None or int(layer) < 0 else int(layer),
                head=int(head),
                drop=drop,
                scores={k: float(v) for k, v in (item.get("scores") or {}).items()},
                subtasks={k: float(v) for k, v in subtasks.items()},
                critical=critical,
            )
        )
    categories = list(obj.get("categories") or (baseline.get("subtasks") or {}).keys())
    return HeadsResult(
        mode=mode,
        metric=metric,
        threshold=threshold,
        baseline=baseline,
        heads=heads,
        categories=[str(c) for c in categories],
        ablation=obj.get("ablation"),
        answering=obj.get("answering"),
        num_questions=obj.get("num_questions"),
        checkpoint=obj.get("checkpoint") or {},
    )


# -- anchors --------------------------------------------------------------------------------------
@dataclass
class AnchorsResult:
    """anchors.parquet + anchors.json of an anchors run."""

    tokens: Any  # pandas DataFrame, one row per response token, sorted by sample then index
    summary: dict[str, Any]
    sample_ids: list[str]  # in run order
    ratio_target: float
    ratio_achieved: float
    edges: np.ndarray
    counts: np.ndarray
    cut: float | None
    threshold_mode: bool  # cluster == -1 everywhere: anchors are the top ratio, no clusters


def read_anchors(run: RunInput) -> AnchorsResult:
    """Parse the anchors tables; histogram and cut fall back to values computed from tokens."""
    frame = _read_parquet(run, ANCHORS_PARQUET, ANCHOR_COLUMNS)
    summary = _read_json(run, ANCHORS_JSON)
    where = run.where(ANCHORS_JSON)
    if frame.empty:
        raise VlmCreditError(f"{run.where(ANCHORS_PARQUET)}: no tokens; rerun vlmcredit anchors")
    frame = frame.copy()
    frame["sample_id"] = frame["sample_id"].astype(str)
    frame["token"] = frame["token"].fillna("").astype(str)
    frame["connectivity"] = frame["connectivity"].astype("float64")
    frame["anchor"] = frame["anchor"].astype(bool)
    if "cluster" not in frame.columns:
        frame["cluster"] = -1
    order = {sid: i for i, sid in enumerate(_run_order(run, frame))}
    frame["_order"] = frame["sample_id"].map(order)
    frame = frame.sort_values(["_order", "token_index"], kind="stable").drop(columns="_order")
    frame = frame.reset_index(drop=True)

    ratio_target = _number(_get(summary, "ratio_target", where), "ratio_target", where)
    ratio_achieved = _number(_get(summary, "ratio_achieved", where), "ratio_achieved", where)
    conn = summary.get("connectivity") or {}
    hist = conn.get("histogram") or {}
    values = frame["connectivity"].to_numpy()
    if hist.get("edges") is not None and hist.get("counts") is not None:
        edges = np.asarray(hist["edges"], dtype=np.float64)
        counts = np.asarray(hist["counts"], dtype=np.float64)
        if edges.ndim != 1 or counts.shape != (edges.size - 1,):
            raise VlmCreditError(
                f"{where}: connectivity.histogram has {edges.size} edges for {counts.size} "
                "counts (need one more edge than counts); rerun vlmcredit anchors"
            )
    else:
        counts, edges = np.histogram(values[np.isfinite(values)], bins=40)
        counts = counts.astype(np.float64)
    cut = conn.get("cut")
    if cut is None and frame["anchor"].any():
        cut = float(frame.loc[frame["anchor"], "connectivity"].min())
    return AnchorsResult(
        tokens=frame,
        summary=summary,
        sample_ids=list(order),
        ratio_target=ratio_target,
        ratio_achieved=ratio_achieved,
        edges=edges,
        counts=counts,
        cut=None if cut is None else float(cut),
        threshold_mode=bool((frame["cluster"] < 0).all()),
    )


def _run_order(run: RunInput, frame: Any) -> list[str]:
    """Sample ids in the order of samples.parquet, then any only the token table knows."""
    present = set(frame["sample_id"].unique())
    ordered = [str(r["id"]) for r in run.rows if str(r["id"]) in present]
    seen = set(ordered)
    for sid in frame["sample_id"].drop_duplicates():
        if sid not in seen:
            ordered.append(sid)
            seen.add(sid)
    return ordered


@dataclass
class SampleAttention:
    """What an anchors shard stores for one sample, as numpy arrays."""

    attention: np.ndarray  # (T, N) float
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 in original-image pixels
    owner: np.ndarray  # (N,) image index of each image token
    thumbs: dict[int, tuple[np.ndarray, float]]  # image -> (h, w, 3) uint8, thumb px per px


def read_sample_attention(run: RunInput, sample_id: str, num_tokens: int) -> SampleAttention | None:
    """The sample's stored attention and image geometry; None when the run stored no tensors."""
    from safetensors import safe_open

    row = next((r for r in run.rows if str(r["id"]) == sample_id and r.get("shard")), None)
    if row is None:
        return None
    shard = run.path / str(row["shard"])
    where = f"{shard} sample {sample_id!r}"
    if not shard.is_file():
        raise VlmCreditError(
            f"{run.where()}: missing {shard.name} (sample {sample_id!r}); rerun the command"
        )
    prefix = f"{sample_id}/"
    try:
        with safe_open(str(shard), framework="np") as f:
            tensors = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise VlmCreditError(f"{shard}: unreadable shard ({exc}); rerun the command") from None
    for name in ("attention", "image_boxes"):
        if name not in tensors:
            raise VlmCreditError(f"{where}: missing tensor '{name}'; rerun vlmcredit anchors")
    attention = np.asarray(tensors["attention"], dtype=np.float64)
    boxes = np.asarray(tensors["image_boxes"], dtype=np.float64)
    if attention.ndim != 2 or attention.shape[0] != num_tokens:
        raise VlmCreditError(
            f"{where}: attention has shape {tuple(attention.shape)}, expected ({num_tokens}, N) "
            "for its tokens in anchors.parquet; rerun vlmcredit anchors"
        )
    n = attention.shape[1]
    if boxes.shape != (n, 4):
        raise VlmCreditError(
            f"{where}: image_boxes has shape {tuple(boxes.shape)}, expected ({n}, 4)"
        )
    owner = tensors.get("image_owner")
    owner = np.zeros(n, dtype=np.int64) if owner is None else np.asarray(owner, dtype=np.int64)
    if owner.shape != (n,):
        raise VlmCreditError(
            f"{where}: image_owner has shape {tuple(owner.shape)}, expected ({n},)"
        )
    thumbs = {}
    for name, value in tensors.items():
        if not name.startswith("thumb."):
            continue
        k = int(name.split(".", 1)[1])
        arr = np.asarray(value)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise VlmCreditError(f"{where}: {name} is not an (h, w, 3) uint8 image")
        scale = tensors.get(f"thumb_scale.{k}")
        if scale is None:
            # No recorded scale: infer it from the boxes of that image (thumb spans the image).
            mine = boxes[owner == k]
            extent = float(mine[:, 2].max()) if mine.size else float(arr.shape[1])
            scale = arr.shape[1] / extent if extent > 0 else 1.0
        thumbs[k] = (arr, float(np.asarray(scale).reshape(-1)[0]))
    return SampleAttention(attention, boxes, owner, thumbs)


# -- signals --------------------------------------------------------------------------------------
@dataclass
class SignalsResult:
    """signals.parquet and the manifest's `signals` object."""

    table: Any  # pandas DataFrame
    meta: dict[str, Any]


def read_signals(run: RunInput) -> SignalsResult:
    """Parse signals.parquet; list columns must align with token_ids row by row."""
    frame = _read_parquet(run, SIGNALS_PARQUET, SIGNAL_COLUMNS)
    where = run.where(SIGNALS_PARQUET)
    frame = frame.copy()
    frame["sample_id"] = frame["sample_id"].astype(str)
    for i, row in enumerate(frame.itertuples(index=False)):
        n = len(row.token_ids)
        for column in ("weight", "mask", "cluster_id", "paragraph_id"):
            values = getattr(row, column) if column in frame.columns else None
            if values is not None and len(values) != n:
                raise VlmCreditError(
                    f"{where}: row {i} ({row.sample_id}) has {len(values)} {column} values for "
                    f"{n} token_ids; rerun the export"
                )
    meta = run.manifest.get("signals")
    return SignalsResult(frame, meta if isinstance(meta, dict) else {})


def load_local_tokenizer(run: RunInput) -> Any | None:
    """A tokenizer from the run's local checkpoint folder (tokenizer.json), if there is one."""
    folder = (run.manifest.get("checkpoint") or {}).get("path")
    if not folder or not (Path(folder) / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    except Exception:  # a tokenizer we cannot read only costs the token texts
        return None
