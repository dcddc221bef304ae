"""Comparison section (a `vlmcredit compare` folder): method x method overlap and correlation."""

from __future__ import annotations

import numpy as np

from vlmcredit.formats.compare import COMPARE_JSON, read_compare
from vlmcredit.reports import figures
from vlmcredit.reports.html import Raw, figure, note, section, table
from vlmcredit.reports.loaders import RunInput
from vlmcredit.reports.sections import ReportOptions, Section, SectionBuilder

_COLUMNS = ("a", "b", "responses", "tokens", "selected_a", "selected_b", "both", "jaccard",
            "precision", "recall", "spearman")  # fmt: skip


def _matrices(pairs: list[dict], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    n = len(labels)
    index = {label: i for i, label in enumerate(labels)}
    jac = np.eye(n)
    rho = np.eye(n)
    for p in pairs:
        i, j = index[p["a"]], index[p["b"]]
        jac[i, j] = jac[j, i] = np.nan if p.get("jaccard") is None else p["jaccard"]
        rho[i, j] = rho[j, i] = np.nan if p.get("spearman") is None else p["spearman"]
    return jac, rho


def build(run: RunInput, options: ReportOptions) -> Section:
    result = read_compare(run.path)
    pairs = result["pairs"]
    labels = [m["label"] for m in result.get("methods", [])] or sorted(
        {p["a"] for p in pairs} | {p["b"] for p in pairs}
    )
    jac, rho = _matrices(pairs, labels)
    fig = figures.pair_matrices(
        labels, jac, rho, f"{run.label}-compare", f"{run.label}: method agreement"
    )
    body = [
        note(
            "Pooled over the response tokens both methods scored. precision = share of a's "
            "selected tokens that b also selects; recall = share of b's that a selects; "
            "Spearman compares the methods' per-token scores (score columns below)."
        ),
        figure(fig),
        table(_COLUMNS, [[p.get(c) for c in _COLUMNS] for p in pairs]),
    ]
    methods = result.get("methods", [])
    if methods:
        body.append(
            table(
                ("label", "method", "score column", "responses", "signals"),
                [
                    [m["label"], m["method"], m["score_column"], m["responses"], m["signals"]]
                    for m in methods
                ],
            )
        )
    for item in result.get("anchors_in_vppo", []):
        share = "–" if item.get("share") is None else f"{item['share']:.1%}"
        body.append(
            note(
                f"{share} of the {item['anchors_selected']} anchor tokens ({item['anchors']}) are "
                f"also perturbation-sensitive tokens of {item['vppo']}."
            )
        )
    anchor = f"{run.label}-compare"
    title = f"Method comparison — {run.label}"
    return Section("compare", title, anchor, Raw(section(anchor, title, body)), [fig])


BUILDER = SectionBuilder("compare", "Method comparison", lambda run: run.has(COMPARE_JSON), build)
