"""Property tests (hypothesis) for the parsers and the trainer contract's round trip."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.signals import SignalsMeta, read_signals, response_id, write_signals
from vlmcredit.models.selection import parse_indices

TOKENIZER = "ab" * 20


@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_index_lists_round_trip(case) -> None:
    count, chosen = case
    text = ",".join(str(i) for i in sorted(chosen)) or "all"
    expected = sorted(chosen) or None
    assert parse_indices(text, count, "--layers") == expected
    # negative spelling of the same indices
    negative = ",".join(str(i - count) for i in sorted(chosen)) or "all"
    assert parse_indices(negative, count, "--layers") == expected


@given(st.integers(1, 40), st.data())
def test_ranges_equal_their_expansion(count, data) -> None:
    lo = data.draw(st.integers(0, count - 1))
    hi = data.draw(st.integers(lo, count - 1))
    assert parse_indices(f"{lo}-{hi}", count, "--heads") == list(range(lo, hi + 1))
    assert parse_indices(f"{lo - count}-{hi}", count, "--heads") == list(range(lo, hi + 1))


@given(st.integers(1, 16), st.text(min_size=1, max_size=8))
def test_bad_specs_are_one_line_errors(count, junk) -> None:
    try:
        out = parse_indices(junk, count, "--layers")
    except VlmCreditError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("--layers ")
    else:  # whatever parses is a sorted list of valid indices (or None = all)
        assert out is None or (out == sorted(set(out)) and all(0 <= i < count for i in out))


_row = st.fixed_dictionaries(
    {
        "sample_id": st.text(min_size=1, max_size=12),
        "token_ids": st.lists(st.integers(0, 50_000), min_size=1, max_size=30),
    }
).flatmap(
    lambda r: st.fixed_dictionaries(
        {
            "sample_id": st.just(r["sample_id"]),
            "token_ids": st.just(r["token_ids"]),
            "weight": st.lists(
                st.floats(0, 10, allow_nan=False, width=32),
                min_size=len(r["token_ids"]),
                max_size=len(r["token_ids"]),
            ),
            "mask": st.lists(
                st.booleans(), min_size=len(r["token_ids"]), max_size=len(r["token_ids"])
            ),
        }
    )
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        _row, min_size=1, max_size=6, unique_by=lambda r: (r["sample_id"], tuple(r["token_ids"]))
    )
)
def test_signals_round_trip(rows) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        meta = SignalsMeta("toy", {"a": 1}, "ckpt", None, TOKENIZER)
        write_signals(Path(tmp), rows, meta)
        back = read_signals(Path(tmp), tokenizer_sha1=TOKENIZER)
    assert len(back.frame) == len(rows)
    for row, got in zip(rows, back.frame.itertuples(), strict=True):
        assert got.sample_id == row["sample_id"]
        assert got.response_id == response_id(row["token_ids"])
        np.testing.assert_array_equal(got.token_ids, row["token_ids"])
        np.testing.assert_array_equal(got.weight, np.asarray(row["weight"], dtype=np.float32))
        np.testing.assert_array_equal(got.mask, row["mask"])
        found = back.lookup(row["sample_id"], row["token_ids"])
        np.testing.assert_array_equal(found, np.asarray(row["weight"], dtype=np.float32))


def test_round_trip_refuses_misaligned_lists(tmp_path) -> None:
    meta = SignalsMeta("toy", {}, "ckpt", None, TOKENIZER)
    with pytest.raises(VlmCreditError, match="lists must align"):
        write_signals(tmp_path, [{"sample_id": "a", "token_ids": [1, 2], "weight": [1.0]}], meta)
    assert not (tmp_path / "signals.parquet").exists()
