"""Head selection on hand-built scores: drops, the threshold rule, the heads.json object."""

from __future__ import annotations

import json
import math

import pytest

from vlmcredit.analysis.heads import (
    answer_shares,
    build_heads_report,
    check_threshold,
    choose_threshold_rule,
    max_score,
    score_drops,
    scores_dict,
    select_critical,
    threshold_rule,
)
from vlmcredit.data.mme import CATEGORIES
from vlmcredit.data.mme_score import MMEPrediction, score_predictions
from vlmcredit.errors import VlmCreditError

CATS = ["existence", "count", "numerical_calculation"]


def scores(existence: float, count: float, numerical: float) -> dict:
    """A score dict with three subtasks; acc / acc+ are placeholders, totals summed by hand."""
    sub = {"existence": existence, "count": count, "numerical_calculation": numerical}
    return {
        "total": existence + count + numerical,
        "perception": existence + count,
        "cognition": numerical,
        "subtasks": {c: {"acc": s / 200, "acc_plus": s / 200, "score": s} for c, s in sub.items()},
    }


BASE = scores(180.0, 150.0, 120.0)  # total 450, perception 330, cognition 120
CHECKPOINT = {"id": "tiny", "path": "/x", "family": "qwen2.5-vl", "weights_sha1": "0" * 40,
              "geometry": {"num_layers": 4}}  # fmt: skip


def test_drops_are_baseline_minus_ablated() -> None:
    assert score_drops(BASE, scores(100.0, 150.0, 140.0)) == {
        "total": 60.0,
        "perception": 80.0,
        "cognition": -20.0,
    }


def test_threshold_rule_strictly_greater_at_1e6_resolution() -> None:
    drops = [
        {"total": 100.0, "perception": 0.0},  # equal: not critical
        {"total": 100.5, "perception": 0.0},
        {"total": 100.00000000000001, "perception": 0.0},  # float noise around equality
        {"total": 100.00001, "perception": 0.0},  # a real (small) excess
        {"total": -250.0, "perception": 0.0},
    ]
    assert select_critical(drops, "total", 100.0) == [False, True, False, True, False]
    assert select_critical(drops, "perception", 0.0) == [False] * 5
    perception = [{"total": 0.0, "perception": 30.0}, {"total": 500.0, "perception": 10.0}]
    assert select_critical(perception, "perception", 20.0) == [True, False]


def test_threshold_checks() -> None:
    assert max_score("total", CATS) == 600.0
    assert max_score("perception", CATS) == 400.0
    check_threshold(399.0, "perception", CATS)
    for value, metric, fragment in [
        (-1.0, "total", "--threshold -1.0: must be a finite number >= 0"),
        (math.nan, "total", "--threshold nan"),
        (400.0, "perception", "at most 400"),
        (600.0, "total", "at most 600"),
        (10.0, "accuracy", "--metric accuracy"),
    ]:
        with pytest.raises(VlmCreditError, match=fragment.replace("(", r"\(")):
            check_threshold(value, metric, CATS)
    with pytest.raises(VlmCreditError, match="none of the categories"):
        check_threshold(10.0, "perception", ["numerical_calculation"])


def _report(mode: str = "head-index", threshold: float = 100.0, metric: str = "total") -> dict:
    results = [
        (None if mode == "head-index" else 1, 0, scores(60.0, 150.0, 120.0)),  # drop 120 / 120
        (None if mode == "head-index" else 0, 1, scores(180.0, 150.0, 10.0)),  # drop 110 / 0
        (None if mode == "head-index" else 2, 2, scores(181.0, 150.0, 130.0)),  # drop -11
        (None if mode == "head-index" else 3, 0, scores(80.0, 150.0, 120.0)),  # drop 100: no
    ]
    return build_heads_report(
        checkpoint=CHECKPOINT,
        mode=mode,
        ablation="zero",
        answering="logits",
        metric=metric,
        threshold=threshold,
        num_questions=12,
        categories=CATS,
        baseline=BASE,
        results=results,
    )


