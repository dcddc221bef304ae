"""The trainer contract: `signals.parquet` + the `signals` object of `manifest.json`.

One row per (sample_id, response_id); list columns are aligned to the response tokens (index 0 =
first generated token). docs/FORMATS.md ("trainer signals") is the schema. The reader checks
everything a trainer relies on (tokenizer hash, response ids = sha1 of the token ids, list
lengths, finite non-negative weights) and refuses a file that fails, with one line saying what
to do, because a silently misaligned weight file trains the wrong tokens without any error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit import __version__
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_bytes, atomic_write_json, now
from vlmcredit.formats.run import MANIFEST
from vlmcredit.formats.signals_lookup import ON_MISS, BatchWeights, Signals, response_id

SIGNALS_FILE = "signals.parquet"
SIGNALS_JSONL = "signals.jsonl"
FORMAT = "vlmcredit-signals"
FORMAT_VERSION = 1
LOSS_DENOMINATORS = ("all_tokens", "selected_tokens")
SELECTION_SCOPES = ("per_response", "per_batch")
# List columns aligned to the response tokens, with their numpy dtype in memory.
LIST_COLUMNS: dict[str, str] = {
    "token_ids": "int64",
    "weight": "float32",
    "mask": "bool",
    "cluster_id": "int32",
    "paragraph_id": "int32",
}
REQUIRED = ("sample_id", "response_id", "token_ids", "weight")
OPTIONAL_LISTS = ("mask", "cluster_id", "paragraph_id")
COLUMN_ORDER = ("sample_id", "response_id", *LIST_COLUMNS, "sample_weight")


EXTRA_DTYPES = ("float32", "int32", "int64", "bool")


def check_extra_columns(extra: Mapping[str, str], where: str) -> None:
    """Method-declared columns: new names, with a dtype the contract knows."""
    for column, dtype in extra.items():
        if column in COLUMN_ORDER:
            raise VlmCreditError(f"{where}: extra column {column!r} is a contract column")
        if dtype not in EXTRA_DTYPES:
            raise VlmCreditError(
                f"{where}: extra column {column!r} has dtype {dtype!r}; use one of "
                f"{', '.join(EXTRA_DTYPES)}"
            )


def list_columns(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The per-token list columns of a table: the contract's plus a method's declared ones."""
    return {**LIST_COLUMNS, **(extra or {})}


@dataclass
class SignalsMeta:
    """What the manifest says about a signals table (method, provenance, loss semantics)."""

    method: str
    parameters: dict[str, Any]
    checkpoint_id: str
    weights_sha1: str | None
    tokenizer_sha1: str
    loss_denominator: str = "all_tokens"
    selection_scope: str = "per_response"
    # per-token columns a method declares beyond the contract's own (name -> dtype)
    extra_columns: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        check_extra_columns(self.extra_columns, "signals")
        if self.loss_denominator not in LOSS_DENOMINATORS:
            raise VlmCreditError(
                f"loss_denominator {self.loss_denominator!r}: choose one of "
                f"{', '.join(LOSS_DENOMINATORS)}"
            )
        if self.selection_scope not in SELECTION_SCOPES:
            raise VlmCreditError(
                f"selection_scope {self.selection_scope!r}: choose one of "
                f"{', '.join(SELECTION_SCOPES)}"
            )


# -- writing ------------------------------------------------------------------------------------


