"""Looking up a trainer's responses in a validated signals table (the reading side of the
contract that trainers call every step): exact match by (sample_id, sha1 of the response token
ids), batch weights for a (B, T) trainer batch, and the misalignment check that turns a shifted
response into an error instead of weights on the wrong tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError

# What a trainer does with a response the signals do not hold: stop (default in the adapters),
# keep it at weight 1 (plain GRPO for that response) or drop it (weight 0).
ON_MISS = ("error", "keep", "drop")

# How many tokens two responses must share before a near-miss counts as a shifted alignment.
_SHIFT_MIN_OVERLAP = 4
_MAX_SHIFT = 2


def response_id(token_ids: Sequence[int]) -> str:
    """sha1 hex of the response token ids written as ASCII decimals joined by ","."""
    return hashlib.sha1(",".join(str(int(i)) for i in token_ids).encode()).hexdigest()


@dataclass
class BatchWeights:
    """Per-token weights for a trainer batch (B, T), and what could not be found."""

    weights: Any  # torch.Tensor float32 (B, T); 1.0 where no signal and on padding
    selected: Any  # torch.Tensor bool (B, T): tokens the method selected (mask, else weight != 0)
    rows_found: int
    rows_missed: int
    tokens_missed: int
    missed: list[int] = field(default_factory=list)  # batch rows with no entry

    @property
    def match_rate(self) -> float:
        """Share of the batch's (non-empty) responses found in the signals; 1.0 for none."""
        total = self.rows_found + self.rows_missed
        return 1.0 if total == 0 else self.rows_found / total


@dataclass
class Signals:
    """A validated signals table and its manifest `signals` object."""

    frame: Any  # pandas.DataFrame, list cells as numpy arrays
    meta: dict[str, Any]
    source: str = ""
    _index: dict[tuple[str, str], int] | None = field(default=None, repr=False)
    _by_sample: dict[str, list[int]] | None = field(default=None, repr=False)

    @property
    def loss_denominator(self) -> str:
        return str(self.meta.get("loss_denominator", "all_tokens"))

    def _build_index(self) -> None:
        ids = self.frame["sample_id"].tolist()
        rids = self.frame["response_id"].tolist()
        self._index = {(s, r): i for i, (s, r) in enumerate(zip(ids, rids, strict=True))}
        by_sample: dict[str, list[int]] = {}
        for i, s in enumerate(ids):
            by_sample.setdefault(s, []).append(i)
        self._by_sample = by_sample

    def row_index(self, sample_id: str, token_ids: Sequence[int]) -> int | None:
        """Row position of (sample_id, token ids), None when absent.

        A miss whose sample holds a response equal to these tokens shifted by one or two
        positions raises: the producer and the trainer disagree about where the response starts,
        and every weight would land on the wrong token.
        """
        if self._index is None:
            self._build_index()
        assert self._index is not None and self._by_sample is not None
        ids = [int(t) for t in token_ids]
        found = self._index.get((str(sample_id), response_id(ids)))
        if found is None:
            self._check_not_shifted(str(sample_id), ids)
        return found

    def lookup(self, sample_id: str, token_ids: Sequence[int]) -> np.ndarray | None:
        """The advantage multipliers of this response (weight x sample_weight), or None."""
        i = self.row_index(sample_id, token_ids)
        if i is None:
            return None
        row = self.frame.iloc[i]
        weight = np.asarray(row["weight"], dtype=np.float32)
        if "sample_weight" in self.frame.columns and row["sample_weight"] is not None:
            weight = weight * np.float32(row["sample_weight"])
        return weight

    def selection(self, sample_id: str, token_ids: Sequence[int]) -> np.ndarray | None:
        """Tokens the method selected: the `mask` column, else weight != 0; None if absent."""
        i = self.row_index(sample_id, token_ids)
        if i is None:
            return None
        row = self.frame.iloc[i]
        if "mask" in self.frame.columns and row["mask"] is not None:
            return np.asarray(row["mask"], dtype=bool)
        return np.asarray(row["weight"]) != 0

    def batch_weights(
        self, sample_ids: Sequence[str], token_ids: Any, mask: Any, on_miss: str = "keep"
    ) -> BatchWeights:
        """(B, T) weights for a right-padded batch of responses, looked up by sample id + exact
        response token ids.

        `token_ids` and `mask` are (B, T) tensors as trainers hold them (TRL's completion_ids
        and completion_mask, VERL's responses and response_mask); a row's response is its
        tokens where mask is 1. Rows whose mask is all zero are skipped (no loss either).
        A response with no entry: `on_miss="error"` raises naming the first one and the batch's
        match rate; "keep" gives it weight 1, "drop" weight 0 (and no selected tokens); both
        count it in `rows_missed` / `missed`.
        """
        import torch

        if on_miss not in ON_MISS:
            raise VlmCreditError(f"on_miss {on_miss!r}: choose one of {', '.join(ON_MISS)}")
        ids = torch.as_tensor(token_ids)
        valid = torch.as_tensor(mask).bool()
        weights = torch.ones(ids.shape, dtype=torch.float32)
        selected = valid.clone()
        found = tokens_missed = 0
        missed: list[int] = []
        for b, sid in enumerate(sample_ids):
            row_mask = valid[b]
            n = int(row_mask.sum())
            if n == 0:
                continue
            tokens = ids[b][row_mask].tolist()
            w = self.lookup(str(sid), tokens)
            if w is None:
                missed.append(b)
                tokens_missed += n
                if on_miss == "drop":
                    weights[b, row_mask] = 0.0
                    selected[b] = False
                continue
            found += 1
            positions = row_mask.nonzero().flatten()
            weights[b, positions] = torch.tensor(w, dtype=torch.float32)
            sel = self.selection(str(sid), tokens)
            selected[b, positions] = torch.tensor(np.asarray(sel, dtype=bool))
        result = BatchWeights(weights, selected, found, len(missed), tokens_missed, missed)
        if missed and on_miss == "error":
            b = missed[0]
            tokens = ids[b][valid[b]].tolist()
            raise VlmCreditError(
                f"{self.source or 'signals'}: batch row {b} (sample {str(sample_ids[b])!r}, "
                f"response {response_id(tokens)[:12]}, {len(tokens)} tokens) has no signals row; "
                f"{found} of {found + len(missed)} responses matched "
                f"({100 * result.match_rate:.0f}%): compute the signals on the rollouts this "
                "trainer replays, or pass on_miss='keep' (weight 1) or 'drop' (weight 0)"
            )
        return result

    def _check_not_shifted(self, sample_id: str, ids: list[int]) -> None:
        assert self._by_sample is not None
        for i in self._by_sample.get(sample_id, []):
            stored = [int(t) for t in self.frame.iloc[i]["token_ids"]]
            for k in range(1, _MAX_SHIFT + 1):
                for a, b in ((stored, ids), (ids, stored)):
                    overlap = min(len(a) - k, len(b))
                    if overlap >= _SHIFT_MIN_OVERLAP and a[k : k + overlap] == b[:overlap]:
                        raise VlmCreditError(
                            f"{self.source or 'signals'}: sample {sample_id!r}: the stored "
                            f"response token ids are shifted by {k} against the trainer's "
                            "tokens; index 0 must be the first generated token: re-export the "
                            "signals from the same responses the trainer holds"
                        )
