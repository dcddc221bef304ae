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
    # log-prob variants already scored in the capture forward (variant -> per-sample scores)
    scored: dict[str, list[Any]] = field(default_factory=dict)


Filler = Callable[[PassContext, list[SamplePasses]], None]


def _fill_images(ctx: PassContext, passes: list[SamplePasses]) -> None:
    for sample, p in zip(ctx.samples, passes, strict=True):
        p.images = list(sample.images)


def _fill_text(ctx: PassContext, passes: list[SamplePasses]) -> None:
    """The response text and each token's character span, decoded from the token ids (so a
    text response and a token-id response map the same way; see models.response_text)."""
    from vlmcredit.models.response_text import response_text_spans

    for p in passes:
        p.response_text, p.token_spans = response_text_spans(ctx.ck.tokenizer, p.token_ids)


def _fill_logprobs(ctx: PassContext, passes: list[SamplePasses]) -> None:
    """Teacher-forced log p and entropy per response token, one forward per input variant for
    every method of the run; `ctx.options["logprobs"]` (methods.logprob_options.collect) says
    which (temperature, top_p) to score and how to perturb the image."""
    from vlmcredit.methods.logprob_options import DEFAULT_SCORE, score_key
    from vlmcredit.probes.logprobs import score_samples

    opts = ctx.options.get("logprobs") or {}
    scores = [tuple(s) for s in opts.get("scores") or [DEFAULT_SCORE]]
    variants = score_samples(
        ctx.ck,
        ctx.samples,
        ctx.needs.logprobs,
        scores,
        opts.get("perturb"),
        opts.get("entropy_variants"),
        ctx.scored,
    )
    for variant, rows in variants.items():
        for p, row in zip(passes, rows, strict=True):
            for (temperature, top_p), (logp, entropy) in row.items():
                key = score_key(variant, temperature, top_p)
                p.logprobs[key] = logp
                if entropy is not None:
                    p.entropy[key] = entropy


FILLERS: dict[str, Filler] = {
    "images": _fill_images,
    "text": _fill_text,
    "logprobs": _fill_logprobs,
}


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
    head_choice: list[tuple[int, int]] | None = None,
    share_forward: bool = True,
) -> tuple[list[Any], list[SamplePasses]]:
    """(capture items, per-sample passes) for one batch; `spec` is the capture's CaptureSpec.

    When the methods need both a capture forward and the real-image log-probabilities (SAYO;
    anchors or KAWHI beside ToR, VPPO or entropy), one forward serves both
    (`share_forward=False`: two forwards, the same numbers)."""
    from vlmcredit.probes.response_attention import (
        capture_and_score_samples,
        capture_samples,
        encoded_samples,
    )

    # with no forward needed (no attention, no Q/K), the token layout alone gives the ids
    forward = needs.attention or bool(needs.qk_layers)
    states: list[Any] = []
    scored: dict[str, list[Any]] = {}
    if share_forward and forward and "image" in needs.logprobs and not needs.qk_states:
        from vlmcredit.methods.logprob_options import DEFAULT_SCORE

        opts = (options or {}).get("logprobs") or {}
        scores = [tuple(x) for x in opts.get("scores") or [DEFAULT_SCORE]]
        wanted = opts.get("entropy_variants")
        entropy = wanted is None or "image" in wanted
        items, scored["image"] = capture_and_score_samples(ck, samples, spec, scores, entropy)
    elif needs.qk_states:
        # recomputed Q/K (KAWHI ablations): hooked into the capture forward when one runs
        from vlmcredit.probes.qk_states import sample_states

        items, states = sample_states(ck, samples, needs.qk_states, spec if forward else None)
    else:
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
            head_choice=head_choice,
            attention_layers=list(item.capture.layers) if needs.attention else None,
            num_layers=ck.geometry.num_layers,
        )
        for item in items
    ]
    for p, found in zip(passes, states, strict=False):  # empty unless needs.qk_states
        p.qk_states = {key: (a.numpy(), b.numpy()) for key, (a, b) in found.items()}
    ctx = PassContext(ck, samples, items, needs, dict(options or {}), scored)
    for name in needs.names():
        if name in ("attention", "qk", "qk_states"):
            continue
        if name not in FILLERS:
            raise VlmCreditError(f"the {name!r} pass is not available in `vlmcredit weights` yet")
        FILLERS[name](ctx, passes)
    return items, passes


def _numpy(tensor: Any) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()
