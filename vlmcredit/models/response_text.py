"""The text of a response and each token's character span in it, from its token ids.

Qwen tokenizers are byte-level BPE: every token is a run of bytes, and a character may be
split over several tokens. The text is the UTF-8 decoding of the concatenated bytes (what
`tokenizer.decode` returns); spans come from feeding the tokens' bytes to an incremental UTF-8
decoder one token at a time, so the whole response is decoded once (linear in T, no prefix
re-decoding). A token starts at the character its first byte belongs to: the second half of a
split character starts at that character. Added/special tokens count as their literal text.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte table, the alphabet of byte-level BPE tokens."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """Each token's bytes (byte-level BPE tokenizers only)."""
    if not _is_byte_level(tokenizer):
        raise VlmCreditError(
            f"tokenizer {type(tokenizer).__name__}: response text spans need a byte-level BPE "
            "tokenizer (every Qwen-VL tokenizer is one)"
        )
    added = {int(k): v.content for k, v in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    table = _byte_decoder()
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    out = []
    for token_id, piece in zip(ids, pieces, strict=True):
        if int(token_id) in added:
            out.append(added[int(token_id)].encode("utf-8"))
        elif piece is None:
            raise VlmCreditError(f"token id {int(token_id)} is not in the tokenizer's vocabulary")
        else:
            try:
                out.append(bytes(table[ch] for ch in piece))
            except KeyError:
                raise VlmCreditError(
                    f"token {piece!r} (id {int(token_id)}) is not a byte-level BPE token"
                ) from None
    return out


def response_text_spans(tokenizer: Any, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """(response text, (T, 2) int64 character [start, end) per token).

    A token whose bytes only begin a character (the rest comes with the next token) gets the
    span of that character; invalid trailing bytes (a response cut mid-character) decode to
    U+FFFD, as `tokenizer.decode` does.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    length = 0
    spans = np.zeros((len(ids), 2), dtype=np.int64)
    pieces = token_bytes(tokenizer, ids)
    for t, piece in enumerate(pieces):
        start = length
        text = decoder.decode(piece, final=t == len(pieces) - 1)
        parts.append(text)
        length += len(text)
        pending = len(decoder.getstate()[0]) > 0  # bytes of a character still incomplete
        spans[t] = (start, length + (1 if pending else 0))
    text = "".join(parts)
    np.minimum(spans, len(text), out=spans)
    return text, spans
