"""Response text with each token shaded by a value (connectivity, weight) and marks (anchors).

Size matters here: a report of 50 samples x 2,000 tokens is 100,000 tokens. Each token is one
short `<i class=sK>` element (K = opacity bucket, styled once in the page CSS) or, for
unshaded and unmarked tokens, bare text; no per-token inline styles or attributes beyond the
class. Responses longer than `max_tokens` are cut with a visible note.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlmcredit.reports.html import SHADES, Raw, esc, fmt

# Control characters other than tab and newline have no business in the page (NUL breaks some
# parsers); they are shown as U+FFFD.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class ShadeScale:
    """Maps values to opacity buckets 0..SHADES-1 linearly between lo and hi."""

    lo: float
    hi: float

    @classmethod
    def fit(cls, values: np.ndarray, upper_quantile: float = 0.995) -> ShadeScale:
        """lo = min, hi = a high quantile, so one outlier does not wash everything out."""
        finite = np.asarray(values, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size == 0:
            return cls(0.0, 1.0)
        lo = float(finite.min())
        hi = float(np.quantile(finite, upper_quantile))
        if hi <= lo:
            hi = float(finite.max())
        return cls(lo, hi if hi > lo else lo + 1.0)

    def buckets(self, values: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(values, dtype=np.float64) - self.lo) / (self.hi - self.lo)
        scaled = np.nan_to_num(scaled, nan=0.0)
        return np.clip(np.floor(scaled * SHADES), 0, SHADES - 1).astype(np.int64)

    def legend(self, label: str, cls: str = "", marked: str = "") -> Raw:
        """Swatches with the value range of each bucket."""
        step = (self.hi - self.lo) / SHADES
        swatches = "".join(
            f'<i class="s{k}" title="{esc(fmt(self.lo + k * step, 3))}">{k}</i>'
            for k in range(SHADES)
        )
        mark = f' <i class="m0">{esc(marked)}</i>' if marked else ""
        return Raw(
            f'<p class="legend {esc(cls)}">{esc(label)}: {esc(fmt(self.lo, 3))} '
            f"{swatches} {esc(fmt(self.hi, 3))}+{mark}</p>"
        )


def clean_token(text: str) -> str:
    return _CONTROL.sub("\ufffd", text)


def shaded_tokens(
    tokens: Sequence[str],
    buckets: np.ndarray,
    marks: np.ndarray | None = None,
    max_tokens: int = 2000,
    cls: str = "",
) -> Raw:
    """`<div class="tokens">` with one element per shaded or marked token; cut at max_tokens."""
    total = len(tokens)
    shown = min(total, max_tokens)
    parts = []
    for i in range(shown):
        text = esc(clean_token(tokens[i]))
        k = int(buckets[i])
        if marks is not None and marks[i]:
            parts.append(f"<i class=m{k}>{text}</i>")
        elif k:
            parts.append(f"<i class=s{k}>{text}</i>")
        else:
            parts.append(text)
    cut = ""
    if shown < total:
        cut = (
            f'<p class="note">Truncated: showing the first {shown} of {total} tokens '
            "(--max-tokens).</p>"
        )
    return Raw(f'<div class="tokens {esc(cls)}">{"".join(parts)}</div>{cut}')
