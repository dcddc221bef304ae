"""heads.json / heads.parquet: the writer's table, the reader's validation, both file kinds."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.analysis.test_heads import _report, report_with_controls
from vlmcredit.analysis import heads as analysis_heads
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats import heads as formats_heads
from vlmcredit.formats.heads import heads_table, read_heads, write_heads


def test_vocabulary_matches_analysis() -> None:
    """analysis may not import formats: the two copies of the names must stay equal."""
    for name in ("MODES", "METRICS", "GROUPS", "THRESHOLD_RULES", "CONTROLS", "LABELS"):
        assert getattr(formats_heads, name) == getattr(analysis_heads, name), name


def test_heads_table_schema() -> None:
    table = heads_table(_report("layer-head"))
    assert list(table.columns) == [
        "layer", "head", "total", "perception", "cognition", "drop_total", "drop_perception",
        "drop_cognition", "critical", "score_existence", "score_count",
        "score_numerical_calculation",
    ]  # fmt: skip
    assert str(table["layer"].dtype) == "int32" and str(table["head"].dtype) == "int32"
    assert table["critical"].dtype == bool
    assert list(table["layer"]) == [1, 0, 2, 3]
    assert list(heads_table(_report())["layer"]) == [-1, -1, -1, -1]  # every layer
    assert table.loc[2, "drop_total"] == -11.0 and table.loc[0, "score_existence"] == 60.0


def test_read_heads_round_trip_and_validation(tmp_path) -> None:
    report = _report()
    write_heads(tmp_path, report)
    assert read_heads(tmp_path) == report
    assert read_heads(tmp_path / "heads.json") == report
    assert (tmp_path / "heads.parquet").is_file()
    # Hand-written files: only critical, or only critical_heads (each head in every layer).
    only = tmp_path / "only.json"
    only.write_text(json.dumps({"critical": [{"layer": None, "head": 3}, {"layer": 2, "head": 1}]}))
    assert read_heads(only)["critical_heads"] == [1, 3]
    only.write_text(json.dumps({"critical_heads": [0, 1, 3]}))
    assert read_heads(only)["critical"] == [{"layer": None, "head": h} for h in (0, 1, 3)]
    bad_cases = [
        ("{", "not valid JSON"),
        ("[]", "top level is not an object"),
        ('{"mode": "head-index"}', "neither critical nor critical_heads"),
        ('{"critical_heads": [-1]}', "list of head indices"),
        ('{"critical": [{"layer": "x", "head": 1}]}', "critical must be a list"),
        ('{"critical": [], "critical_heads": [2]}', "critical_heads disagrees"),
        (json.dumps({**report, "critical": [], "critical_heads": []}), "marked critical"),
        (json.dumps({**report, "mode": "grid"}), "mode 'grid'"),
    ]
    for text, fragment in bad_cases:
        only.write_text(text)
        with pytest.raises(VlmCreditError, match=fragment) as info:
            read_heads(only)
        assert "\n" not in str(info.value) and str(only) in str(info.value)
    with pytest.raises(VlmCreditError, match=r"no heads\.json there"):
        read_heads(tmp_path / "missing")


def test_written_parquet_is_the_table(tmp_path) -> None:
    report = _report("layer-head", threshold=50.0)
    write_heads(tmp_path, report)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "heads.parquet"), heads_table(report))
    broken = {**report, "critical_heads": [3]}
    with pytest.raises(ValueError, match="critical_heads disagrees"):
        write_heads(tmp_path / "never", broken)
    assert not (tmp_path / "never").exists()


def test_full_read_needs_a_probe_heads_result(tmp_path) -> None:
    """`full=True` (the report) refuses hand-written files and names the missing piece."""
    report = _report()
    write_heads(tmp_path, report)
    assert read_heads(tmp_path, full=True) == report
    file = tmp_path / "heads.json"
    cases = [
        ({k: v for k, v in report.items() if k != "threshold"}, "missing key 'threshold'"),
        ({"critical_heads": [0, 1]}, "missing key 'mode'"),
        ({**report, "threshold": "high"}, "threshold 'high' is not a number"),
        ({**report, "baseline": {}}, "baseline.total is not a number"),
        ({**report, "heads": [], "critical": [], "critical_heads": []}, "heads is empty"),
        (
            {**report, "heads": [{**h, "drop": {}} for h in report["heads"]]},
            r"heads\[0\].drop.total is not a number",
        ),
        (
            {**report, "heads": [{**h, "critical": 1} for h in report["heads"]]},
            r"heads\[0\].critical is 1, not true/false",
        ),
    ]
    for obj, fragment in cases:
        file.write_text(json.dumps(obj))
        with pytest.raises(VlmCreditError, match=fragment) as info:
            read_heads(tmp_path, full=True)
        assert "\n" not in str(info.value) and "or write" not in str(info.value)
    grid = _report("layer-head")
    grid["heads"][0]["layer"] = None
    grid["critical"][0]["layer"] = None
    file.write_text(json.dumps(grid))
    with pytest.raises(VlmCreditError, match=r"heads\[0\] has no layer in layer-head mode"):
        read_heads(tmp_path, full=True)


def test_controls_and_answer_shares_round_trip_and_validation(tmp_path) -> None:
    report = report_with_controls()
    write_heads(tmp_path, report)
    assert read_heads(tmp_path, full=True) == report
    table = pd.read_parquet(tmp_path / "heads.parquet")
    assert list(table.columns[9:14]) == [
        "share_yes", "share_no", "share_other", "constant", "format_broken",
    ]  # fmt: skip
    assert list(table["share_other"]) == [h["answers"]["other"] for h in report["heads"]]
    assert list(table["constant"].fillna("")) == ["no", "", "", ""]
    assert list(table["format_broken"]) == [False, True, False, False]
    file = tmp_path / "heads.json"
    gray = report["controls"]["gray_image"]
    rule = report["threshold_rule"]
    head0 = report["heads"][0]
    cases = [
        ({**report, "threshold_rule": {**rule, "rule": "median"}}, "threshold_rule.rule must"),
        ({**report, "threshold_rule": {**rule, "threshold": 5.0}}, "disagrees with threshold"),
        ({**report, "threshold_rule": {"rule": "absolute"}}, "lacks its reason / formula"),
        ({**report, "controls": {"gray_image": gray}}, "controls must hold constant_yes"),
        (
            {**report, "controls": {**report["controls"], "constant_no": {"total": 1.0}}},
            "controls.constant_no lacks total/perception/cognition",
        ),
        (
            {**report, "heads": [{**head0, "answers": {**head0["answers"], "no": 0.5}},
                                 *report["heads"][1:]]},
            r"heads\[0\].answers: yes/no/other shares do not sum to 1",
        ),
        (
            {**report, "baseline": {**report["baseline"], "answers": {"yes": 1.0}}},
            "baseline.answers: yes/no/other must be shares",
        ),
        (
            {**report, "controls": {**report["controls"], "gray_image": {
                **gray, "answers": {**gray["answers"], "constant": "maybe"}}}},
            "controls.gray_image.answers: constant 'maybe'",
        ),
    ]  # fmt: skip
    for obj, fragment in cases:
        file.write_text(json.dumps(obj))
        with pytest.raises(VlmCreditError, match=fragment) as info:
            read_heads(tmp_path, full=True)
        assert "\n" not in str(info.value)
