"""Heads section (probe-heads runs): ablation drop per head, threshold, critical heads, subtasks.

Beside the drops: the threshold rule and why it was chosen, the controls of the same run
(baseline, gray image, constant yes / no), and per configuration the share of answers the
official parser reads as "other" and whether all answers were one label, so that a drop which
only means "the answer format broke" or "the model now says no to everything" reads as such.
"""

from __future__ import annotations

import numpy as np

from vlmcredit.reports import figures
from vlmcredit.reports.html import Raw, figure, key_values, note, section, table
from vlmcredit.reports.loaders import HEADS_JSON, HeadEntry, HeadsResult, RunInput, read_heads
from vlmcredit.reports.sections import ReportOptions, Section, SectionBuilder

TOP_HEADS = 24  # rows of the head table; the figure shows every head
SUBTASK_COLUMNS = 8  # critical heads with their own column in the subtask table
HEAD_COLUMNS = ("layer", "head", "total", "perception", "cognition", "", "other %", "answers")


def _name(h: HeadEntry) -> str:
    return f"H{h.head}" if h.layer is None else f"L{h.layer} H{h.head}"


def _figure(run: RunInput, res: HeadsResult) -> figures.Figure:
    title = f"{run.label}: drop in MME {res.metric} per ablated head (threshold {res.threshold:g})"
    if res.mode == "head-index":
        ordered = sorted(res.heads, key=lambda h: h.head)
        return figures.head_drop_bars(
            [h.head for h in ordered],
            [h.drop for h in ordered],
            [h.critical for h in ordered],
            res.threshold,
            res.metric,
            "heads-drop",
            title,
        )
    geo = res.checkpoint.get("geometry") if isinstance(res.checkpoint, dict) else None
    geo = geo if isinstance(geo, dict) else {}
    layers = max(int(geo.get("num_layers") or 0), 1 + max(h.layer or 0 for h in res.heads))
    heads = max(int(geo.get("num_heads") or 0), 1 + max(h.head for h in res.heads))
    drops = np.full((layers, heads), np.nan)
    critical = np.zeros((layers, heads), dtype=bool)
    for h in res.heads:
        drops[h.layer or 0, h.head] = h.drop
        critical[h.layer or 0, h.head] = h.critical
    return figures.head_drop_grid(drops, critical, res.threshold, res.metric, "heads-drop", title)


def _answers_text(answers: dict) -> str:
    """ "all no" for a configuration that gave one answer, else "" (nothing to flag)."""
    constant = answers.get("constant")
    return f"all {constant}" if constant else ""


def _controls_table(res: HeadsResult) -> Raw | None:
    """Baseline, gray-image and constant-answer scores with the drop each would count as."""
    if not res.controls:
        return None
    metric = res.metric
    base = res.baseline
    rows = []
    for label, scores in [
        ("baseline", base),
        ("gray image (every image uniform gray)", res.controls.get("gray_image") or {}),
        ("constant yes", res.controls.get("constant_yes") or {}),
        ("constant no", res.controls.get("constant_no") or {}),
    ]:
        answers = scores.get("answers") or {}
        value = scores.get(metric)
        drop = None if value is None else float(base[metric]) - float(value)
        other = answers.get("other")
        rows.append(
            [
                label,
                scores.get("total"),
                scores.get("perception"),
                scores.get("cognition"),
                drop,
                None if other is None else 100 * other,
                _answers_text(answers),
            ]
        )
    headers = ["control", "total", "perception", "cognition", f"drop ({metric})", "other %", ""]
    caption = "Controls from the same run: a head drop as large as a control's is no better"
    return table(headers, rows, caption=caption)


def _answer_notes(res: HeadsResult) -> list[Raw]:
    """One note per kind of answer problem: broken format (many "other"), constant answers."""
    notes = []
    high = res.high_other_share
    broken = [h for h in res.heads if h.answers.get("format_broken")]
    if broken and high is not None:
        names = ", ".join(f"{_name(h)} ({100 * h.answers['other']:.0f}%)" for h in broken)
        notes.append(
            note(
                f"Answer format broken in {names}: at least {100 * high:.0f}% of the answers are "
                "neither yes nor no (official parse: other, scored wrong), so their drop comes "
                "from a broken answer format, not lost vision."
            )
        )
    undecided = [h for h in res.heads if h.answers.get("undecided")]
    base_undecided = (res.baseline.get("answers") or {}).get("undecided")
    if undecided or base_undecided:
        notes.append(
            note(
                f"Logit answers whose first token is too short to fix the official label were "
                f"read as other: {100 * (base_undecided or 0):.0f}% of the baseline's, in "
                f"{len(undecided)} ablated configurations; --generate decodes them instead."
            )
        )
    constant = [h for h in res.heads if h.answers.get("constant")]
    if constant:
        names = ", ".join(f"{_name(h)} ({_answers_text(h.answers)})" for h in constant)
        notes.append(
            note(
                f"Collapsed to a constant answer: {names}. Compare their scores with the "
                "constant-answer and gray-image controls."
            )
        )
    return notes


