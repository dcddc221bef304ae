"""Signals section (any run with signals.parquet): per-token weight on the text, distribution."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.anchors import read_anchor_tokens
from vlmcredit.reports import figures
from vlmcredit.reports.html import Raw, esc, figure, key_values, note, section
from vlmcredit.reports.loaders import (
    ANCHORS_PARQUET,
    SIGNALS_PARQUET,
    RunInput,
    load_local_tokenizer,
    read_signals,
)
from vlmcredit.reports.sections import ReportOptions, Section, SectionBuilder
from vlmcredit.reports.tokens import ShadeScale, shaded_tokens


class _TokenTexts:
    """Text of each token id: from the run's anchors table when the ids match, else from the
    checkpoint's tokenizer.json when it is on this machine, else the bare ids."""

    def __init__(self, run: RunInput) -> None:
        self.run = run
        self.by_sample: dict[str, tuple[list[int], list[str]]] = {}
        if run.has(ANCHORS_PARQUET):
            try:
                frame = read_anchor_tokens(
                    run.path, columns=("sample_id", "token_index", "token_id", "token")
                )
            except VlmCreditError:  # no token_id column or unreadable: other sources remain
                frame = None
            if frame is not None:
                frame = frame.sort_values(["sample_id", "token_index"], kind="stable")
                for sid, part in frame.groupby("sample_id", sort=False):
                    ids = [int(i) for i in part["token_id"]]
                    self.by_sample[str(sid)] = (ids, [str(t) for t in part["token"]])
        self._tokenizer: Any = None
        self._tokenizer_tried = False
        self.source = "token ids"

    def texts(self, sample_id: str, ids: list[int]) -> list[str]:
        known = self.by_sample.get(sample_id)
        if known is not None and known[0] == ids:
            self.source = "anchors.parquet"
            return known[1]
        if not self._tokenizer_tried:
            self._tokenizer = load_local_tokenizer(self.run)
            self._tokenizer_tried = True
        if self._tokenizer is not None:
            self.source = "checkpoint tokenizer"
            return [self._tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return [f"⟨{i}⟩" for i in ids]


def _method_facts(name: str) -> list[tuple[str, str]]:
    """What the method registry says of the run's method (nothing for an unknown one)."""
    from vlmcredit.methods.registry import REGISTRY, available

    if name not in available():
        return []
    m = REGISTRY[name]
    return [("signal", m.summary), ("source", m.paper)]


def build(run: RunInput, options: ReportOptions) -> Section:
    res = read_signals(run)
    table_ = res.table
    meta = res.meta
    weights = (
        np.concatenate([np.asarray(w, dtype=np.float64) for w in table_["weight"]])
        if len(table_)
        else np.zeros(0)
    )
    sample_weights = (
        table_["sample_weight"].to_numpy(dtype=np.float64)
        if "sample_weight" in table_.columns
        else None
    )
    hist = figures.weight_histogram(
        weights, "signal-weights", f"{run.label}: per-token weights", sample_weights
    )
    ck = meta.get("checkpoint") if isinstance(meta.get("checkpoint"), dict) else {}
    facts = [
        ("method", meta.get("method", "–")),
        ("format", f"{meta.get('format', '–')} v{meta.get('format_version', '?')}"),
        ("rows / tokens", f"{len(table_)} / {weights.size}"),
        ("loss denominator", meta.get("loss_denominator", "–")),
        ("selection scope", meta.get("selection_scope", "–")),
        ("checkpoint", ck.get("id", "–")),
        ("tokenizer sha1", meta.get("tokenizer_sha1", "–")),
        ("mean weight", float(weights.mean()) if weights.size else None),
        ("non-zero weights", f"{(weights != 0).mean():.1%}" if weights.size else "–"),
    ]
    facts[1:1] = _method_facts(str(meta.get("method", "")))
    params = meta.get("parameters")
    if isinstance(params, dict):
        facts += [(f"parameter {k}", str(v)) for k, v in sorted(params.items())]
    body: list[str] = [key_values(facts), figure(hist)]
    finite = weights[np.isfinite(weights)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    scale = ShadeScale(lo, hi if hi > lo else lo + 1.0)
    shown = table_.head(options.samples)
    if len(shown):
        texts = _TokenTexts(run)
        has_mask = "mask" in table_.columns
        body.append(f"<h3>Responses ({len(shown)} of {len(table_)})</h3>")
        body.append(scale.legend("weight", cls="weights", marked="selected" if has_mask else ""))
        blocks = []
        for row in shown.itertuples(index=False):
            ids = [int(i) for i in row.token_ids]
            w = np.asarray(row.weight, dtype=np.float64)
            mask = None
            if has_mask and row.mask is not None:
                mask = np.asarray(row.mask, dtype=bool)
            info = f"{len(ids)} tokens · mean weight {w.mean():.3g}" if len(ids) else "empty"
            if sample_weights is not None:
                info += f" · sample_weight {float(row.sample_weight):.3g}"
            rid = str(getattr(row, "response_id", ""))[:12]
            blocks.append(
                f'<div class="sample"><h4>Sample {esc(row.sample_id)}'
                f"{' · response ' + esc(rid) if rid else ''}</h4><p>{esc(info)}</p>"
                + shaded_tokens(
                    texts.texts(str(row.sample_id), ids),
                    scale.buckets(w),
                    mask,
                    options.max_tokens,
                    cls="weights",
                )
                + "</div>"
            )
        body.append(note(f"Token text from {texts.source}.", cls="source"))
        body.extend(blocks)
    elif not len(table_):
        body.append(note("signals.parquet has no rows."))
    anchor = f"{run.label}-signals"
    title = f"Signals — {run.label}"
    return Section("signals", title, anchor, Raw(section(anchor, title, body)), [hist])


BUILDER = SectionBuilder("signals", "Signals", lambda run: run.has(SIGNALS_PARQUET), build)
