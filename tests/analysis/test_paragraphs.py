"""KAWHI Sec. 3.4: paragraph segmentation, token mapping and Eq. 14-15 against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmcredit.analysis.paragraphs import (
    WeightConfig,
    segment_means,
    segment_starts,
    segment_weights,
    token_segments,
)
from vlmcredit.errors import VlmCreditError


def char_spans(pieces: list[str]) -> tuple[str, np.ndarray]:
    """Text and [start, end) of each piece (pieces play the tokens)."""
    spans, pos = [], 0
    for p in pieces:
        spans.append((pos, pos + len(p)))
        pos += len(p)
    return "".join(pieces), np.array(spans)


def test_eq15_by_hand() -> None:
    abar = np.array([0.2, -0.1, 0.05])
    tau, lam = 0.1, 0.2
    e = [math.exp(a / tau) for a in abar]
    soft = [x / sum(e) for x in e]
    expected = [0.1 + 0.9 * ((1 - lam) * s + lam / 3) for s in soft]
    got = segment_weights(abar, WeightConfig(tau=tau, lam=lam))
    assert np.allclose(got, expected, rtol=1e-12)
    assert np.all((got >= 0.1) & (got <= 1.0))
    # sum behaviour: w~ sums to 1, so sum(w) = M w_min + (w_max - w_min)
    assert got.sum() == pytest.approx(3 * 0.1 + 0.9)


def test_lambda_one_is_uniform_and_small_tau_concentrates() -> None:
    abar = np.array([0.3, 0.1, -0.2, 0.25])
    uniform = segment_weights(abar, WeightConfig(lam=1.0))
    assert np.allclose(uniform, 0.1 + 0.9 / 4)
    sharp = segment_weights(abar, WeightConfig(tau=1e-4, lam=0.0))
    assert sharp[0] == pytest.approx(1.0) and np.allclose(sharp[1:], 0.1)
    flat = segment_weights(abar, WeightConfig(tau=1e4, lam=0.0))
    assert np.allclose(flat, 0.1 + 0.9 / 4, atol=1e-4)
    one = segment_weights(np.array([0.7]), WeightConfig())
    assert one[0] == pytest.approx(1.0)  # a single paragraph gets w_max


def test_renormalize_gives_token_mean_one() -> None:
    abar = np.array([0.2, 0.0, 0.1])
    counts = np.array([5, 1, 10])
    w = segment_weights(abar, WeightConfig(renormalize=True), counts)
    assert np.average(w, weights=counts) == pytest.approx(1.0)
    plain = segment_weights(abar, WeightConfig())
    assert np.allclose(w / plain, w[0] / plain[0])  # same shape, rescaled


def test_segment_means() -> None:
    alpha = np.array([1.0, 3.0, -2.0, 0.5, 0.5])
    seg = np.array([0, 0, 1, 2, 2])
    assert np.allclose(segment_means(alpha, seg), [2.0, -2.0, 0.5])


def test_paragraphs_with_multibyte_characters() -> None:
    # "日本" and the emoji each count as characters; a token holding "\n\nThe" starts in the
    # delimiter and so belongs to the paragraph before it
    text, spans = char_spans(["日本", " is", ".", "\n\nThe", " 😀", " bar", ".\n\n", "End"])
    seg, bounds = token_segments(text, spans)
    assert seg.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    # paragraph 1's text starts at "The", inside token 3, which starts in paragraph 0
    assert text[bounds[1][0] :].startswith("The 😀")
    assert text[bounds[0][0] : bounds[0][1]].startswith("日本 is.\n\n")


def test_leading_and_trailing_blank_lines() -> None:
    text, spans = char_spans(["\n\n", "First", "\n\n", "Second", "\n\n\n\n"])
    seg, bounds = token_segments(text, spans)
    assert seg.tolist() == [0, 0, 0, 1, 1]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(text)
    assert segment_starts(text).tolist() == [0, 9]


def test_no_delimiter_is_one_paragraph_and_triple_newline_splits_once() -> None:
    text, spans = char_spans(["One", " line", "\n", "two"])
    seg, _ = token_segments(text, spans)
    assert seg.tolist() == [0, 0, 0, 0]
    text, spans = char_spans(["A", "\n\n\n", "B"])
    seg, bounds = token_segments(text, spans)
    assert seg.tolist() == [0, 0, 1]
    assert text[bounds[1][0] : bounds[1][1]] == "\nB"  # str.split semantics
    # "\n\n\n" is one delimiter: splitting gives "A" and "\nB", never an empty middle paragraph
    assert segment_starts("A\n\n\nB").tolist() == [0, 3]


def test_blank_response_is_one_segment() -> None:
    seg, _ = token_segments("  \n\n ", np.array([[0, 2], [2, 4], [4, 5]]))
    assert seg.tolist() == [0, 0, 0]


def test_sentence_and_token_granularity() -> None:
    text, spans = char_spans(["It", " is", ".", " Then", " 😀", "!", "\n", "Last"])
    seg, _ = token_segments(text, spans, "sentence")
    assert seg.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # breaks open the next sentence
    seg, _ = token_segments(text, spans, "token")
    assert seg.tolist() == list(range(8))
    with pytest.raises(VlmCreditError, match="granularity"):
        token_segments(text, spans, "chapter")


def test_config_refuses_impossible_values() -> None:
    with pytest.raises(VlmCreditError, match="tau"):
        WeightConfig(tau=0).check()
    with pytest.raises(VlmCreditError, match="lam"):
        WeightConfig(lam=1.5).check()
    with pytest.raises(VlmCreditError, match="w_min"):
        WeightConfig(w_min=0.5, w_max=0.2).check()
