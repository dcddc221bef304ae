"""Capture response -> image attention inside a forward somebody else runs (a trainer's own).

A GRPO trainer already runs a no-grad forward of the policy over prompt + completion to score
the old log-probabilities (TRL with `num_iterations > 1`, VERL's `compute_log_prob`). Arming a
`ForwardCapture` around that call captures the attention in the same forward, instead of
running one more: the model gets a forward pre-hook that reads the batch the trainer passes
(`input_ids`, `attention_mask`), opens a capture session for its response rows and closes it in
the forward hook. A trainer that scores the batch in chunks runs several forwards; their rows
are kept in order.

The response block is the last `response_width` columns (the trainer's completion block, right
padded); image positions come from `input_ids` (`response_attention.trainer_row_spans`). The
hooks and the attention implementation are removed / restored when the block exits, also on an
exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import ModelGeometry
from vlmcredit.models.layout import prompt_mm_token_type_ids
from vlmcredit.probes.capture import CaptureSpec, RowTarget, capture_session
from vlmcredit.probes.response_attention import trainer_row_spans


class ForwardCapture:
    """Rows captured by the forwards run while armed: per batch row, the (L, 1, T_b, N_b) head
    mean attention, or None for a row without image tokens (`rows`, in batch order)."""

    def __init__(
        self,
        model: Any,
        response_width: int,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.width = int(response_width)
        self.spec = CaptureSpec(layers=layers, heads=heads, reduce="mean")
        self.geo = ModelGeometry.from_config(model.config)
        self.rows: list[torch.Tensor | None] = []
        self.forwards = 0
        self._open: tuple[ExitStack, Any, list[bool]] | None = None

    def _before(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if input_ids is None or mask is None:
            raise VlmCreditError(
                "piggyback capture: the trainer's forward passed no input_ids/attention_mask "
                "keywords; use the extra-forward path (piggyback=False)"
            )
        if input_ids.shape[1] < self.width:
            raise VlmCreditError(
                f"piggyback capture: the forward has {input_ids.shape[1]} columns, fewer than "
                f"the completion block ({self.width})"
            )
        spans = trainer_row_spans(input_ids, mask[:, -self.width :], self.geo)
        targets = [RowTarget(*span) for span in spans]
        has_image = [t.key_positions.numel() > 0 for t in targets]
        if any(has_image) and kwargs.get("position_ids") is None:
            self._check_type_ids(input_ids, kwargs.get("mm_token_type_ids"))
        stack = ExitStack()
        session = stack.enter_context(capture_session(self.model, self.spec, targets))
        self._open = (stack, session, has_image)

    def _check_type_ids(self, input_ids: torch.Tensor, given: torch.Tensor | None) -> None:
        """The model places M-RoPE image positions by `mm_token_type_ids`: attention captured in
        a forward whose type ids disagree with its ids (missing, or shifted by a processor that
        pads on the other side) is not the attention of this batch. Refused, never captured."""
        start = input_ids.shape[1] - self.width
        expected = prompt_mm_token_type_ids(input_ids, self.geo, start)
        if given is None or given.shape != expected.shape:
            problem = "gets no mm_token_type_ids" if given is None else "gets mis-sized type ids"
        elif not torch.equal(given.to(expected.device, expected.dtype), expected):
            rows = (given.to(expected.device, expected.dtype) != expected).any(dim=1)
            problem = (
                f"gets mm_token_type_ids that disagree with its ids on {int(rows.sum())} row(s)"
            )
        else:
            return
        raise VlmCreditError(
            f"piggyback capture: the trainer's forward {problem}, so its image positions are "
            "off; pass type ids built from input_ids (VlmCreditGRPOTrainer does) or use the "
            "extra-forward path (piggyback=False)"
        )

    def _after(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._open is None:
            return
        stack, session, has_image = self._open
        self._open = None
        try:
            self.rows += [
                session.result(b).attention if image else None for b, image in enumerate(has_image)
            ]
            self.forwards += 1
        finally:
            stack.close()


@contextmanager
def forward_capture(
    model: Any,
    response_width: int,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Iterator[ForwardCapture]:
    """Capture in every forward of `model` run inside the block (see the module docstring)."""
    capture = ForwardCapture(model, response_width, layers, heads)
    pre = model.register_forward_pre_hook(capture._before, with_kwargs=True)
    post = model.register_forward_hook(capture._after, with_kwargs=True)
    try:
        yield capture
    finally:
        pre.remove()
        post.remove()
        if capture._open is not None:  # the forward raised between the two hooks
            capture._open[0].close()
            capture._open = None
