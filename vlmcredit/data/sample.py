"""The unit every reader yields and every probe consumes: images + prompt + response."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One prompt + images + response.

    `prompt` is plain text (one user turn; images placed before the text, Qwen's usual order)
    or a chat message list in the processor's format (one {"type": "image"} part per image).
    `response` is text, or token ids when a trainer already holds them.
    """

    images: list[Any]  # PIL images, RGB
    prompt: str | list[dict[str, Any]]
    response: str | list[int] = ""
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. source row number, image refs
