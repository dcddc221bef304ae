"""Vision-critical heads from MME head-ablation scores: drops, selection, the heads.json object.

Pure functions on plain score dicts (no torch, no model code, no file I/O), so the selection
rule and the object of the file contract (docs/FORMATS.md, "heads run") can be tested on
hand-built numbers; `vlmcredit.formats.heads` writes and reads the files. A score dict
is `{"total", "perception", "cognition", "subtasks": {category: {"acc", "acc_plus", "score"}}}`
as `scores_dict` builds it from `vlmcredit.data.mme_score.MMEScores`.

Selection (the KAWHI protocol): ablate a configuration, re-score MME, drop = baseline - ablated;
a configuration is vision-critical when its drop on the chosen metric exceeds the threshold.
Drops are compared at 1e-6 resolution, so float noise in a drop that is exactly the threshold
(e.g. 100.00000000000001) does not make a head critical. The threshold comes from one of two
rules (`threshold_rule`, docs/methods.md):

* absolute: drop > T points (the paper's T = 100 on the MME total), meant for all 14 subtasks;
* relative: drop > s x (baseline - gray-image control), s = 0.5 by default: the ablation costs
  more than s of what seeing the image is worth on the questions scored. It stays meaningful on
  any subset; s = 1 means "worse than showing a gray image".

Controls scored in the same run sit beside every drop: constant-yes / constant-no (all answers
one label) and the gray-image control, so a head whose ablation collapses the model to one answer
is visible as such, and the share of answers the official parser reads as "other" (a broken
answer format, not lost vision) is carried per configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from vlmcredit.data.mme import CATEGORIES, PERCEPTION
from vlmcredit.errors import VlmCreditError

METRICS = ("total", "perception")
GROUPS = ("total", "perception", "cognition")
MODES = ("head-index", "layer-head")
ABLATIONS = ("zero", "mean")
ANSWERING = ("logits", "generate")
SUBTASK_MAX = 200.0  # 100 * (acc + acc+), each at most 1
DROP_DECIMALS = 6  # resolution of the threshold comparison
THRESHOLD_RULES = ("absolute", "relative")
PAPER_THRESHOLD = 100.0  # KAWHI: "a drop of more than 100 points in the MME total"
RELATIVE_SHARE = 0.5  # ours: more than half of what the image is worth on the questions scored
LABELS = ("yes", "no", "other")
# At this share of "other" answers the lost accuracy alone is worth up to 2 x 25 points per
# subtask (acc and acc+), about a head-index drop on its own: the report then says the drop
# comes from a broken answer format, not lost vision.
HIGH_OTHER_SHARE = 0.25
CONTROLS = ("constant_yes", "constant_no", "gray_image")


def scores_dict(scores: Any) -> dict[str, Any]:
    """An `MMEScores` (or anything with its fields) as the score dict heads.json stores."""
    return {
        "total": float(scores.total),
        "perception": float(scores.perception),
        "cognition": float(scores.cognition),
        "subtasks": {
            cat: {"acc": float(s.acc), "acc_plus": float(s.acc_plus), "score": float(s.score)}
            for cat, s in scores.subtasks.items()
        },
    }


def score_drops(baseline: Mapping[str, Any], ablated: Mapping[str, Any]) -> dict[str, float]:
    """baseline - ablated for total, perception and cognition (positive = ablation hurt)."""
    return {g: float(baseline[g]) - float(ablated[g]) for g in GROUPS}


def max_score(metric: str, categories: Sequence[str]) -> float:
    """The highest score `metric` can reach on `categories` (200 per subtask it sums)."""
    check_metric(metric)
    group = set(PERCEPTION) if metric == "perception" else set(CATEGORIES)
    return SUBTASK_MAX * sum(c in group for c in categories)


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise VlmCreditError(f"--metric {metric}: choose one of {', '.join(METRICS)}")


def check_threshold(threshold: float, metric: str, categories: Sequence[str] | None = None) -> None:
    """A threshold some drop can exceed: >= 0 and below the metric's maximum on `categories`."""
    check_metric(metric)
    if not math.isfinite(threshold) or threshold < 0:
        raise VlmCreditError(
            f"--threshold {threshold}: must be a finite number >= 0 (a drop in MME score points)"
        )
    if categories is None:
        return
    top = max_score(metric, categories)
    if top == 0:
        raise VlmCreditError(
            f"--metric {metric}: none of the categories scored ({', '.join(categories)}) belongs "
            "to it; use --metric total or add perception categories"
        )
    if threshold >= top:
        scored = f"{len(categories)} {'category' if len(categories) == 1 else 'categories'}"
        raise VlmCreditError(
            f"--threshold {threshold:g}: no drop can exceed it, the {metric} score of {scored} "
            f"is at most {top:g}; choose a smaller threshold"
        )


