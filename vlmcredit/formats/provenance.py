"""What identifies the inputs of a run: data file, checkpoint weights, tokenizer.

Kept apart from model loading so that trainer adapters and file readers can check provenance
without importing model code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_json

log = logging.getLogger(__name__)

CHUNK = 8 << 20  # bytes per read while hashing
CACHE_FILE = "weights-sha1.json"
CACHE_VERSION = 1  # bump when what a file digest covers changes
CACHE_MAX_ENTRIES = 4096
# What hashing did in this process (tests and `info` read it): bytes of tensor data read, and
# files answered from the cache.
HASH_STATS = {"bytes_read": 0, "cache_hits": 0, "files_hashed": 0}


def file_sha1(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where vlmcredit caches per-machine results: $VLMCREDIT_CACHE_DIR, else
    $XDG_CACHE_HOME/vlmcredit, else ~/.cache/vlmcredit."""
    if os.environ.get("VLMCREDIT_CACHE_DIR"):
        return Path(os.environ["VLMCREDIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmcredit"


def safetensors_digest(path: Path) -> str:
    """sha1 of one safetensors file's tensors: the tensor table (names, dtypes, shapes, offsets;
    the free-form `__metadata__` left out) and then every byte of tensor data, streamed."""
    where = f"{path}: not a safetensors file"
    with open(path, "rb") as f:
        raw_len = f.read(8)
        size = os.fstat(f.fileno()).st_size
        header_len = int.from_bytes(raw_len, "little") if len(raw_len) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise VlmCreditError(f"{where} (bad header length); re-save or re-download it")
        try:
            table = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise VlmCreditError(
                f"{where} (header is not JSON); re-save or re-download it"
            ) from None
        if not isinstance(table, dict):
            raise VlmCreditError(f"{where} (header is not an object); re-save or re-download it")
        table.pop("__metadata__", None)
        h = hashlib.sha1(json.dumps(table, sort_keys=True).encode())
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            HASH_STATS["bytes_read"] += n
    HASH_STATS["files_hashed"] += 1
    return h.hexdigest()


def _stat_key(path: Path) -> dict[str, int]:
    # size + mtime as asked, plus inode and ctime: a copy that preserves mtime (cp -p, rsync -t)
    # or a file renamed into place still changes one of them, and none of them can be set back.
    st = path.stat()
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }


def _read_cache(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
            return data["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    log.warning("vlmcredit: ignoring unreadable weights-hash cache %s (rehashing)", file)
    return {}


def _write_cache(file: Path, entries: dict[str, Any]) -> None:
    # Drop files that are gone or changed, keep the newest entries: the cache stays small.
    live = {}
    for name, entry in entries.items():
        try:
            if _stat_key(Path(name)) == entry.get("stat"):
                live[name] = entry
        except OSError:
            continue
    newest = sorted(live.items(), key=lambda kv: kv[1]["stat"]["mtime_ns"])[-CACHE_MAX_ENTRIES:]
    try:
        atomic_write_json(file, {"version": CACHE_VERSION, "files": dict(newest)})
    except OSError as exc:
        log.warning("vlmcredit: cannot write the weights-hash cache %s (%s)", file, exc)


def weights_hash(folder: Path, use_cache: bool = True) -> str:
    """sha1 identifying the checkpoint's weights: over every *.safetensors file in name order,
    its name and `safetensors_digest` (tensor table + tensor bytes).

    Two checkpoints with the same shapes but different weights get different hashes. Reading a
    72B checkpoint takes minutes, so each file's digest is cached under `cache_dir()` keyed by
    its absolute path, size, mtime, ctime and inode: a checkpoint is read once per machine.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise VlmCreditError(f"{folder}: no *.safetensors files, so no weights to identify")
    cache_file = cache_dir() / CACHE_FILE
    cache = _read_cache(cache_file) if use_cache else {}
    changed = False
    h = hashlib.sha1()
    for path in files:
        name = str(path.resolve())
        key = _stat_key(path)
        entry = cache.get(name)
        if isinstance(entry, dict) and entry.get("stat") == key and entry.get("sha1"):
            digest = str(entry["sha1"])
            HASH_STATS["cache_hits"] += 1
        else:
            digest = safetensors_digest(path)
            cache[name] = {"stat": key, "sha1": digest}
            changed = True
        h.update(f"{path.name}\0{digest}\n".encode())
    if use_cache and changed:
        _write_cache(cache_file, cache)
    return h.hexdigest()


def tokenizer_hash(tokenizer_or_processor: Any) -> str:
    """sha1 of the tokenizer's vocabulary, added tokens and chat template.

    Accepts a processor (vlmcredit, TRL with a VLM) or a bare tokenizer (trainers of text models
    hold only that): both give the same hash for the same vocabulary and template, so a signals
    file written from a processor is accepted by a trainer that holds its tokenizer.
    """
    holder = tokenizer_or_processor
    # A processor wraps its tokenizer; a tokenizer has no `tokenizer` attribute (and some raise
    # AttributeError from __getattr__, which getattr's default absorbs).
    tok = getattr(holder, "tokenizer", None) or holder
    payload = {
        "vocab": sorted(tok.get_vocab().items()),
        "template": getattr(holder, "chat_template", None) or getattr(tok, "chat_template", None),
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()
