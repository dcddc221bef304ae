"""A method's outputs -> the trainer contract (signals.parquet + the manifest's signals object).

Shared by `anchors` and `weights`: the method's registry entry says its name, loss denominator,
selection scope and extra columns, so every method's signals are written the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.formats.run import Run
from vlmcredit.formats.signals import SignalsMeta, write_signals
from vlmcredit.methods.registry import CORE_COLUMNS, Method, MethodOutput, config_dict


def signal_row(sample_id: str, token_ids: Sequence[int], out: MethodOutput) -> dict[str, Any]:
    """One contract row (lists aligned to the response tokens)."""
    row: dict[str, Any] = {
        "sample_id": sample_id,
        "token_ids": [int(t) for t in token_ids],
        "weight": np.asarray(out.weight, dtype=np.float32).tolist(),
    }
    if out.mask is not None:
        row["mask"] = np.asarray(out.mask, dtype=bool).tolist()
    for column, values in out.columns.items():
        row[column] = np.asarray(values).tolist()
    if out.sample_weight is not None:
        row["sample_weight"] = float(out.sample_weight)
    return row


def signals_meta(run: Run, method: Method, cfg: Any) -> SignalsMeta:
    ck = run.manifest["checkpoint"]
    return SignalsMeta(
        method=method.name,
        parameters=config_dict(cfg),
        checkpoint_id=ck["id"],
        weights_sha1=ck.get("weights_sha1"),
        tokenizer_sha1=ck["tokenizer_sha1"],
        loss_denominator=method.denominator_for(cfg),
        selection_scope=method.scope_for(cfg),
        extra_columns=dict(method.columns),
    )


def write_method_signals(
    run: Run, method: Method, cfg: Any, rows: list[dict[str, Any]], folder: Path | None = None
) -> Path:
    """Write `rows` as the signals of `method` into `folder` (default: the run folder).

    In the run folder the signals object goes into the run's own manifest (written when the run
    finishes); elsewhere into that folder's manifest.
    """
    target = Path(folder) if folder is not None else run.path
    manifest = run.manifest if folder is None else None
    return write_signals(target, rows, signals_meta(run, method, cfg), manifest=manifest)


__all__ = ["CORE_COLUMNS", "signal_row", "signals_meta", "write_method_signals"]
