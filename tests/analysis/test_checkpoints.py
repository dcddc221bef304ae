"""Checkpoint comparison (`analysis.checkpoints`) on small planted tables, against values worked
out by hand: anchor overlap, distribution shift (bimodality, anchor share), per-head drop change."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmcredit.analysis.checkpoints import (
    CheckpointHeads,
    CheckpointTokens,
    compare_checkpoints,
    heads_shift,
    rollout_mismatch,
    token_shift,
    token_stats,
)
from vlmcredit.errors import VlmCreditError

# (sample_id, token_index) in key order; b stores its rows shuffled (the keys align them).
KEYS = [("s0", 0), ("s0", 1), ("s0", 2), ("s0", 3), ("s1", 0), ("s1", 1)]
IDS = [11, 12, 13, 14, 21, 22]
CONN_A = [0.0, 0.5, 0.5, 0.5, 0.5, 1.0]  # symmetric, no excess kurtosis: BC = 4/35
CONN_B = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # two spikes: BC = 12/35
ANCHOR_A = [False, True, False, False, False, True]  # 2 of 6
ANCHOR_B = [False, False, False, True, True, True]  # 3 of 6
SHUFFLE = [4, 0, 5, 2, 1, 3]


def _tokens(label, conn, anchor, order=None, ids=IDS, keys=KEYS):
    order = list(range(len(keys))) if order is None else order
    return CheckpointTokens(
        label=label,
        sample_id=[keys[i][0] for i in order],
        token_index=[keys[i][1] for i in order],
        connectivity=[conn[i] for i in order],
        anchor=[anchor[i] for i in order],
        token_id=[ids[i] for i in order],
    )


def _heads(label, drops, critical, baseline):
    return CheckpointHeads(
        label=label,
        metric="total",
        baseline=baseline,
        baseline_total=baseline,
        drops={(None, h): d for h, d in enumerate(drops)},
        critical={(None, h) for h in critical},
    )


def test_token_stats_by_hand() -> None:
    a = token_stats(_tokens("a", CONN_A, ANCHOR_A))
    b = token_stats(_tokens("b", CONN_B, ANCHOR_B, SHUFFLE))
    # Sarle's coefficient, n = 6, zero skew: 1 / (kurt + 3 * 25 / 12) with
    # kurt = 5/12 * (7 g2 + 6); a: g2 = 0 -> 1 / 8.75; b: g2 = -2 -> 1 / (35/12)
    assert a["bimodality_coefficient"] == pytest.approx(4 / 35)
    assert b["bimodality_coefficient"] == pytest.approx(12 / 35)
    assert a["anchor_share"] == pytest.approx(1 / 3) and b["anchor_share"] == 0.5
    assert a["connectivity_mean"] == 0.5 and a["connectivity_median"] == 0.5
    assert a["anchor_connectivity_mean"] == 0.75 and a["other_connectivity_mean"] == 0.375
    assert b["anchor_contrast"] == 1.0 and a["samples"] == 2 and a["tokens"] == 6


def test_token_shift_by_hand() -> None:
    shift = token_shift(_tokens("a", CONN_A, ANCHOR_A), _tokens("b", CONN_B, ANCHOR_B, SHUFFLE))
    # anchors a = {(s0,1), (s1,1)}, b = {(s0,3), (s1,0), (s1,1)}: both = 1, union = 4
    assert (shift["anchors_a"], shift["anchors_b"], shift["both"]) == (2, 3, 1)
    assert shift["jaccard"] == pytest.approx(1 / 4)
    assert shift["precision"] == pytest.approx(1 / 2)  # of a's anchors, still anchors in b
    assert shift["recall"] == pytest.approx(1 / 3)  # of b's anchors, anchors already in a
    assert shift["bimodality_coefficient_change"] == pytest.approx(8 / 35)
    assert shift["anchor_share_change"] == pytest.approx(1 / 6)
    assert shift["connectivity_mean_change"] == 0.0
    assert shift["connectivity_median_change"] == 0.0
    assert shift["anchor_contrast_change"] == pytest.approx(0.625)
    # average ranks a: 1, 3.5 x4, 6; b: 2 x3, 5 x3 -> 7.5 / sqrt(12.5 * 13.5) = 1 / sqrt(3)
    assert shift["connectivity_spearman"] == pytest.approx(1 / math.sqrt(3))


def test_heads_shift_by_hand() -> None:
    a = _heads("a", [10.0, 120.0, -5.0], critical=[1], baseline=1500.0)
    b = _heads("b", [150.0, 130.0, 0.0], critical=[0, 1], baseline=1600.0)
    shift = heads_shift(a, b)
    assert [h["change"] for h in shift["heads"]] == [140.0, 10.0, 5.0]
    assert [(h["critical_a"], h["critical_b"]) for h in shift["heads"]] == [
        (False, True),
        (True, True),
        (False, False),
    ]
    assert shift["baseline_change"] == 100.0
    assert shift["max_drop_change"] == 30.0
    assert shift["mean_drop_change"] == pytest.approx(155 / 3)
    assert shift["mean_abs_drop_change"] == pytest.approx(155 / 3)
    assert shift["num_critical_change"] == 1.0
    assert shift["critical_jaccard"] == 0.5
    assert (shift["critical_precision"], shift["critical_recall"]) == (1.0, 0.5)
    # ranks a: 2, 3, 1; b: 3, 2, 1 -> centred (0, 1, -1) . (1, 0, -1) / 2 = 0.5
    assert shift["drop_spearman"] == pytest.approx(0.5)


def test_three_checkpoints_give_consecutive_pairs_and_first_to_last() -> None:
    c = _tokens("c", CONN_B, [True] * 6)
    tokens = [_tokens("a", CONN_A, ANCHOR_A), _tokens("b", CONN_B, ANCHOR_B, SHUFFLE), c]
    heads = [
        _heads("a", [1.0, 2.0], [], 10.0),
        _heads("b", [3.0, 2.0], [0], 12.0),
        _heads("c", [4.0, 9.0], [0, 1], 15.0),
    ]
    result = compare_checkpoints(["a", "b", "c"], tokens, heads)
    pairs = [(p["a"], p["b"], p["kind"]) for p in result["pairs"]]
    assert pairs == [("a", "b", "consecutive"), ("b", "c", "consecutive"), ("a", "c", "first-last")]
    last = result["pairs"][2]
    assert last["anchors"]["anchor_share_change"] == pytest.approx(2 / 3)
    assert [h["change"] for h in last["heads"]["heads"]] == [3.0, 7.0]
    drops = result["checkpoints"][1]["heads"]["drops"]
    assert drops == [
        {"layer": None, "head": 0, "drop": 3.0, "critical": True},
        {"layer": None, "head": 1, "drop": 2.0, "critical": False},
    ]
    # anchors only: no heads anywhere
    only = compare_checkpoints(["a", "b"], tokens[:2], None)
    assert only["pairs"][0]["heads"] is None and only["checkpoints"][0]["heads"] is None


def test_different_rollouts_are_named() -> None:
    a = _tokens("a", CONN_A, ANCHOR_A)
    other_sample = _tokens("b", CONN_B, ANCHOR_B, keys=[*KEYS[:4], ("s9", 0), ("s9", 1)])
    assert rollout_mismatch(a, other_sample) == "sample 's1' is only in a, not in b"
    shorter = CheckpointTokens(
        "b", ["s0"] * 3 + ["s1"] * 2, [0, 1, 2, 0, 1], np.zeros(5), np.zeros(5, bool)
    )
    assert rollout_mismatch(a, shorter) == "sample 's0' has 4 response tokens in a and 3 in b"
    retokenized = _tokens("b", CONN_B, ANCHOR_B, ids=[11, 12, 99, 14, 21, 22])
    assert "'s0' token 2 is token id 13 in a and 99 in b" in rollout_mismatch(a, retokenized)
    assert rollout_mismatch(a, _tokens("b", CONN_B, ANCHOR_B, SHUFFLE)) is None
    with pytest.raises(VlmCreditError, match="do not hold the same rollouts"):
        token_shift(a, retokenized)


def test_different_head_ablations_are_refused() -> None:
    a = _heads("a", [1.0, 2.0], [], 10.0)
    b = _heads("b", [1.0, 2.0, 3.0], [], 10.0)
    with pytest.raises(VlmCreditError, match=r"head 2 \(every layer\) was ablated only in b"):
        heads_shift(a, b)
    with pytest.raises(VlmCreditError, match="at least two checkpoints"):
        compare_checkpoints(["a"], None, [a])
