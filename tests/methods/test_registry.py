"""The method registry: declarations are checked, parameters parse, outputs are validated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from vlmcredit.analysis.anchors import AnchorConfig
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods import registry
from vlmcredit.methods.registry import Method, MethodOutput, Needs, SamplePasses


@dataclass
class _Cfg:
    value: float = 1.0
    count: int = 2
    flag: bool = False


def _compute(passes, cfg):
    return [MethodOutput(weight=np.full(len(p.token_ids), cfg.value)) for p in passes]


def _method(**overrides) -> Method:
    fields = dict(
        name="toy-check",
        summary="test",
        paper="none",
        config=_Cfg,
        needs=lambda _c: Needs(),
        compute=_compute,
    )
    fields.update(overrides)
    return Method(**fields)


def test_builtin_anchors_is_registered_with_its_loss_semantics() -> None:
    m = registry.get("anchors")
    assert "anchors" in registry.available()
    assert m.config is AnchorConfig
    assert m.needs(m.config()) == Needs(attention=True)
    cfg = m.config()
    # weight 0 outside the anchors: the loss averages over the anchors (docs/methods.md)
    assert (m.denominator_for(cfg), m.scope_for(cfg)) == ("selected_tokens", "per_response")
    cfg.other_weight, cfg.ratio_scope = 0.1, "batch"
    assert (m.denominator_for(cfg), m.scope_for(cfg)) == ("all_tokens", "per_batch")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"config": dict}, "config must be a dataclass"),
        ({"loss_denominator": "tokens"}, "loss_denominator"),
        ({"selection_scope": "global"}, "selection_scope"),
        ({"columns": {"score": "float16"}}, "dtype"),
        ({"columns": {"weight": "float32"}}, "contract column"),
        ({"name": "bad name!"}, "letters, digits"),
    ],
)
def test_incomplete_declarations_are_refused(overrides, message) -> None:
    with pytest.raises(VlmCreditError, match=message):
        registry.register(_method(**overrides))
    assert "toy-check" not in registry.REGISTRY


def test_a_name_is_taken_once() -> None:
    with pytest.raises(VlmCreditError, match="already registered"):
        registry.register(_method(name="anchors"))


def test_parameters_parse_and_check() -> None:
    m = _method()
    cfg = m.make_config(registry.parse_params(["value=0.5", "count=3", "flag=true"]))
    assert (cfg.value, cfg.count, cfg.flag) == (0.5, 3, True)
    anchors = registry.get("anchors").make_config(
        registry.parse_params(["ratio=0.2", "cluster.seed=7", "mode=similarity"])
    )
    assert (anchors.ratio, anchors.cluster.seed, anchors.mode) == (0.2, 7, "similarity")
    for bad, message in (
        (["nope=1"], "has no parameter 'nope'"),
        (["count=1.5"], "whole number"),
        (["value=abc"], "expects a number"),
        (["flag=1"], "true or false"),
        (["noequals"], "NAME=VALUE"),
    ):
        with pytest.raises(VlmCreditError, match=message):
            m.make_config(registry.parse_params(bad))
    with pytest.raises(VlmCreditError, match="ratio"):  # the config's own check runs
        registry.get("anchors").make_config({"ratio": 1.5})


def test_outputs_are_checked_against_the_contract() -> None:
    passes = [SamplePasses("s0", np.arange(3))]

    def wrong_length(passes, cfg):
        return [MethodOutput(weight=np.ones(2))]

    def negative(passes, cfg):
        return [MethodOutput(weight=-np.ones(3))]

    def undeclared(passes, cfg):
        return [MethodOutput(weight=np.ones(3), columns={"score": np.ones(3)})]

    for compute, message in (
        (wrong_length, "3 finite values"),
        (negative, "3 finite values"),
        (undeclared, "not declared"),
    ):
        m = _method(compute=compute)
        with pytest.raises(VlmCreditError, match=message):
            m.run(passes, m.config())
    ok = _method().run(passes, _Cfg(value=0.25))
    assert ok[0].weight.dtype == np.float32
    np.testing.assert_array_equal(ok[0].weight, [0.25, 0.25, 0.25])


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(VlmCreditError, match=r"unknown; choose one of .*anchors"):
        registry.get("tor-typo")
    with pytest.raises(VlmCreditError, match="name at least one"):
        registry.parse_methods(" , ")
    assert [m.name for m in registry.parse_methods("anchors,anchors")] == ["anchors"]