def _as_list_cell(value: Any, dtype: str, column: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise VlmCreditError(
            f"{where}: column {column!r} must be a list of {dtype} values"
        ) from None
    if arr.ndim != 1:
        raise VlmCreditError(f"{where}: column {column!r} must be a flat list per row")
    return arr


def _normalise_rows(rows: Any, where: str, extra: Mapping[str, str]) -> Any:
    """A DataFrame with the contract's columns, list cells as typed numpy arrays."""
    import pandas as pd

    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        raise VlmCreditError(f"{where}: no rows; a signals table needs at least one response")
    for column in ("sample_id", "token_ids", "weight"):
        if column not in frame.columns:
            raise VlmCreditError(f"{where}: rows lack the {column!r} column")
    order = column_order(extra)
    unknown = sorted(set(frame.columns) - set(order))
    if unknown:
        raise VlmCreditError(
            f"{where}: unknown columns {', '.join(unknown)}; the contract has "
            f"{', '.join(order)} (a method declares extra columns in its registry entry)"
        )
    frame["sample_id"] = frame["sample_id"].map(str)
    for column, dtype in list_columns(extra).items():
        if column in frame.columns:
            frame[column] = [
                None
                if v is None and (column in OPTIONAL_LISTS or column in extra)
                else _as_list_cell(v, dtype, column, f"{where} row {i}")
                for i, v in enumerate(frame[column])
            ]
    computed = [response_id(t) for t in frame["token_ids"]]
    if "response_id" in frame.columns:
        for i, (given, right) in enumerate(zip(frame["response_id"], computed, strict=True)):
            if given != right:
                raise VlmCreditError(
                    f"{where} row {i}: response_id does not match sha1 of its token_ids; leave "
                    "response_id out and it is computed"
                )
    frame["response_id"] = computed
    if "sample_weight" in frame.columns:
        frame["sample_weight"] = frame["sample_weight"].astype("float32")
    return frame[[c for c in order if c in frame.columns]].reset_index(drop=True)


def _merge_identical_responses(frame: Any) -> Any:
    """One row per (sample_id, response_id): GRPO often samples the same completion twice in a
    group (short answers), and a trainer looks the response up by its token ids, so identical
    completions share one row. Rows that agree on the key but not on their signals stay, and
    the validation below refuses them (the method gave one response two answers)."""
    if not frame.duplicated(["sample_id", "response_id"]).any():
        return frame
    cells = frame.map(lambda v: tuple(v.tolist()) if isinstance(v, np.ndarray) else v)
    keep = ~cells.duplicated()
    return frame[keep].reset_index(drop=True)


def column_order(extra: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Column order of a table: the contract's, then the method's extra columns."""
    return (*COLUMN_ORDER, *sorted(extra or {}))


def _validate_frame(frame: Any, where: str, extra: Mapping[str, str]) -> None:
    """Every check a trainer relies on; raises VlmCreditError naming the row."""
    if frame.empty:
        raise VlmCreditError(f"{where}: no rows")
    for column in REQUIRED:
        if column not in frame.columns:
            raise VlmCreditError(f"{where}: missing column {column!r}; is this a signals file?")
    for i, row in enumerate(frame.itertuples(index=False)):
        tokens = row.token_ids
        if len(tokens) == 0:
            raise VlmCreditError(f"{where} row {i}: empty response (no token_ids)")
        if tokens.min() < 0:
            raise VlmCreditError(f"{where} row {i}: negative token id")
        if row.response_id != response_id(tokens):
            raise VlmCreditError(
                f"{where} row {i} (sample {row.sample_id!r}): response_id is not the sha1 of "
                "token_ids (token ids edited or shifted after export); re-export the signals"
            )
        for column in list_columns(extra):
            if column == "token_ids" or column not in frame.columns:
                continue
            cell = getattr(row, column)
            if cell is None:
                if column == "weight":
                    raise VlmCreditError(f"{where} row {i}: weight is missing")
                continue
            if len(cell) != len(tokens):
                raise VlmCreditError(
                    f"{where} row {i} (sample {row.sample_id!r}): {column} has {len(cell)} "
                    f"entries for {len(tokens)} response tokens; lists must align to the tokens"
                )
        weight = row.weight
        if not np.all(np.isfinite(weight)) or np.any(weight < 0):
            raise VlmCreditError(
                f"{where} row {i} (sample {row.sample_id!r}): weights must be finite and >= 0"
            )
        if "sample_weight" in frame.columns:
            alpha = row.sample_weight
            if alpha is not None and not (math.isfinite(float(alpha)) and float(alpha) >= 0):
                raise VlmCreditError(f"{where} row {i}: sample_weight must be finite and >= 0")
    keys = list(zip(frame["sample_id"], frame["response_id"], strict=True))
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise VlmCreditError(
            f"{where}: sample {dup[0]!r} has the same response twice; one row per "
            "(sample_id, response)"
        )


def arrow_table(frame: Any, extra: Mapping[str, str] | None = None) -> Any:
    """The frame as an Arrow table with the contract's exact column types."""
    import pyarrow as pa

    scalar = {"float32": pa.float32(), "int32": pa.int32(), "int64": pa.int64(), "bool": pa.bool_()}

    types = {
        "sample_id": pa.string(),
        "response_id": pa.string(),
        "token_ids": pa.list_(pa.int64()),
        "weight": pa.list_(pa.float32()),
        "mask": pa.list_(pa.bool_()),
        "cluster_id": pa.list_(pa.int32()),
        "paragraph_id": pa.list_(pa.int32()),
        "sample_weight": pa.float32(),
        **{column: pa.list_(scalar[dtype]) for column, dtype in (extra or {}).items()},
    }
    lists = list_columns(extra)
    arrays = []
    for column in frame.columns:
        values = frame[column].tolist()
        if column in lists:
            values = [None if v is None else np.asarray(v).tolist() for v in values]
        arrays.append(pa.array(values, type=types[column]))
    return pa.Table.from_arrays(arrays, names=list(frame.columns))


def signals_object(meta: SignalsMeta, frame: Any) -> dict[str, Any]:
    """The manifest's `signals` object for `frame` (docs/FORMATS.md)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "method": meta.method,
        "parameters": json.loads(json.dumps(meta.parameters, sort_keys=True, default=str)),
        "checkpoint": {"id": meta.checkpoint_id, "weights_sha1": meta.weights_sha1},
        "tokenizer_sha1": meta.tokenizer_sha1,
        "loss_denominator": meta.loss_denominator,
        "selection_scope": meta.selection_scope,
        "extra_columns": dict(sorted(meta.extra_columns.items())),
        "created": now(),
        "num_rows": len(frame),
        "columns": list(frame.columns),
    }


def write_signals(
    folder: Path,
    rows: list[dict[str, Any]] | Any,
    meta: SignalsMeta,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """Write `folder/signals.parquet` and the `signals` object of `folder/manifest.json`.

    The table is written first (atomically), then the manifest. The `signals` object is merged
    into `manifest` when given (updated in place, so a `Run` that writes its manifest later keeps
    it), else into the manifest.json already in `folder` (a run folder), else a new one.
    """
    meta.check()
    folder = Path(folder)
    where = str(folder / SIGNALS_FILE)
    frame = _normalise_rows(rows, where, meta.extra_columns)
    frame = _merge_identical_responses(frame)
    _validate_frame(frame, where, meta.extra_columns)
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(arrow_table(frame, meta.extra_columns), sink)
    atomic_write_bytes(folder / SIGNALS_FILE, sink.getvalue().to_pybytes())
    if manifest is None:
        existing = folder / MANIFEST
        manifest = (
            json.loads(existing.read_text())
            if existing.is_file()
            else {"tool": "vlmcredit", "version": __version__, "created": now()}
        )
    manifest["signals"] = signals_object(meta, frame)
    atomic_write_json(folder / MANIFEST, manifest)
    return folder / SIGNALS_FILE


def write_signals_jsonl(path: Path, frame: Any) -> None:
    """The same table as JSON lines (one object per row, lists as arrays)."""
    lines = []
    for record in frame.to_dict("records"):
        out = {}
        for key, value in record.items():
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, np.floating):
                value = float(value)
            out[key] = value
        lines.append(json.dumps(out, sort_keys=False))
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


# -- reading ------------------------------------------------------------------------------------


def _locate(folder_or_file: Path) -> tuple[Path, Path]:
    path = Path(folder_or_file)
    if path.is_dir():
        for name in (SIGNALS_FILE, SIGNALS_JSONL):
            if (path / name).is_file():
                return path / name, path / MANIFEST
        raise VlmCreditError(
            f"{path}: no {SIGNALS_FILE} here; pass a run or export folder that has trainer "
            "signals (e.g. an anchors run)"
        )
    if path.is_file():
        return path, path.parent / MANIFEST
    raise VlmCreditError(f"{path}: no such file or folder")


def _read_frame(table_file: Path, extra: Mapping[str, str]) -> Any:
    import pandas as pd

    where = str(table_file)
    if table_file.suffix == ".jsonl":
        records = []
        for n, line in enumerate(table_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise VlmCreditError(f"{where} line {n}: not JSON ({exc.msg})") from None
        frame = pd.DataFrame(records)
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(table_file)
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise VlmCreditError(
                f"{where}: not a readable parquet file ({type(exc).__name__})"
            ) from None
        frame = table.to_pandas()
    if frame.empty:
        raise VlmCreditError(f"{where}: no rows")
    for column in REQUIRED:
        if column not in frame.columns:
            raise VlmCreditError(f"{where}: missing column {column!r}; is this a signals file?")
    unknown = sorted(set(frame.columns) - set(column_order(extra)))
    if unknown:
        raise VlmCreditError(
            f"{where}: columns {', '.join(unknown)} are neither contract columns nor declared "
            "in the manifest's signals extra_columns; re-export with this vlmcredit"
        )
    frame["sample_id"] = frame["sample_id"].map(str)
    for column, dtype in list_columns(extra).items():
        if column in frame.columns:
            frame[column] = [
                None if v is None else _as_list_cell(v, dtype, column, f"{where} row {i}")
                for i, v in enumerate(frame[column])
            ]
    if "sample_weight" in frame.columns:
        frame["sample_weight"] = frame["sample_weight"].astype("float32")
    return frame


def _read_meta(manifest_file: Path, table_file: Path) -> dict[str, Any]:
    if not manifest_file.is_file():
        raise VlmCreditError(
            f"{table_file}: no {MANIFEST} beside it; a signals table is read with its manifest "
            "(export the run again or copy the manifest with it)"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise VlmCreditError(f"{manifest_file}: not valid JSON ({exc.msg})") from None
    meta = manifest.get("signals") if isinstance(manifest, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VlmCreditError(
            f"{manifest_file}: has no 'signals' object of format {FORMAT!r}; the run did not "
            "write trainer signals"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise VlmCreditError(
            f"{manifest_file}: signals format_version {version!r}, this vlmcredit reads "
            f"{FORMAT_VERSION}; use the vlmcredit version that wrote it"
        )
    for key, allowed in (
        ("loss_denominator", LOSS_DENOMINATORS),
        ("selection_scope", SELECTION_SCOPES),
    ):
        if meta.get(key) not in allowed:
            raise VlmCreditError(
                f"{manifest_file}: signals {key} {meta.get(key)!r} is not one of "
                f"{', '.join(allowed)}"
            )
    if not meta.get("tokenizer_sha1"):
        raise VlmCreditError(f"{manifest_file}: signals object lacks tokenizer_sha1")
    return meta


def read_signals(
    folder_or_file: Path,
    tokenizer_sha1: str | None = None,
    vocab_size: int | None = None,
    weights_sha1: str | None = None,
) -> Signals:
    """Read and validate a signals table (parquet or jsonl) with its manifest.

    `tokenizer_sha1` (the trainer's, from `tokenizer_hash`) and `vocab_size` make the reader
    refuse a file written for another tokenizer instead of training on misaligned tokens.
    `weights_sha1` (the trainer's checkpoint, from `formats.provenance.weights_hash`) makes it
    refuse signals computed with other weights. Leave it None to accept them: a trainer whose
    weights have moved on since the signals were computed (any step after the first) is the
    usual case, and the tokenizer checks still apply.
    """
    table_file, manifest_file = _locate(Path(folder_or_file))
    meta = _read_meta(manifest_file, table_file)
    if weights_sha1 is not None:
        written = (meta.get("checkpoint") or {}).get("weights_sha1")
        if written != weights_sha1:
            what = f"checkpoint {str(written)[:12]}" if written else "a checkpoint without hash"
            raise VlmCreditError(
                f"{table_file}: computed with {what}, but the trainer's weights are "
                f"{weights_sha1[:12]}; compute the signals with the trainer's checkpoint, or "
                "pass weights_sha1=None to accept signals from other weights"
            )
    if tokenizer_sha1 is not None and meta["tokenizer_sha1"] != tokenizer_sha1:
        raise VlmCreditError(
            f"{table_file}: written for tokenizer {meta['tokenizer_sha1'][:12]}, but the "
            f"trainer's tokenizer is {tokenizer_sha1[:12]} (vocabulary or chat template differ); "
            "compute the signals with the checkpoint the trainer uses"
        )
    extra = meta.get("extra_columns") or {}
    check_extra_columns(extra, str(manifest_file))
    frame = _read_frame(table_file, extra)
    where = str(table_file)
    _validate_frame(frame, where, extra)
    if meta.get("num_rows") not in (None, len(frame)):
        raise VlmCreditError(
            f"{where}: has {len(frame)} rows but the manifest says {meta['num_rows']}; the table "
            "and manifest do not belong together: re-export"
        )
    if vocab_size is not None:
        top = max(int(t.max()) for t in frame["token_ids"])
        if top >= vocab_size:
            raise VlmCreditError(
                f"{where}: token id {top} is outside the trainer's vocabulary ({vocab_size}); "
                "the signals belong to another tokenizer"
            )
    return Signals(frame.reset_index(drop=True), meta, source=where)


def meta_from_manifest(manifest: Mapping[str, Any]) -> SignalsMeta:
    """The SignalsMeta a `signals` object was written from (for re-writing an export)."""
    sig = manifest.get("signals", manifest)
    return SignalsMeta(
        method=sig["method"],
        parameters=dict(sig.get("parameters", {})),
        checkpoint_id=sig.get("checkpoint", {}).get("id", ""),
        weights_sha1=sig.get("checkpoint", {}).get("weights_sha1"),
        tokenizer_sha1=sig["tokenizer_sha1"],
        loss_denominator=sig["loss_denominator"],
        selection_scope=sig["selection_scope"],
        extra_columns=dict(sig.get("extra_columns") or {}),
    )


__all__ = [
    "ON_MISS",
    "BatchWeights",
    "Signals",
    "SignalsMeta",
    "meta_from_manifest",
    "read_signals",
    "response_id",
    "write_signals",
    "write_signals_jsonl",
]
