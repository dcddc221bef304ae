"""The unit every reader yields and every probe consumes: images + prompt + response."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One prompt + images + response.

    `prompt` is plain text (one user turn; images placed before the text, Qwen's usual order)
    or a chat message list in the processor's format (one {"type": "image"} part per image);
    None only when `prompt_ids` carry the prompt instead.
    `response` is text, or token ids when a trainer already holds them (used as given).

    `id` is unique within a run (it keys run rows and tensors). `sample_id` is the trainer's
    id, which the completions of one GRPO group share; signals rows are keyed by it. For a
    group member `id` is `f"{sample_id}#{completion_index}"`.
    """

    images: list[Any]  # PIL images, RGB
    prompt: str | list[dict[str, Any]] | None
    response: str | list[int] = ""
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. source row number, image refs
    sample_id: str | None = None  # the trainer's id; None = same as `id`
    completion_index: int | None = None  # index within the trainer's group, when known
    prompt_ids: list[int] | None = None  # the prompt token ids the trainer fed (images expanded)

    @property
    def trainer_id(self) -> str:
        """The id a trainer knows this sample by (what signals rows are keyed by)."""
        return self.id if self.sample_id is None else self.sample_id