def _subtask_table(res: HeadsResult) -> Raw | None:
    subtasks = res.baseline.get("subtasks") if isinstance(res.baseline, dict) else None
    subtasks = subtasks if isinstance(subtasks, dict) else {}
    categories = res.categories or sorted(subtasks)
    if not categories:
        return None
    shown = sorted((h for h in res.heads if h.critical), key=lambda h: -h.drop)[:SUBTASK_COLUMNS]
    headers = ["subtask", "baseline acc", "acc+", "score"] + [f"drop {_name(h)}" for h in shown]
    rows = []
    for category in categories:
        base = subtasks.get(category) if isinstance(subtasks.get(category), dict) else {}
        score = base.get("score")
        drops = []
        for h in shown:
            ablated = h.subtasks.get(category)
            drops.append(None if ablated is None or score is None else float(score) - ablated)
        rows.append([category, base.get("acc"), base.get("acc_plus"), score, *drops])
    caption = "Per subtask: baseline, and the score drop when each critical head is ablated"
    return table(headers, rows, caption=caption)


def build(run: RunInput, options: ReportOptions) -> Section:
    res = read_heads(run)
    fig = _figure(run, res)
    critical = sorted((h for h in res.heads if h.critical), key=lambda h: (h.layer or -1, h.head))
    base = res.baseline
    facts = [
        ("mode", res.mode),
        ("ablation", res.ablation or "–"),
        ("answering", res.answering or "–"),
        ("questions", res.num_questions),
        ("metric / threshold", f"{res.metric} drop > {res.threshold:g}"),
        *(
            [
                (
                    "threshold rule",
                    f"{res.threshold_rule.get('rule')}: {res.threshold_rule.get('formula')} "
                    f"({res.threshold_rule.get('reason')})",
                )
            ]
            if res.threshold_rule
            else []
        ),
        (
            "baseline score",
            " · ".join(
                f"{k} {base[k]:.1f}"
                for k in ("total", "perception", "cognition")
                if isinstance(base.get(k), (int, float))
            ),
        ),
        ("critical heads", ", ".join(_name(h) for h in critical) or "none"),
    ]
    ranked = sorted(res.heads, key=lambda h: -h.drop)[:TOP_HEADS]
    head_rows = [
        [
            "every" if h.layer is None else h.layer,
            h.head,
            h.drop,
            h.scores.get("total"),
            h.scores.get("perception"),
            h.scores.get("cognition"),
            Raw("<strong>critical</strong>") if h.critical else "",
            None if "other" not in h.answers else 100 * h.answers["other"],
            _answers_text(h.answers),
        ]
        for h in ranked
    ]
    body: list[str] = [key_values(facts), figure(fig)]
    if res.threshold_rule.get("warning"):
        body.append(note(f"Warning: {res.threshold_rule['warning']}."))
    controls = _controls_table(res)
    if controls:
        body.append(controls)
    body.extend(_answer_notes(res))
    if not critical:
        body.append(
            note(
                f"No head's ablation dropped the {res.metric} score by more than {res.threshold:g}."
            )
        )
    body.append(
        table(
            [*HEAD_COLUMNS[:2], f"drop ({res.metric})", *HEAD_COLUMNS[2:]],
            head_rows,
            caption=f"Heads by drop (top {len(ranked)} of {len(res.heads)})",
        )
    )
    subtasks = _subtask_table(res)
    if subtasks:
        body.append(subtasks)
    anchor = f"{run.label}-heads"
    title = f"Heads — {run.label}"
    return Section("heads", title, anchor, section(anchor, title, body), [fig])


BUILDER = SectionBuilder("heads", "Heads", lambda run: run.has(HEADS_JSON), build)