def is_critical(drop: Mapping[str, float], metric: str, threshold: float) -> bool:
    """drop[metric] > threshold, both rounded to 1e-6: a drop equal to the threshold up to float
    noise (0.5 x 233.33 vs 116.67, summed in another order) is not "more than" it."""
    return round(float(drop[metric]), DROP_DECIMALS) > round(float(threshold), DROP_DECIMALS)


def select_critical(
    drops: Sequence[Mapping[str, float]], metric: str = "total", threshold: float = 100.0
) -> list[bool]:
    """For each configuration's drops, whether it is vision-critical."""
    check_threshold(threshold, metric)
    return [is_critical(d, metric, threshold) for d in drops]


def answer_shares(labels: Sequence[str], undecided: int | None = None) -> dict[str, Any]:
    """How a configuration answered: share of each official label, and one label if all are.

    `labels` are the officially parsed answers ("yes" / "no" / "other"); `undecided` counts
    logit answers whose first token left the label open (read as "other"; `--generate` may
    differ there), None when answers were decoded.
    """
    n = len(labels)
    if n == 0:
        raise ValueError("answer_shares: no answers")
    bad = set(labels) - set(LABELS)
    if bad:
        raise ValueError(f"answer_shares: labels {sorted(bad)} are not yes/no/other")
    shares = {label: sum(x == label for x in labels) / n for label in LABELS}
    constant = next((label for label in LABELS if shares[label] == 1.0), None)
    return {
        **shares,
        "constant": constant,
        "undecided": None if undecided is None else undecided / n,
        "format_broken": shares["other"] >= HIGH_OTHER_SHARE,
    }


def choose_threshold_rule(
    requested: str | None,
    threshold: float | None,
    share: float | None,
    categories: Sequence[str],
    full_mme: bool,
) -> tuple[str, str]:
    """(rule, why): the asked-for rule, else absolute on full MME or with --threshold, else
    relative (`--categories` / `--max-questions` / a partial MME, or --relative-share)."""
    if requested is not None:
        _check_choice("threshold-rule", requested, THRESHOLD_RULES)
    if threshold is not None and share is not None:
        raise VlmCreditError(
            "--threshold and --relative-share: give one (points for the absolute rule, a share "
            "for the relative one)"
        )
    if requested == "relative" and threshold is not None:
        raise VlmCreditError(
            f"--threshold {threshold:g}: is a number of points for --threshold-rule absolute; "
            "with relative give --relative-share"
        )
    if requested == "absolute" and share is not None:
        raise VlmCreditError(
            f"--relative-share {share:g}: belongs to --threshold-rule relative; with absolute "
            "give --threshold"
        )
    scored = f"{len(categories)} of {len(CATEGORIES)} MME subtasks"
    if requested is not None:
        where = "on all of MME" if full_mme else f"on a partial MME ({scored})"
        return requested, f"--threshold-rule {requested} asked for, {where}"
    if threshold is not None:
        return "absolute", "--threshold given"
    if share is not None:
        return "relative", "--relative-share given"
    if full_mme:
        return "absolute", f"all {len(CATEGORIES)} MME subtasks scored in full: the paper's rule"
    return "relative", (
        f"partial MME ({scored}, or a --max-questions cut): the paper's 100 points are a share "
        "of the full 2800-point total and mean something else on a subset"
    )


def check_share(share: float) -> None:
    if not (math.isfinite(share) and 0 < share <= 1):
        raise VlmCreditError(
            f"--relative-share {share}: must be in (0, 1] (1 = worse than the gray-image control)"
        )


