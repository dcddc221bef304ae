"""Run folders as the report sees them: thin adapters over the `vlmcredit.formats` readers.

Every artifact is parsed and validated by its one reader in `vlmcredit.formats` (a clear
`VlmCreditError` naming the run and the missing file, key or column); this module only turns
the result into the small dataclasses the sections draw from, filling optional parts with
fallbacks computed from the tables (the histogram, the cut, the sample order).

Shards are read with safetensors' numpy backend: a report needs float32/uint8/int arrays only,
and not importing torch keeps `vlmcredit report` quick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.anchors import ANCHORS_JSON, ANCHORS_PARQUET
from vlmcredit.formats.anchors import SampleImages as SampleAttention
from vlmcredit.formats.heads import HEADS_JSON
from vlmcredit.formats.run import MANIFEST, Run
from vlmcredit.formats.signals import SIGNALS_FILE as SIGNALS_PARQUET

__all__ = [
    "ANCHORS_JSON",
    "ANCHORS_PARQUET",
    "HEADS_JSON",
    "SIGNALS_PARQUET",
    "AnchorsResult",
    "HeadEntry",
    "HeadsResult",
    "RunInput",
    "SampleAttention",
    "SignalsResult",
    "load_local_tokenizer",
    "load_run",
    "read_anchors",
    "read_heads",
    "read_sample_attention",
    "read_signals",
    "safe_name",
]


@dataclass
class RunInput:
    """One run folder given to the report: the formats `Run` (manifest + samples table)."""

    run: Run
    label: str  # short, unique, file-name safe: used for headings, anchors and figure files

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.run.manifest

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.run.rows

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
    path = Path(path)
    if not path.exists():
        raise VlmCreditError(f"{path}: no such run folder; pass folders written by vlmcredit")
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise VlmCreditError(
            f"{path}: not a run folder (no {MANIFEST}); pass folders written by vlmcredit"
        )
    label = f"r{index}-{safe_name(path.resolve().name, 40)}"
    return RunInput(Run.load(path), label)


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
    answers: dict[str, Any] = field(default_factory=dict)  # shares of yes/no/other, constant


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
    threshold_rule: dict[str, Any] = field(default_factory=dict)  # empty: written before rules
    controls: dict[str, Any] = field(default_factory=dict)  # constant_yes/no, gray_image
    high_other_share: float | None = None


def read_heads(run: RunInput) -> HeadsResult:
    """heads.json through `formats.heads.read_heads` (a full probe-heads file required)."""
    from vlmcredit.formats.heads import read_heads as read_heads_file

    obj = read_heads_file(run.path, full=True)
    metric = str(obj.get("metric") or "total")
    baseline = obj["baseline"]
    heads = [
        HeadEntry(
            layer=item["layer"],
            head=int(item["head"]),
            drop=float(item["drop"][metric]),
            scores={k: float(v) for k, v in (item.get("scores") or {}).items()},
            subtasks={k: float(v) for k, v in (item.get("subtasks") or {}).items()},
            critical=item["critical"],
            answers=dict(item.get("answers") or {}),
        )
        for item in obj["heads"]
    ]
    categories = list(obj.get("categories") or (baseline.get("subtasks") or {}).keys())
    return HeadsResult(
        mode=obj["mode"],
        metric=metric,
        threshold=float(obj["threshold"]),
        baseline=baseline,
        heads=heads,
        categories=[str(c) for c in categories],
        ablation=obj.get("ablation"),
        answering=obj.get("answering"),
        num_questions=obj.get("num_questions"),
        checkpoint=obj.get("checkpoint") or {},
        threshold_rule=dict(obj.get("threshold_rule") or {}),
        controls=dict(obj.get("controls") or {}),
        high_other_share=(obj.get("answer_format") or {}).get("high_other_share"),
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
    """The anchors tables through `formats.anchors.read_anchors`, sorted in run order; histogram
    and cut fall back to values computed from the tokens."""
    from vlmcredit.formats.anchors import read_anchors as read_anchors_tables

    tables = read_anchors_tables(run.path)
    frame, summary = tables.tokens, tables.summary
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

    conn = summary.get("connectivity") or {}
    hist = conn.get("histogram")  # checked by the reader: one more edge than counts
    values = frame["connectivity"].to_numpy()
    if hist is not None:
        edges = np.asarray(hist["edges"], dtype=np.float64)
        counts = np.asarray(hist["counts"], dtype=np.float64)
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
        ratio_target=float(summary["ratio_target"]),
        ratio_achieved=float(summary["ratio_achieved"]),
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


def read_sample_attention(run: RunInput, sample_id: str, num_tokens: int) -> SampleAttention | None:
    """The sample's stored attention and image geometry (`formats.anchors.read_sample_images`);
    None when the run stored no tensors for it."""
    from vlmcredit.formats.anchors import read_sample_images

    return read_sample_images(run.run, sample_id, num_tokens)


# -- signals --------------------------------------------------------------------------------------
@dataclass
class SignalsResult:
    """signals.parquet and the manifest's `signals` object."""

    table: Any  # pandas DataFrame
    meta: dict[str, Any]


def read_signals(run: RunInput) -> SignalsResult:
    """signals.parquet and its manifest through `formats.signals.read_signals` (validated as a
    trainer would read them: lists aligned to token_ids, weights finite and >= 0)."""
    from vlmcredit.formats.signals import read_signals as read_signals_file

    signals = read_signals_file(run.path / SIGNALS_PARQUET)
    return SignalsResult(signals.frame, dict(signals.meta))


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
