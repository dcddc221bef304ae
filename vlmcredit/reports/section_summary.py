"""Run summary: checkpoint, family, layers/heads, command lines, parameters, timing."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.anchors import ANCHORS_JSON, read_anchors_summary
from vlmcredit.formats.heads import HEADS_JSON, read_heads
from vlmcredit.reports.html import Raw, code, details, esc, key_values, section, table
from vlmcredit.reports.loaders import RunInput
from vlmcredit.reports.sections import Section


def _seconds_between(start: Any, end: Any) -> float | None:
    try:
        a = datetime.strptime(str(start), "%Y-%m-%dT%H:%M:%S%z")
        b = datetime.strptime(str(end), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return None
    return (b - a).total_seconds()


def _checkpoint(run: RunInput) -> dict[str, Any]:
    ck = run.manifest.get("checkpoint")
    if not isinstance(ck, dict) and run.has(HEADS_JSON):
        # heads.json carries its checkpoint too; manifest first, it is the run's own record.
        try:
            ck = read_heads(run.path).get("checkpoint")
        except VlmCreditError:  # the heads section reports what is wrong with the file
            ck = None
    return ck if isinstance(ck, dict) else {}


def _shape(ck: dict[str, Any]) -> str:
    geo = ck.get("geometry") if isinstance(ck.get("geometry"), dict) else {}
    if not geo:
        return "–"
    parts = [f"{geo.get('num_layers', '?')} layers", f"{geo.get('num_heads', '?')} heads"]
    if geo.get("num_kv_heads") is not None:
        parts.append(f"{geo['num_kv_heads']} kv heads")
    return ", ".join(parts)


def _timing(run: RunInput) -> dict[str, Any]:
    timing = run.manifest.get("timing")
    timing = dict(timing) if isinstance(timing, dict) else {}
    if run.has(ANCHORS_JSON):
        try:
            more = read_anchors_summary(run.path).get("timing")
        except VlmCreditError:  # the anchors section reports what is wrong with the file
            more = None
        if isinstance(more, dict):
            timing.update(more)
    return timing


def _command_line(run: RunInput) -> str:
    argv = run.manifest.get("argv")
    if isinstance(argv, list) and argv:
        return shlex.join(str(a) for a in argv)
    return str(argv or "–")


def flatten_parameters(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested parameters as ("a.b.c", leaf) pairs; lists stay one JSON value."""
    if isinstance(value, dict) and value:
        out: list[tuple[str, Any]] = []
        for k in sorted(value):
            out += flatten_parameters(value[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, (list, tuple)):
        return [(prefix, json.dumps(value, default=str))]
    return [(prefix, value)]


def build_summary(
    runs: list[RunInput], found: dict[str, list[str]], warnings: Sequence[str] = ()
) -> Section:
    """Warnings about the set of runs, one overview table for all runs, then per run its
    details (collapsed)."""
    rows = []
    for run in runs:
        ck = _checkpoint(run)
        m = run.manifest
        wall = _seconds_between(m.get("created"), m.get("finished"))
        done = sum(r.get("status") == "done" for r in run.rows)
        bad = sum(r.get("status") == "bad" for r in run.rows)
        rows.append(
            [
                Raw(f'<a href="#{esc(run.label)}">{esc(run.label)}</a>'),
                run.command,
                m.get("status", "–"),
                ck.get("id") or ck.get("path") or "–",
                ck.get("family") or (ck.get("geometry") or {}).get("family") or "–",
                _shape(ck),
                f"{done} done, {bad} bad" if run.rows else "–",
                "–" if wall is None else f"{wall:.0f} s",
                ", ".join(found.get(run.label, [])) or "–",
            ]
        )
    overview = table(
        [
            "run",
            "command",
            "status",
            "checkpoint",
            "family",
            "model",
            "samples",
            "wall",
            "sections",
        ],
        rows,
    )
    notes = [Raw(f'<p class="warning"><b>Warning:</b> {esc(w)}</p>') for w in warnings]
    blocks: list[str] = [*notes, overview]
    for run in runs:
        ck = _checkpoint(run)
        m = run.manifest
        facts = [
            ("folder", code(run.path)),
            ("command line", code(_command_line(run))),
            ("tool version", m.get("version", "–")),
            ("created", m.get("created", "–")),
            ("finished", m.get("finished") or "–"),
            ("checkpoint", ck.get("id") or "–"),
            ("checkpoint path", ck.get("path") or "–"),
            ("weights sha1", ck.get("weights_sha1") or "–"),
            ("tokenizer sha1", ck.get("tokenizer_sha1") or "–"),
        ]
        params = flatten_parameters(m.get("parameters") or {})
        timing = [(k, v) for k, v in _timing(run).items() if isinstance(v, (int, float))]
        body = [key_values(facts)]
        if params:
            body.append(table(["parameter", "value"], params, caption="Parameters"))
        if timing:
            body.append(table(["phase", "seconds"], timing, caption="Timing"))
        blocks.append(
            Raw(f'<div id="{esc(run.label)}">')
            + details(f"{run.label}: {run.path}", "".join(body))
            + Raw("</div>")
        )
    return Section("summary", "Runs", "summary", section("summary", "Runs", blocks))
