"""Top-share token selection shared by the log-probability methods (ToR, VPPO, entropy, SAYO).

One rule everywhere, so masks of different methods are comparable: of n scores, k =
round-half-up(ratio * n) (at least 1 when n > 0, `analysis.anchors.anchor_count`), and every
score >= the k-th largest is selected. Ties at the cut are all kept (the share can exceed the
ratio; all-equal scores select every token), because which of two equal scores to drop is
arbitrary and an arbitrary choice would make two runs disagree for no reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlmcredit.analysis.anchors import anchor_count
from vlmcredit.errors import VlmCreditError


def top_share(scores: np.ndarray, ratio: float) -> np.ndarray:
    """(n,) bool: scores >= the k-th largest, k = round-half-up(ratio * n), at least 1."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if not 0.0 < float(ratio) <= 1.0:
        raise VlmCreditError(f"ratio must be in (0, 1] (got {ratio})")
    if values.size == 0:
        return np.zeros(0, dtype=bool)
    if not np.all(np.isfinite(values)):
        raise VlmCreditError("scores to select from must be finite")
    k = anchor_count(values.size, ratio)
    cut = np.partition(values, values.size - k)[values.size - k]
    return values >= cut


def top_share_batch(scores: Sequence[np.ndarray], ratio: float) -> list[np.ndarray]:
    """`top_share` over all tokens of a batch at once, split back per response."""
    sizes = [int(np.asarray(s).size) for s in scores]
    if not sizes:
        return []
    flat = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores])
    mask = top_share(flat, ratio)
    return list(np.split(mask, np.cumsum(sizes)[:-1]))


def top_share_scoped(scores: Sequence[np.ndarray], ratio: float, scope: str) -> list[np.ndarray]:
    """`top_share` per response (scope "response") or over the batch (scope "batch")."""
    if scope == "batch":
        return top_share_batch(scores, ratio)
    if scope == "response":
        return [top_share(s, ratio) for s in scores]
    raise VlmCreditError(f"scope {scope!r}: use response or batch")
