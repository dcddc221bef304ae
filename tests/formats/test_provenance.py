"""weights_sha1 identifies the weights, not only their shapes; the per-file cache reads a
checkpoint once; the signals reader refuses signals from other weights when asked to check."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import pytest

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats import provenance
from vlmcredit.formats.provenance import (
    CACHE_FILE,
    HASH_STATS,
    cache_dir,
    safetensors_digest,
    weights_hash,
)
from vlmcredit.formats.signals import SignalsMeta, read_signals, write_signals

GIB = 1 << 30


def header_table(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def reference_digest(path: Path) -> str:
    """The documented digest, computed independently: the tensor table without __metadata__
    (sorted-key JSON), then every byte after the header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8 : 8 + n])
    table.pop("__metadata__", None)
    h = hashlib.sha1(json.dumps(table, sort_keys=True).encode())
    h.update(data[8 + n :])
    return h.hexdigest()


def write_safetensors(path: Path, payload: bytes, metadata: dict | None = None) -> None:
    table: dict = {"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    if metadata is not None:
        table["__metadata__"] = metadata
    header = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)


def rchar() -> int:
    """Bytes this process has read through read() so far (Linux /proc accounting)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_same_shapes_different_weights_get_different_hashes(tiny_ckpt, tmp_path) -> None:
    """The demo's pair: the random tiny model and its answerer, whose lm_head rows were refitted
    (same tensors, dtypes, shapes and file sizes; different bytes)."""
    from vlmcredit.data.mme_synth import write_synthetic_mme
    from vlmcredit.probes.tiny_answerer import yes_no_checkpoint

    random_model = tiny_ckpt("qwen2.5-vl")
    write_synthetic_mme(tmp_path / "mme", 1, seed=0, categories=["existence", "color"])
    answerer = yes_no_checkpoint(random_model, tmp_path / "answerer", tmp_path / "mme")
    (a,) = sorted(random_model.glob("*.safetensors"))
    (b,) = sorted(Path(answerer).glob("*.safetensors"))
    shapes = {
        k: (v["dtype"], v["shape"]) for k, v in header_table(a).items() if k != "__metadata__"
    }
    assert shapes == {
        k: (v["dtype"], v["shape"]) for k, v in header_table(b).items() if k != "__metadata__"
    }
    assert a.stat().st_size == b.stat().st_size
    assert weights_hash(random_model) != weights_hash(answerer)
    # each file's digest is the documented one, and the folder hash combines name + digest
    for path in (a, b):
        assert safetensors_digest(path) == reference_digest(path)
    folder = hashlib.sha1(f"{a.name}\0{reference_digest(a)}\n".encode()).hexdigest()
    assert weights_hash(random_model) == folder


def test_metadata_does_not_change_the_hash_but_one_byte_does(tmp_path) -> None:
    for name, meta, payload in [
        ("a", None, b"\x01\x02\x03"),
        ("b", {"format": "pt"}, b"\x01\x02\x03"),
        ("c", None, b"\x01\x02\x04"),
    ]:
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "model.safetensors", payload, meta)
    hashes = {n: weights_hash(tmp_path / n, use_cache=False) for n in "abc"}
    assert hashes["a"] == hashes["b"] != hashes["c"]


def test_hashing_a_1gb_file_twice_reads_it_once(tmp_path) -> None:
    if not Path("/proc/self/io").is_file():
        pytest.skip("needs Linux /proc/self/io to count reads")
    folder = tmp_path / "big"
    folder.mkdir()
    file = folder / "model.safetensors"
    write_safetensors(file, b"\x07")  # header of a 1-byte tensor, then grow it sparsely
    table = {"w": {"dtype": "U8", "shape": [GIB], "data_offsets": [0, GIB]}}
    header = json.dumps(table).encode()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + GIB)
    hits, read = HASH_STATS["cache_hits"], HASH_STATS["bytes_read"]
    before = rchar()
    first = weights_hash(folder)
    first_read = rchar() - before
    before = rchar()
    second = weights_hash(folder)
    second_read = rchar() - before
    assert first == second
    assert first_read >= GIB  # the tensor bytes really were read the first time
    assert second_read < (1 << 20)  # the second time only the small cache file
    assert HASH_STATS["bytes_read"] - read == GIB
    assert HASH_STATS["cache_hits"] - hits == 1
    entry = json.loads((cache_dir() / CACHE_FILE).read_text())["files"][str(file.resolve())]
    assert entry["stat"]["size"] == 8 + len(header) + GIB


def test_a_changed_file_is_read_again(tmp_path) -> None:
    file = tmp_path / "model.safetensors"
    write_safetensors(file, b"\x01" * 100)
    first = weights_hash(tmp_path)
    read = HASH_STATS["bytes_read"]
    with open(file, "r+b") as f:  # same size; mtime moved on explicitly (coarse clocks)
        f.seek(-1, os.SEEK_END)
        f.write(b"\x02")
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights_hash(tmp_path) != first
    assert HASH_STATS["bytes_read"] - read == 100


def test_a_copy_with_the_same_mtime_is_not_taken_from_the_cache(tmp_path) -> None:
    """cp -p keeps size and mtime; the cache key also holds inode and ctime."""
    for name, payload in (("a", b"\x01\x02"), ("b", b"\x09\x09")):
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "model.safetensors", payload)
    first = weights_hash(tmp_path / "a")
    st = (tmp_path / "a" / "model.safetensors").stat()
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    os.utime(tmp_path / "a" / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_hash(tmp_path / "a") != first


def test_unreadable_cache_is_rebuilt_with_a_warning(tmp_path, caplog) -> None:
    (tmp_path / "ck").mkdir()
    write_safetensors(tmp_path / "ck" / "model.safetensors", b"\x05" * 10)
    want = weights_hash(tmp_path / "ck", use_cache=False)
    (cache_dir() / CACHE_FILE).parent.mkdir(parents=True, exist_ok=True)
    (cache_dir() / CACHE_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger=provenance.__name__):
        assert weights_hash(tmp_path / "ck") == want
    assert "ignoring unreadable weights-hash cache" in caplog.text
    assert json.loads((cache_dir() / CACHE_FILE).read_text())["version"] == 1


def test_bad_checkpoint_files_are_refused(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmCreditError, match=r"no \*\.safetensors files"):
        weights_hash(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(VlmCreditError, match=r"not a safetensors file \(bad header length\)"):
        weights_hash(tmp_path / "junk")


def test_signals_reader_refuses_other_weights_when_asked(tmp_path) -> None:
    def meta(weights: str | None) -> SignalsMeta:
        return SignalsMeta("anchors", {}, "tiny", weights, tokenizer_sha1="e" * 40)

    rows = [{"sample_id": "s", "token_ids": [1, 2, 3], "weight": [1.0, 0.0, 1.0]}]
    write_signals(tmp_path / "a", rows, meta("a" * 40))
    write_signals(tmp_path / "none", rows, meta(None))
    assert len(read_signals(tmp_path / "a", weights_sha1="a" * 40).frame) == 1
    with pytest.raises(VlmCreditError, match="computed with checkpoint aaaaaaaaaaaa, but the"):
        read_signals(tmp_path / "a", weights_sha1="b" * 40)
    with pytest.raises(VlmCreditError, match="a checkpoint without hash"):
        read_signals(tmp_path / "none", weights_sha1="b" * 40)
    # trainers whose weights moved on since the signals were computed opt out by not passing it
    assert len(read_signals(tmp_path / "a").frame) == 1
