"""The trainer contract: signals.parquet + manifest round trip, and every refusal trainers need."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.run import Run
from vlmcredit.formats.signals import (
    SignalsMeta,
    read_signals,
    response_id,
    write_signals,
)

TOKENIZER = "0123456789abcdef0123456789abcdef01234567"


def meta(**over) -> SignalsMeta:
    base = {
        "method": "anchors",
        "parameters": {"ratio": 0.15, "seed": 0},
        "checkpoint_id": "tiny/qwen2.5-vl",
        "weights_sha1": "feedbeef",
        "tokenizer_sha1": TOKENIZER,
    }
    return SignalsMeta(**{**base, **over})


def rows() -> list[dict]:
    return [
        {
            "sample_id": "cat-1",
            "token_ids": [11, 12, 13, 14, 15, 16],
            "weight": [1.0, 0.0, 0.0, 1.0, 1.0, 0.0],
            "mask": [True, False, False, True, True, False],
            "cluster_id": [0, 2, 2, 0, 1, 3],
            "sample_weight": 0.5,
        },
        {
            "sample_id": "cat-1",  # a second response to the same prompt
            "token_ids": [11, 40, 41],
            "weight": [0.25, 1.0, 0.0],
            "mask": [True, True, False],
            "cluster_id": [1, 0, 2],
            "sample_weight": 1.0,
        },
        {
            "sample_id": "dog-7",
            "token_ids": [3, 4, 5, 6, 7],
            "weight": [0.0, 0.0, 1.0, 0.0, 1.0],
            "mask": [False, False, True, False, True],
            "cluster_id": [1, 1, 0, 1, 0],
            "sample_weight": 2.0,
        },
    ]


def test_response_id_is_sha1_of_decimal_ids() -> None:
    assert response_id([11, 12, 13]) == hashlib.sha1(b"11,12,13").hexdigest()
    assert response_id(np.array([7], dtype=np.int32)) == hashlib.sha1(b"7").hexdigest()


def test_round_trip_identical_arrays_and_exact_schema(tmp_path: Path) -> None:
    path = write_signals(tmp_path, rows(), meta())
    assert path == tmp_path / "signals.parquet"
    schema = pq.read_schema(path)
    assert schema.field("sample_id").type == pa.string()
    assert schema.field("response_id").type == pa.string()
    assert schema.field("token_ids").type == pa.list_(pa.int64())
    assert schema.field("weight").type == pa.list_(pa.float32())
    assert schema.field("mask").type == pa.list_(pa.bool_())
    assert schema.field("cluster_id").type == pa.list_(pa.int32())
    assert schema.field("sample_weight").type == pa.float32()

    sig = read_signals(tmp_path, tokenizer_sha1=TOKENIZER, vocab_size=100)
    assert len(sig.frame) == 3
    for row, want in zip(sig.frame.itertuples(index=False), rows(), strict=True):
        assert row.sample_id == want["sample_id"]
        assert row.response_id == response_id(want["token_ids"])
        np.testing.assert_array_equal(row.token_ids, np.array(want["token_ids"], np.int64))
        np.testing.assert_array_equal(row.weight, np.array(want["weight"], np.float32))
        np.testing.assert_array_equal(row.mask, np.array(want["mask"]))
        np.testing.assert_array_equal(row.cluster_id, np.array(want["cluster_id"], np.int32))
        assert row.sample_weight == np.float32(want["sample_weight"])

    m = json.loads((tmp_path / "manifest.json").read_text())["signals"]
    assert m["format"] == "vlmcredit-signals" and m["format_version"] == 1
    assert m["method"] == "anchors" and m["parameters"] == {"ratio": 0.15, "seed": 0}
    assert m["checkpoint"] == {"id": "tiny/qwen2.5-vl", "weights_sha1": "feedbeef"}
    assert m["tokenizer_sha1"] == TOKENIZER
    assert (m["loss_denominator"], m["selection_scope"]) == ("all_tokens", "per_response")
    assert m["num_rows"] == 3 and m["created"] and m["tool_version"]
    assert m["columns"] == [
        "sample_id",
        "response_id",
        "token_ids",
        "weight",
        "mask",
        "cluster_id",
        "sample_weight",
    ]


def test_lookup_multiplies_sample_weight_and_misses_are_none(tmp_path: Path) -> None:
    write_signals(tmp_path, rows(), meta())
    sig = read_signals(tmp_path)
    np.testing.assert_array_equal(
        sig.lookup("cat-1", [11, 12, 13, 14, 15, 16]),
        np.array([0.5, 0, 0, 0.5, 0.5, 0], np.float32),
    )
    np.testing.assert_array_equal(sig.lookup("cat-1", [11, 40, 41]), [0.25, 1.0, 0.0])
    np.testing.assert_array_equal(sig.selection("dog-7", [3, 4, 5, 6, 7]), [0, 0, 1, 0, 1])
    assert sig.lookup("cat-1", [11, 12, 13]) is None  # a different (fresh) response
    assert sig.lookup("bird-2", [11, 40, 41]) is None  # an unknown sample
    assert sig.lookup("dog-7", [3, 4, 5, 6, 7, 8]) is None  # a longer response: a miss


def test_batch_weights_right_padded_with_misses(tmp_path: Path) -> None:
    write_signals(tmp_path, rows(), meta())
    sig = read_signals(tmp_path)
    pad = 0
    ids = torch.tensor(
        [
            [3, 4, 5, 6, 7, pad],  # dog-7 (5 tokens + padding)
            [11, 40, 41, pad, pad, pad],  # cat-1 second response
            [90, 91, 92, 93, pad, pad],  # cat-1, fresh rollout: miss (4 tokens)
            [11, 12, 13, 14, 15, 16],  # cat-1 first response
        ]
    )
    mask = (torch.arange(6)[None, :] < torch.tensor([5, 3, 4, 6])[:, None]).long()
    got = sig.batch_weights(["dog-7", "cat-1", "cat-1", "cat-1"], ids, mask)
    want = torch.tensor(
        [
            [0, 0, 2, 0, 2, 1],
            [0.25, 1, 0, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [0.5, 0, 0, 0.5, 0.5, 0],
        ]
    )
    assert torch.equal(got.weights, want)
    assert (got.rows_found, got.rows_missed, got.tokens_missed) == (3, 1, 4)
    assert got.selected[0].tolist() == [False, False, True, False, True, False]
    assert got.selected[2].tolist() == [True, True, True, True, False, False]  # miss: all valid


def test_selection_without_mask_column_is_nonzero_weight(tmp_path: Path) -> None:
    plain = [
        {k: v for k, v in r.items() if k in ("sample_id", "token_ids", "weight")} for r in rows()
    ]
    write_signals(tmp_path, plain, meta(loss_denominator="selected_tokens"))
    sig = read_signals(tmp_path)
    assert sig.loss_denominator == "selected_tokens"
    np.testing.assert_array_equal(sig.selection("cat-1", [11, 40, 41]), [True, True, False])
    np.testing.assert_array_equal(sig.lookup("cat-1", [11, 40, 41]), [0.25, 1.0, 0.0])


def test_merges_into_run_manifest_in_place(tmp_path: Path) -> None:
    run = Run.open(tmp_path / "run", "anchors", {"ratio": 0.15}, resume=False)
    write_signals(run.path, rows(), meta(), manifest=run.manifest)
    run.finish(num_anchors=5)  # the run writes its manifest again later: signals must survive
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["command"] == "anchors" and manifest["num_anchors"] == 5
    assert manifest["signals"]["num_rows"] == 3
    # Without a dict, the manifest already in the folder is merged into.
    write_signals(run.path, rows()[:1], meta(method="anchors-v2"))
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["command"] == "anchors" and manifest["signals"]["method"] == "anchors-v2"
    assert manifest["signals"]["num_rows"] == 1


def test_tampered_tokenizer_hash_is_refused(tmp_path: Path) -> None:
    write_signals(tmp_path, rows(), meta())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["signals"]["tokenizer_sha1"] = "f" * 40
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VlmCreditError, match=r"written for tokenizer ffffffffffff.*trainer's"):
        read_signals(tmp_path, tokenizer_sha1=TOKENIZER)


def _rewrite_table(path: Path, column: str, values: list) -> None:
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    field = table.schema.field(index)
    table = table.set_column(index, field, pa.array(values, type=field.type))
    pq.write_table(table, path)


def test_shifted_token_ids_in_file_are_refused(tmp_path: Path) -> None:
    path = write_signals(tmp_path, rows(), meta())
    shifted = [[t + 1 for t in r["token_ids"]] for r in rows()]  # e.g. an off-by-one tokenizer
    _rewrite_table(path, "token_ids", shifted)
    with pytest.raises(VlmCreditError, match=r"row 0 .*response_id is not the sha1"):
        read_signals(tmp_path)


def test_file_shifted_against_trainer_tokens_is_refused(tmp_path: Path) -> None:
    write_signals(tmp_path, rows(), meta())
    sig = read_signals(tmp_path)
    # The producer dropped the first generated token (or the trainer's response starts one
    # token earlier): same tokens, shifted by one position.
    with pytest.raises(VlmCreditError, match=r"cat-1.*shifted by 1.*index 0 must be the first"):
        sig.lookup("cat-1", [10, 11, 12, 13, 14, 15, 16])
    with pytest.raises(VlmCreditError, match="shifted by 1"):
        sig.lookup("cat-1", [12, 13, 14, 15, 16])


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("weight", [[1.0, 0.0], [0.25, 1.0, 0.0], [0, 0, 1, 0, 1]], "weight has 2 entries for 6"),
        ("weight", [[1, 0, 0, 1, 1, -1], [0.25, 1, 0], [0, 0, 1, 0, 1]], "finite and >= 0"),
        ("weight", [[1, 0, 0, 1, 1, float("nan")], [0.25, 1, 0], [0, 0, 1, 0, 1]], "finite"),
        ("mask", [[True], [True, True, False], [False] * 5], "mask has 1 entries"),
        ("sample_id", ["cat-1", "cat-1", "cat-1"], None),  # still unique responses: fine
    ],
)
def test_malformed_tables_are_refused(tmp_path: Path, column, values, message) -> None:
    path = write_signals(tmp_path, rows(), meta())
    _rewrite_table(path, column, values)
    if message is None:
        assert len(read_signals(tmp_path).frame) == 3
        return
    with pytest.raises(VlmCreditError, match=message):
        read_signals(tmp_path)


def test_duplicates_and_bad_manifests_are_refused(tmp_path: Path) -> None:
    conflicting = {**rows()[0], "weight": [0.5] * len(rows()[0]["token_ids"])}
    with pytest.raises(VlmCreditError, match="same response twice"):
        write_signals(tmp_path / "dup", [rows()[0], conflicting], meta())
    with pytest.raises(VlmCreditError, match="loss_denominator 'tokens'"):
        write_signals(tmp_path / "x", rows(), meta(loss_denominator="tokens"))
    with pytest.raises(VlmCreditError, match="unknown columns anchor_mask"):
        write_signals(tmp_path / "y", [{**rows()[0], "anchor_mask": [1] * 6}], meta())

    folder = tmp_path / "ok"
    write_signals(folder, rows(), meta())
    with pytest.raises(VlmCreditError, match="outside the trainer's vocabulary"):
        read_signals(folder, vocab_size=16)
    manifest_file = folder / "manifest.json"
    good = manifest_file.read_text()
    for edit, message in [
        (lambda m: m["signals"].update(num_rows=4), "manifest says 4"),
        (lambda m: m["signals"].update(format_version=2), "format_version 2"),
        (lambda m: m["signals"].update(selection_scope="global"), "selection_scope 'global'"),
        (lambda m: m.pop("signals"), "no 'signals' object"),
    ]:
        manifest = json.loads(good)
        edit(manifest)
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(VlmCreditError, match=message):
            read_signals(folder)
    manifest_file.unlink()
    with pytest.raises(VlmCreditError, match=r"no manifest\.json beside it"):
        read_signals(folder / "signals.parquet")
    assert not (tmp_path / "dup").exists()  # the refused write left nothing behind
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmCreditError, match=r"no signals\.parquet here"):
        read_signals(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "signals.parquet").write_bytes(b"not parquet")
    (tmp_path / "junk" / "manifest.json").write_text(good)
    with pytest.raises(VlmCreditError, match="not a readable parquet file"):
        read_signals(tmp_path / "junk")


def test_tokenizer_hash_same_for_processor_and_tokenizer(tiny_ckpt) -> None:
    from vlmcredit.formats.provenance import tokenizer_hash
    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor

    processor = load_processor(tiny_ckpt("qwen2.5-vl"), adapter_for("qwen2_5_vl", "test"))
    tok = processor.tokenizer
    assert tokenizer_hash(processor) == tokenizer_hash(tok)
    # Independent reference: the documented payload (vocabulary incl. added tokens + template).
    payload = {"vocab": sorted(tok.get_vocab().items()), "template": tok.chat_template}
    assert (
        tokenizer_hash(tok)
        == hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    )
    original = tok.chat_template
    try:
        tok.chat_template = original + " "
        processor.chat_template = original + " "
        assert (
            tokenizer_hash(tok)
            != hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        )
        assert tokenizer_hash(processor) == tokenizer_hash(tok)
    finally:
        tok.chat_template = original
        processor.chat_template = original


def test_identical_completions_of_a_group_share_one_row(tmp_path) -> None:
    """GRPO samples the same short answer twice: one row serves both; conflicting rows for the
    same response are still refused."""
    meta = SignalsMeta("anchors", {}, "ckpt", None, TOKENIZER)
    same = {"sample_id": "p0", "token_ids": [5, 6, 7], "weight": [1.0, 0.0, 1.0]}
    other = {"sample_id": "p0", "token_ids": [5, 6], "weight": [1.0, 1.0]}
    write_signals(tmp_path / "ok", [same, dict(same), other], meta)
    back = read_signals(tmp_path / "ok", tokenizer_sha1=TOKENIZER)
    assert len(back.frame) == 2
    np.testing.assert_array_equal(back.lookup("p0", [5, 6, 7]), [1.0, 0.0, 1.0])
    conflict = {**same, "weight": [0.0, 0.0, 1.0]}
    with pytest.raises(VlmCreditError, match="same response twice"):
        write_signals(tmp_path / "bad", [same, conflict], meta)
    assert not (tmp_path / "bad" / "signals.parquet").exists()