def test_report_follows_formats_md() -> None:
    report = _report()
    assert set(report) == {
        "checkpoint", "mode", "ablation", "answering", "metric", "threshold", "num_questions",
        "categories", "baseline", "heads", "critical", "critical_heads",
    }  # fmt: skip
    assert report["baseline"]["subtasks"]["count"] == {"acc": 0.75, "acc_plus": 0.75, "score": 150}
    first = report["heads"][0]
    assert first == {
        "layer": None,
        "head": 0,
        "scores": {"total": 330.0, "perception": 210.0, "cognition": 120.0},
        "drop": {"total": 120.0, "perception": 120.0, "cognition": 0.0},
        "subtasks": {"existence": 60.0, "count": 150.0, "numerical_calculation": 120.0},
        "critical": True,
    }
    assert [h["critical"] for h in report["heads"]] == [True, True, False, False]
    assert report["critical"] == [{"layer": None, "head": 0}, {"layer": None, "head": 1}]
    assert report["critical_heads"] == [0, 1]
    # The same drops judged on perception: head 1 only hurt cognition.
    assert _report(metric="perception")["critical_heads"] == [0]
    # layer-head: critical (layer, head) pairs; critical_heads = sorted unique heads
    grid = _report("layer-head", threshold=50.0)
    assert grid["critical"] == [
        {"layer": 1, "head": 0},
        {"layer": 0, "head": 1},
        {"layer": 3, "head": 0},
    ]
    assert grid["critical_heads"] == [0, 1]
    json.dumps(report)  # plain JSON types only


def test_scores_dict_from_official_scoring() -> None:
    rows = [
        MMEPrediction("existence/a.png", "existence", "q1", "Yes", "Yes"),
        MMEPrediction("existence/a.png", "existence", "q2", "No", "No"),
        MMEPrediction("existence/b.png", "existence", "q1", "Yes", "No"),
        MMEPrediction("existence/b.png", "existence", "q2", "No", "No"),
    ]
    # acc 3/4, acc+ 1/2 -> 125
    assert scores_dict(score_predictions(rows)) == {
        "total": 125.0,
        "perception": 125.0,
        "cognition": 0.0,
        "subtasks": {"existence": {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}},
    }


def test_answer_shares_flag_constant_answers_and_broken_formats() -> None:
    shares = answer_shares(["yes", "no", "no", "other"], undecided=1)
    assert shares == {"yes": 0.25, "no": 0.5, "other": 0.25, "constant": None,
                      "undecided": 0.25, "format_broken": True}  # fmt: skip
    assert answer_shares(["no"] * 6)["constant"] == "no"
    assert answer_shares(["no"] * 6)["undecided"] is None  # decoded answers
    assert answer_shares(["other"] * 3)["constant"] == "other"
    assert not answer_shares(["yes"] * 4 + ["other"])["format_broken"]  # 20% < 25%
    with pytest.raises(ValueError, match="not yes/no/other"):
        answer_shares(["Yes"])


def test_threshold_rule_choice_and_reasons() -> None:
    full, part = list(CATEGORIES), CATS
    assert choose_threshold_rule(None, None, None, full, True)[0] == "absolute"
    rule, why = choose_threshold_rule(None, None, None, part, False)
    assert rule == "relative" and "3 of 14 MME subtasks" in why
    assert choose_threshold_rule(None, 50.0, None, part, False) == ("absolute", "--threshold given")
    assert choose_threshold_rule(None, None, 0.3, full, True)[0] == "relative"
    rule, why = choose_threshold_rule("absolute", None, None, part, False)
    assert rule == "absolute" and "partial MME" in why
    for args, fragment in [
        (("relative", 100.0, None), "with relative give --relative-share"),
        (("absolute", None, 0.5), "with absolute give --threshold"),
        ((None, 100.0, 0.5), "give one"),
        (("median", None, None), "--threshold-rule median"),
    ]:
        with pytest.raises(VlmCreditError, match=fragment):
            choose_threshold_rule(*args, part, False)


