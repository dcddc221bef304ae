"""Connectivity: aggregation over layers/heads, sink handling, distribution statistics.

References are written out independently: explicit loops over (layer, head) and tokens, and
the bimodality coefficient from pandas' bias-corrected skewness/kurtosis.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vlmcredit.analysis.connectivity import (
    BIMODALITY_THRESHOLD,
    aggregate_attention,
    bimodality_coefficient,
    connectivity,
    connectivity_stats,
    debias_sinks,
)
from vlmcredit.errors import VlmCreditError


def _softmax_block(rng, shape, n_image):
    """Rows of a real softmax over S = n_image + 7 keys, keeping the first n_image columns."""
    logits = rng.normal(size=(*shape, n_image + 7))
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p[..., :n_image].astype(np.float32)


def test_aggregate_all_heads_matches_loop():
    rng = np.random.default_rng(0)
    att = _softmax_block(rng, (3, 4, 5), 6)  # (L, H, T, N)
    ref = np.zeros((5, 6))
    for layer in range(3):
        for head in range(4):
            ref += att[layer, head]
    ref /= 12
    out = aggregate_attention(att)
    assert out.dtype == np.float64 and out.shape == (5, 6)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_aggregate_selected_pairs_matches_loop():
    rng = np.random.default_rng(1)
    att = _softmax_block(rng, (3, 4, 5), 6)
    pairs = [(0, 1), (2, 3), (2, 0)]
    ref = (att[0, 1].astype(np.float64) + att[2, 3] + att[2, 0]) / 3
    np.testing.assert_allclose(aggregate_attention(att, pairs), ref, rtol=1e-6)
    # H == 1 after a head mean, as capture stores it with --reduce mean
    one = att[:, :1]
    np.testing.assert_allclose(aggregate_attention(one, [(1, 0)]), one[1, 0], rtol=1e-6)


def test_aggregate_passes_2d_through():
    arr = np.arange(6, dtype=np.float64).reshape(2, 3) / 10
    out = aggregate_attention(arr)
    assert out is arr
    out32 = aggregate_attention(arr.astype(np.float32))
    assert out32.dtype == np.float64
    np.testing.assert_allclose(out32, arr, rtol=1e-6)


@pytest.mark.parametrize(
    ("arr", "pairs", "match"),
    [
        (np.zeros((2, 2, 3, 4)), [(2, 0)], "outside the captured array"),
        (np.zeros((2, 2, 3, 4)), [(0, -1)], "outside the captured array"),
        (np.zeros((2, 2, 3, 4)), [], "layer_heads is empty"),
        (np.zeros((3, 4)), [(0, 0)], "already aggregated"),
        (np.zeros((2, 3, 4)), None, "expected"),
        (np.zeros((0, 2, 3, 4)), None, "no layers"),
        (np.full((1, 1, 2, 2), np.nan), None, "NaN"),
    ],
)
def test_aggregate_rejects_bad_input(arr, pairs, match):
    with pytest.raises(VlmCreditError, match=match):
        aggregate_attention(arr, pairs)


def test_debias_mean_matches_formula():
    rng = np.random.default_rng(2)
    att = rng.random((6, 5)) * 0.1
    att[:, 0] += 0.5  # a sink column every token attends to
    out = debias_sinks(att, "mean")
    for t in range(6):
        for v in range(5):
            col_mean = sum(att[s, v] for s in range(6)) / 6
            assert out[t, v] == pytest.approx(max(att[t, v] - col_mean, 0.0), abs=1e-15)
    assert out.min() >= 0
    assert att[0, 0] > 0.5  # input untouched


def test_debias_topk_zeroes_largest_mean_columns():
    att = np.array(
        [
            [0.30, 0.01, 0.20, 0.05],
            [0.40, 0.02, 0.10, 0.05],
            [0.50, 0.03, 0.30, 0.05],
        ]
    )
    # column means: 0.40, 0.02, 0.20, 0.05 -> top 2 are columns 0 and 2
    out = debias_sinks(att, "topk", 2)
    expected = att.copy()
    expected[:, [0, 2]] = 0.0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(debias_sinks(att, "none"), att)


def test_debias_ties_take_lower_column_first():
    att = np.full((2, 3), 0.1)
    out = debias_sinks(att, "topk", 1)
    np.testing.assert_array_equal(out[:, 0], [0.0, 0.0])
    np.testing.assert_array_equal(out[:, 1:], att[:, 1:])


@pytest.mark.parametrize(
    ("mode", "k", "match"),
    [("bogus", 0, "unknown"), ("topk", 0, "k >= 1"), ("topk", 4, "drop all 4")],
)
def test_debias_rejects_bad_parameters(mode, k, match):
    with pytest.raises(VlmCreditError, match=match):
        debias_sinks(np.full((3, 4), 0.1), mode, k)


def test_debias_empty_response():
    for mode, k in (("none", 0), ("mean", 0), ("topk", 1)):
        out = debias_sinks(np.zeros((0, 4)), mode, k)
        assert out.shape == (0, 4)


def test_connectivity_is_row_mass():
    rng = np.random.default_rng(3)
    att = rng.random((4, 7)) / 7
    ref = [sum(att[t, v] for v in range(7)) for t in range(4)]
    np.testing.assert_allclose(connectivity(att), ref, rtol=1e-12)
    assert connectivity(np.zeros((0, 3))).shape == (0,)


def _bc_reference(x: np.ndarray) -> float:
    s = pd.Series(x)
    n = len(x)
    g, k = s.skew(), s.kurt()  # bias-corrected G1 and G2
    return (g**2 + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


@pytest.mark.parametrize("seed", [0, 1])
def test_bimodality_coefficient_matches_pandas(seed):
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, size=57)
    assert bimodality_coefficient(x) == pytest.approx(_bc_reference(x), rel=1e-10)


def test_bimodality_separates_bimodal_from_unimodal():
    rng = np.random.default_rng(4)
    unimodal = rng.normal(0.1, 0.03, size=2000)
    bimodal = np.concatenate([rng.normal(0.1, 0.02, 1700), rng.normal(0.7, 0.05, 300)])
    assert bimodality_coefficient(unimodal) < BIMODALITY_THRESHOLD
    assert bimodality_coefficient(bimodal) > BIMODALITY_THRESHOLD


def test_bimodality_degenerate_is_zero_not_nan():
    assert bimodality_coefficient(np.array([])) == 0.0
    assert bimodality_coefficient(np.array([0.1, 0.5, 0.9])) == 0.0
    assert bimodality_coefficient(np.full(10, 0.3)) == 0.0


def test_stats_cut_and_share():
    values = np.array([0.05, 0.10, 0.12, 0.60, 0.70, 0.08, 0.55, 0.11])
    anchor = np.array([False, False, False, True, True, False, False, False])
    st = connectivity_stats(values, anchor, bins=4)
    assert st.cut == pytest.approx(0.60)
    # values >= 0.60: 0.60 and 0.70 -> 2 of 8
    assert st.share_above_cut == pytest.approx(2 / 8)
    assert sum(st.histogram_counts) == 8
    assert len(st.histogram_edges) == 5
    assert st.histogram_edges[0] == pytest.approx(0.05)
    assert st.histogram_edges[-1] == pytest.approx(0.70)
    # bin width 0.1625: [0.05, 0.2125) holds 5 values, the last bin (closed) 0.60, 0.70, and
    # 0.55 falls in [0.5375, 0.70]
    assert st.histogram_counts == [5, 0, 0, 3]
    d = st.to_dict()
    assert set(d) == {"histogram", "bimodality_coefficient", "cut", "share_above_cut"}
    assert set(d["histogram"]) == {"edges", "counts"}


def test_stats_without_anchors_and_empty_are_finite():
    st = connectivity_stats(np.array([0.2, 0.3]))
    assert st.cut is None and st.share_above_cut == 0.0
    empty = connectivity_stats(np.array([]), np.array([], dtype=bool))
    assert empty.cut is None
    assert sum(empty.histogram_counts) == 0
    assert empty.bimodality_coefficient == 0.0
    # strict JSON: NaN or inf anywhere would raise
    json.dumps(empty.to_dict(), allow_nan=False)
    json.dumps(st.to_dict(), allow_nan=False)


def test_stats_rejects_mismatched_anchor_mask():
    with pytest.raises(VlmCreditError, match="anchor mask"):
        connectivity_stats(np.array([0.1, 0.2]), np.array([True]))
