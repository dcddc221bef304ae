"""Run the model passes a set of methods needs on one batch of rollout samples.

One capture forward serves attention and Q/K; the other passes (log-probabilities, images,
response text) are filled by the functions in `FILLERS`, each run once per batch for every
method that asked for it. A new kind of pass is one probe function plus one filler here; the
trainer-batch counterpart lives in `vlmcredit.online.batch_passes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods.registry import Needs, SamplePasses


@dataclass
class PassContext:
    """What every filler may read: the checkpoint, the batch, the capture items, options."""

    ck: Any  # vlmcredit.models.loading.LoadedCheckpoint
    samples: Sequence[Sample]
    items: Sequence[Any]  # vlmcredit.probes.response_attention.CapturedSample, one per sample
    needs: Needs
    options: dict[str, Any] = field(default_factory=dict)  # pass options (e.g. perturbation)


Filler = Callable[[PassContext, list[SamplePasses]], None]


def _fill_images(ctx: PassContext, passes: list[SamplePasses]) -> None:
    for sample, p in zip(ctx.samples, passes, strict=True):
        p.images = list(sample.images)


FILLERS: dict[str, Filler] = {"images": _fill_images}


def _boxes(layout: Any) -> np.ndarray:
    images = layout.images
    return np.concatenate([im.boxes for im in images]) if images else np.zeros((0, 4))


def _cells(layout: Any) -> np.ndarray:
    images = layout.images
    return np.concatenate([im.cells for im in images]) if images else np.zeros((0, 3), np.int64)


def run_passes(
    ck: Any,
    samples: Sequence[Sample],
    needs: Needs,
    spec: Any,
    pairs: list[tuple[int, int]] | None,
    options: dict[str, Any] | None = None,
) -> tuple[list[Any], list[SamplePasses]]:
    """(capture items, per-sample passes) for one batch; `spec` is the capture's CaptureSpec."""
    from vlmcredit.probes.response_attention import capture_samples, encoded_samples

    # with no forward needed (no attention, no Q/K), the token layout alone gives the ids
    forward = needs.attention or bool(needs.qk_layers)
    items = capture_samples(ck, samples, spec) if forward else encoded_samples(ck, samples)
    passes = [
        SamplePasses(
            sample_id=item.sample.id,
            token_ids=np.asarray(item.response_ids, dtype=np.int64),
            attention=_numpy(item.capture.attention),
            pairs=pairs,
            queries={k: v.numpy() for k, v in item.capture.queries.items()},
            keys={k: v.numpy() for k, v in item.capture.keys.items()},
            image_boxes=_boxes(item.layout),
            image_cells=_cells(item.layout),
            image_owner=np.asarray(item.layout.image_token_owner),
            cell_pixels=ck.geometry.cell_pixels,
            meta=dict(item.sample.meta),
        )
        for item in items
    ]
    ctx = PassContext(ck, samples, items, needs, dict(options or {}))
    for name in needs.names():
        if name in ("attention", "qk"):
            continue
        if name not in FILLERS:
            raise VlmCreditError(f"the {name!r} pass is not available in `vlmcredit weights` yet")
        FILLERS[name](ctx, passes)
    return items, passes


def _numpy(tensor: Any) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()
