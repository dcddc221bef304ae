"""`vlmcredit compare RUN...` as a library call: do different credit methods pick the same tokens?

Each RUN is a folder with signals (`signals.parquet` + manifest: a `weights`, `anchors` or
`export` folder) or a multi-method `weights` run (`RUN/<method>/signals.parquet`). For every
pair of method signals over the same rollouts it writes the overlap of the selected tokens
(the `mask` column, else weight > 0), the Spearman correlation of their per-token scores, and
the share of AT-RL anchors that are also VPPO perturbation-sensitive tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.analysis.compare import MethodTokens, compare_all
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.compare import write_compare
from vlmcredit.formats.signals import SIGNALS_FILE, read_signals

# The per-token column whose ranking is compared: the method's continuous score where its
# signals carry one; otherwise the weight (anchors, ToR: their score is the weight itself).
SCORE_COLUMNS = {
    "vppo": "s_t",
    "entropy": "entropy",
    "sayo": "region_attention",
}


@dataclass
class SignalSource:
    run: Path  # the folder named on the command line
    folder: Path  # the folder holding signals.parquet


def signal_sources(runs: Sequence[Path]) -> list[SignalSource]:
    """The signals folders of each RUN (itself, or its per-method subfolders)."""
    out = []
    for run in runs:
        run = Path(run)
        if (run / SIGNALS_FILE).is_file():
            out.append(SignalSource(run, run))
            continue
        subs = (
            sorted(p for p in run.iterdir() if (p / SIGNALS_FILE).is_file()) if run.is_dir() else []
        )
        if not subs:
            raise VlmCreditError(
                f"{run}: holds no {SIGNALS_FILE} (nor RUN/<method>/{SIGNALS_FILE}); pass folders "
                "written by vlmcredit weights, anchors or export"
            )
        out.extend(SignalSource(run, sub) for sub in subs)
    return out


def method_tokens(source: SignalSource, label: str) -> tuple[MethodTokens, dict[str, Any]]:
    signals = read_signals(source.folder)
    frame = signals.frame
    method = str(signals.meta.get("method", "?"))
    column = SCORE_COLUMNS.get(method, "weight")
    if column not in frame.columns:
        column = "weight"
    has_mask = "mask" in frame.columns
    selected, score = {}, {}
    for row in frame.itertuples(index=False):
        key = (str(row.sample_id), str(row.response_id))
        if key in selected:
            raise VlmCreditError(f"{source.folder}: response {key} appears twice")
        weight = np.asarray(row.weight, dtype=np.float64)
        mask = getattr(row, "mask", None) if has_mask else None
        selected[key] = np.asarray(mask, bool) if mask is not None else weight > 0
        score[key] = np.asarray(getattr(row, column), dtype=np.float64)
    info = {
        "label": label,
        "method": method,
        "run": str(source.run),
        "signals": str(source.folder),
        "score_column": column,
        "responses": len(selected),
    }
    return MethodTokens(label, selected, score, column), info


def compare_runs(runs: Sequence[Path]) -> dict[str, Any]:
    """The comparison of every pair of method signals found in `runs` (nothing written)."""
    sources = signal_sources(runs)
    if len(sources) < 2:
        raise VlmCreditError("compare: give at least two method signals (runs or method folders)")
    methods = [str(read_signals(s.folder).meta.get("method", "?")) for s in sources]
    labels = []
    for s, m in zip(sources, methods, strict=True):
        label = m if methods.count(m) == 1 else f"{m}@{s.run.name}"
        if label in labels:  # the same method twice from folders of the same name
            label = f"{m}@{s.folder}"
        labels.append(label)
    loaded = [method_tokens(s, label) for s, label in zip(sources, labels, strict=True)]
    tokens = [t for t, _ in loaded]
    pairs = compare_all(tokens)
    if all(p["responses"] == 0 for p in pairs):
        raise VlmCreditError(
            "compare: the runs share no response (same sample_id and response token ids); "
            "compare runs over the same rollouts"
        )
    return {
        "methods": [info for _, info in loaded],
        "pairs": pairs,
        "anchors_in_vppo": _anchors_in_vppo(pairs, dict(zip(labels, methods, strict=True))),
    }


def _anchors_in_vppo(pairs: list[dict[str, Any]], method_of: dict[str, str]) -> list[dict]:
    """Share of AT-RL anchor tokens that VPPO also selects, for every anchors x vppo pair."""
    out = []
    for p in pairs:
        roles = {method_of[p["a"]]: "a", method_of[p["b"]]: "b"}
        if p["responses"] == 0 or set(roles) != {"anchors", "vppo"}:
            continue
        side = roles["anchors"]
        n_anchor = int(p[f"selected_{side}"])
        out.append(
            {
                "anchors": p[side],
                "vppo": p["b" if side == "a" else "a"],
                "anchors_selected": n_anchor,
                "both": int(p["both"]),
                "share": p["both"] / n_anchor if n_anchor else None,
            }
        )
    return out


def run_compare(runs: Sequence[Path], out: Path, command: list[str] | None = None) -> dict:
    """Compare and write compare.json / compare.parquet / manifest.json into `out`."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise VlmCreditError(f"--out {out}: exists and is not empty; choose a new folder")
    result = compare_runs(runs)
    write_compare(Path(out), result, command)
    return result