def test_threshold_rule_numbers() -> None:
    gray = scores(100.0, 50.0, 100.0)  # total 250, perception 150
    absolute = threshold_rule("absolute", "why", "total", BASE, gray)
    assert absolute["threshold"] == 100.0 and absolute["formula"] == "drop in total > 100"
    relative = threshold_rule("relative", "why", "total", BASE, gray)
    assert relative["threshold"] == 0.5 * (450.0 - 250.0) and relative["warning"] is None
    assert relative["formula"].endswith("= 0.5 x (450 - 250) = 100")
    share = threshold_rule("relative", "why", "perception", BASE, gray, share=0.25)
    assert share["threshold"] == 0.25 * (330.0 - 150.0)
    # a baseline no better than the gray image: nothing can be called vision-critical
    blind = threshold_rule("relative", "why", "total", BASE, scores(200.0, 150.0, 120.0))
    assert blind["threshold"] == 450.0 and "does not beat the gray-image" in blind["warning"]
    assert select_critical([{"total": 450.0, "perception": 0.0}], "total", 450.0) == [False]
    # a tie up to float noise is not "more than": 0.5 x (433.33 - 200) against a drop of the
    # same 116.67 summed in another order (a relative rule on a built-in demo run)
    gap = 1300 / 3 - 200.0
    tie = {"total": 116.66666666666663, "perception": 0.0}
    assert tie["total"] < 0.5 * gap and round(tie["total"], 6) == round(0.5 * gap, 6)
    assert select_critical([tie], "total", 0.5 * gap) == [False]
    assert select_critical([{"total": 116.667, "perception": 0.0}], "total", 0.5 * gap) == [True]
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(VlmCreditError, match="--relative-share"):
            threshold_rule("relative", "why", "total", BASE, gray, share=bad)


def report_with_controls() -> dict:
    """A heads.json object with the threshold rule, controls and answer shares."""
    gray = scores(100.0, 50.0, 100.0)
    rule = threshold_rule("relative", "partial", "total", BASE, gray)
    answers = [answer_shares(a) for a in (["no"] * 4, ["yes", "no", "other", "other"],
                                          ["yes", "no"] * 2, ["yes"] * 3 + ["no"])]  # fmt: skip
    return build_heads_report(
        **{**_kwargs(), "threshold": rule["threshold"]},
        rule=rule,
        controls={"constant_yes": scores(50, 50, 50), "constant_no": scores(50, 50, 50),
                  "gray_image": {**gray, "answers": answer_shares(["no"] * 4)}},
        answers=answer_shares(["yes", "no"] * 2), head_answers=answers,
    )  # fmt: skip


def test_report_carries_controls_rule_and_answer_shares() -> None:
    report = report_with_controls()
    rule = report["threshold_rule"]
    assert rule["rule"] == "relative" and rule["formula"].endswith("= 100")
    assert report["threshold_rule"] == rule and report["threshold"] == 100.0
    assert report["controls"]["gray_image"]["total"] == 250.0
    assert report["controls"]["gray_image"]["answers"]["constant"] == "no"
    assert report["controls"]["constant_yes"] == {"total": 150.0, "perception": 100.0,
                                                  "cognition": 50.0}  # fmt: skip
    assert [h["answers"]["constant"] for h in report["heads"]] == ["no", None, None, None]
    assert [h["answers"]["format_broken"] for h in report["heads"]] == [False, True, False, False]
    assert report["answer_format"] == {"high_other_share": 0.25}
    with pytest.raises(ValueError, match="go together"):
        build_heads_report(**{**_kwargs(), "rule": rule})
    json.dumps(report)


def _results() -> list:
    return [
        (None, 0, scores(60.0, 150.0, 120.0)),
        (None, 1, scores(180.0, 150.0, 10.0)),
        (None, 2, scores(181.0, 150.0, 130.0)),
        (None, 3, scores(80.0, 150.0, 120.0)),
    ]


def _kwargs() -> dict:
    return dict(checkpoint=CHECKPOINT, mode="head-index", ablation="zero", answering="logits",
                metric="total", threshold=100.0, num_questions=4, categories=CATS,
                baseline=BASE, results=_results())  # fmt: skip
