"""What identifies the inputs of a run: data file, checkpoint weights, tokenizer.

Kept apart from model loading so that trainer adapters and file readers can check provenance
without importing model code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_sha1(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_hash(folder: Path) -> str:
    """A stable id for the checkpoint's weights: sha1 over the safetensors headers and sizes.

    Hashing 15 GB of weights on every run is too slow; the safetensors header lists every tensor
    with dtype, shape and byte offsets, and with file sizes it changes whenever weights are
    re-saved. Enough to tell checkpoints apart in manifests.
    """
    h = hashlib.sha1()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 100 << 20)))
        h.update(str(path.stat().st_size).encode())
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