def threshold_rule(
    rule: str,
    reason: str,
    metric: str,
    baseline: Mapping[str, Any],
    gray_image: Mapping[str, Any],
    threshold: float | None = None,
    share: float | None = None,
) -> dict[str, Any]:
    """The threshold_rule object of heads.json: rule, why, the effective points, the formula.

    Relative with a baseline no better than the gray-image control is a finding, not a
    threshold: the model does not use the image on these questions, so no head is called
    vision-critical; the threshold is then the baseline itself (no drop can exceed it, scores
    being >= 0) and `warning` says why.
    """
    _check_choice("threshold-rule", rule, THRESHOLD_RULES)
    check_metric(metric)
    if rule == "absolute":
        points = PAPER_THRESHOLD if threshold is None else float(threshold)
        check_threshold(points, metric)
        return {"rule": rule, "reason": reason, "threshold": points, "share": None,
                "formula": f"drop in {metric} > {points:g}", "warning": None}  # fmt: skip
    share = RELATIVE_SHARE if share is None else float(share)
    check_share(share)
    base, gray = float(baseline[metric]), float(gray_image[metric])
    gap = base - gray
    formula = (
        f"drop in {metric} > {share:g} x (baseline - gray-image control) = "
        f"{share:g} x ({base:g} - {gray:g})"
    )
    if gap <= 0:
        return {"rule": rule, "reason": reason, "threshold": base, "share": share,
                "formula": formula + f" <= 0, so none: threshold set to the baseline {base:g}",
                "warning": f"the baseline {metric} ({base:g}) does not beat the gray-image "
                f"control ({gray:g}): the model does not use the image on these questions, so "
                "no head is called vision-critical"}  # fmt: skip
    points = share * gap
    return {"rule": rule, "reason": reason, "threshold": points, "share": share,
            "formula": f"{formula} = {points:g}", "warning": None}  # fmt: skip


def critical_head_indices(critical: Sequence[Mapping[str, Any]]) -> list[int]:
    """Sorted unique head indices of the critical configurations (layer ignored)."""
    return sorted({int(c["head"]) for c in critical})


def build_heads_report(
    *,
    checkpoint: Mapping[str, Any],
    mode: str,
    ablation: str,
    answering: str,
    metric: str,
    threshold: float,
    num_questions: int,
    categories: Sequence[str],
    baseline: Mapping[str, Any],
    results: Sequence[tuple[int | None, int, Mapping[str, Any]]],
    rule: Mapping[str, Any] | None = None,
    controls: Mapping[str, Mapping[str, Any]] | None = None,
    answers: Mapping[str, Any] | None = None,
    head_answers: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The heads.json object (docs/FORMATS.md) from the baseline and each (layer, head, scores).

    `layer` None means the head index was ablated in every layer at once (head-index mode).
    `rule` is `threshold_rule`'s object (its threshold must be `threshold`); `controls` the
    score dicts of CONTROLS (gray_image with its `answers`); `answers` / `head_answers` the
    `answer_shares` of the baseline and of each result. All four come together or not at all.
    """
    _check_choice("mode", mode, MODES)
    _check_choice("ablation", ablation, ABLATIONS)
    _check_choice("answering", answering, ANSWERING)
    check_threshold(threshold, metric)
    extras = (rule, controls, answers, head_answers)
    if any(x is not None for x in extras) and any(x is None for x in extras):
        raise ValueError("build_heads_report: rule, controls, answers, head_answers go together")
    if rule is not None and float(rule["threshold"]) != float(threshold):
        raise ValueError("build_heads_report: the rule's threshold is not `threshold`")
    if head_answers is not None and len(head_answers) != len(results):
        raise ValueError("build_heads_report: one head_answers entry per result")
    heads = []
    for k, (layer, head, scores) in enumerate(results):
        drop = score_drops(baseline, scores)
        entry = {
            "layer": None if layer is None else int(layer),
            "head": int(head),
            "scores": {g: float(scores[g]) for g in GROUPS},
            "drop": drop,
            "subtasks": {c: float(s["score"]) for c, s in scores["subtasks"].items()},
            "critical": is_critical(drop, metric, threshold),
        }
        if head_answers is not None:
            entry["answers"] = dict(head_answers[k])
        heads.append(entry)
    critical = [{"layer": h["layer"], "head": h["head"]} for h in heads if h["critical"]]
    report: dict[str, Any] = {
        "checkpoint": dict(checkpoint),
        "mode": mode,
        "ablation": ablation,
        "answering": answering,
        "metric": metric,
        "threshold": float(threshold),
        "num_questions": int(num_questions),
        "categories": list(categories),
        "baseline": {
            **{g: float(baseline[g]) for g in GROUPS},
            "subtasks": {
                c: {k: float(s[k]) for k in ("acc", "acc_plus", "score")}
                for c, s in baseline["subtasks"].items()
            },
        },
        "heads": heads,
        "critical": critical,
        "critical_heads": critical_head_indices(critical),
    }
    if rule is not None and controls is not None and answers is not None:
        report["threshold_rule"] = dict(rule)
        report["baseline"]["answers"] = dict(answers)
        report["controls"] = {
            name: {
                **{g: float(controls[name][g]) for g in GROUPS},
                **({"answers": dict(controls[name]["answers"])} if name == "gray_image" else {}),
            }
            for name in CONTROLS
        }
        report["answer_format"] = {"high_other_share": HIGH_OTHER_SHARE}
    return report


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise VlmCreditError(f"--{name} {value}: choose one of {', '.join(choices)}")
