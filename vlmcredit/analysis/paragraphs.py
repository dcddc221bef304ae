"""KAWHI Sec. 3.4: response segments (paragraphs), token -> segment mapping, Eq. 14-15 weights.

Segments partition the response text. A paragraph is a piece of `text.split("\\n\\n")` with
non-blank content; its span runs from its first character to the next paragraph's first
character, so the "\\n\\n" delimiters and blank pieces belong to the paragraph before them, and
leading blank lines to the first one. A token belongs to the segment holding its first
character (a token straddling a boundary belongs to the segment where it starts). Segments that
end up with no token (a token swallowed them) are dropped, so every segment has tokens and M
counts only those. Sentence segments (ablation) break after . ! ? (and CJK 。！？) followed by
whitespace, and at line breaks; the break's whitespace opens the next sentence (BPE glues a
space to the following word). Token segments are one token each.

Weights (Eq. 15): w~ = (1 - lambda) softmax(abar / tau) + lambda / M,
w = w_min + (w_max - w_min) w~. As w~ sums to 1, the mean weight shrinks as M grows (the
paper's form); `renormalize` divides by the token-weighted mean so the loss scale is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from vlmcredit.errors import VlmCreditError

GRANULARITIES = ("paragraph", "sentence", "token")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def segment_starts(text: str, granularity: str = "paragraph") -> np.ndarray:
    """Character offsets where segments start (the first is 0), for paragraph or sentence."""
    if granularity == "paragraph":
        pieces = text.split("\n\n")
        starts, pos = [], 0
        for piece in pieces:
            if piece.strip():
                starts.append(pos)
            pos += len(piece) + 2
    elif granularity == "sentence":
        # a break's whitespace opens the next sentence: BPE glues a space to the word after it
        # (" Then"), so that token starts the sentence it belongs to
        starts, pos = [], 0
        for cut in [*(m.start() for m in _SENTENCE_BREAK.finditer(text)), len(text)]:
            if text[pos:cut].strip():
                starts.append(pos)
            pos = cut
    else:
        raise VlmCreditError(
            f"granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}"
        )
    if not starts:
        return np.zeros(1, dtype=np.int64)  # a blank response is one segment
    starts[0] = 0  # leading blank lines belong to the first segment
    return np.asarray(starts, dtype=np.int64)


def token_segments(
    text: str, token_spans: np.ndarray, granularity: str = "paragraph"
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(segment id per token (T,) int32 numbered 0..M-1, each segment's [start, end) chars).

    `token_spans` (T, 2) are each token's character [start, end) in `text`.
    """
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    n = spans.shape[0]
    if granularity == "token":
        return np.arange(n, dtype=np.int32), [(int(a), int(b)) for a, b in spans]
    starts = segment_starts(text, granularity)
    raw = np.searchsorted(starts, spans[:, 0], side="right") - 1
    raw = np.maximum(raw, 0)
    used, ids = np.unique(raw, return_inverse=True)  # drop segments without tokens
    ends = np.append(starts[1:], len(text))
    bounds = [(int(starts[u]), int(ends[u])) for u in used]
    # a dropped segment's text joins the kept one before it
    bounds = [
        (a, bounds[k + 1][0] if k + 1 < len(bounds) else len(text))
        for k, (a, _) in enumerate(bounds)
    ]
    return ids.astype(np.int32).reshape(n), bounds


def segment_means(values: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Eq. 14: mean of `values` over each segment's tokens (segments numbered 0..M-1)."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.bincount(segments)
    if counts.size and counts.min() == 0:
        raise VlmCreditError("segment_means: a segment has no tokens (number them 0..M-1)")
    return np.bincount(segments, weights=values, minlength=counts.size) / counts


@dataclass
class WeightConfig:
    """Eq. 15 parameters. tau and lambda are not given by the paper; our defaults:
    tau = 0.1 (a 0.1 difference of mean cosine between two paragraphs is an e-fold ratio of
    their softmax shares; cosines of real Q/K differ by a few hundredths to tenths), lambda =
    0.1 (a tenth of the mass stays uniform, so no paragraph is starved)."""

    tau: float = 0.1
    lam: float = 0.1
    w_min: float = 0.1
    w_max: float = 1.0
    renormalize: bool = False  # rescale to token-weighted mean 1 (False = the paper)

    def check(self) -> None:
        if not self.tau > 0:
            raise VlmCreditError(f"tau={self.tau}: the softmax temperature must be > 0")
        if not 0.0 <= self.lam <= 1.0:
            raise VlmCreditError(f"lam={self.lam}: the uniform mixing share must lie in [0, 1]")
        if not 0.0 <= self.w_min <= self.w_max:
            raise VlmCreditError(
                f"w_min={self.w_min}, w_max={self.w_max}: need 0 <= w_min <= w_max"
            )


def segment_weights(
    means: np.ndarray, cfg: WeightConfig, counts: np.ndarray | None = None
) -> np.ndarray:
    """Eq. 15 per segment; with `cfg.renormalize`, divided by the token-weighted mean
    (`counts` = tokens per segment; required then)."""
    abar = np.asarray(means, dtype=np.float64)
    m = abar.size
    if m == 0:
        return np.zeros(0)
    z = abar / cfg.tau
    z -= z.max()  # stable softmax
    soft = np.exp(z)
    soft /= soft.sum()
    mixed = (1.0 - cfg.lam) * soft + cfg.lam / m
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * mixed
    if cfg.renormalize:
        if counts is None:
            raise VlmCreditError("segment_weights: renormalize needs the token counts")
        mean = float(np.average(w, weights=np.asarray(counts, dtype=np.float64)))
        if mean <= 0:
            raise VlmCreditError(
                "renormalize: every weight is 0 (w_max = 0); there is no mean to rescale to"
            )
        w = w / mean
    return w
