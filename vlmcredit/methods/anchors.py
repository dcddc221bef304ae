"""AT-RL anchors: the ~15% of response tokens whose attention carries the image.

Connectivity (attention mass on image tokens, averaged over the chosen layers and heads) ->
token-image graph -> Leiden clusters -> whole clusters from the most connected down, topped up
with the best-connected tokens of the next one, to the target ratio of each response (or of the
batch with ratio_scope="batch"; vlmcredit.analysis.anchors). Anchors get weight 1, other tokens
`other_weight` (default 0: train on anchors only). `vlmcredit anchors` is this method's own
face, with its richer tables; `vlmcredit weights --method anchors` writes the same signals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmcredit.analysis.anchors import AnchorConfig, AnchorResult, label_anchors, select_batch
from vlmcredit.analysis.connectivity import aggregate_attention
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods.registry import Method, MethodOutput, Needs, SamplePasses, register


def aggregated_attention(sample: SamplePasses) -> np.ndarray:
    """The (T, N) attention the graph is built from, averaged over the chosen heads."""
    if sample.attention is None:
        raise VlmCreditError(f"sample {sample.sample_id}: the attention pass did not run")
    att = aggregate_attention(sample.attention, sample.pairs)
    if att.shape[1] == 0:
        raise VlmCreditError(
            f"sample {sample.sample_id}: has no image tokens, so there is no connectivity to "
            "measure (drop text-only rows or pass --skip-bad)"
        )
    return att


def label(sample: SamplePasses, cfg: AnchorConfig) -> AnchorResult:
    return label_anchors(aggregated_attention(sample), cfg)


def output(result: AnchorResult) -> MethodOutput:
    return MethodOutput(
        weight=result.weight.astype(np.float32),
        mask=result.anchor.astype(bool),
        columns={"cluster_id": result.cluster.astype(np.int32)},
        detail=result,
    )


def compute(passes: Sequence[SamplePasses], cfg: Any) -> list[MethodOutput]:
    results = select_batch([label(sample, cfg) for sample in passes], cfg)
    return [output(result) for result in results]


def loss_denominator(cfg: AnchorConfig) -> str:
    """selected_tokens with other_weight 0 (the default), all_tokens otherwise.

    With weight 0 outside the anchors, a token-mean loss over all response tokens keeps only
    ~ratio of plain GRPO's gradient; averaging over the selected tokens restores its scale. With
    other_weight > 0 the other tokens carry gradient too, and a selected-token denominator would
    drop them from the loss (trainers mask to the selected tokens), so all tokens count.
    """
    return "selected_tokens" if float(cfg.other_weight) == 0.0 else "all_tokens"


def selection_scope(cfg: AnchorConfig) -> str:
    return "per_batch" if cfg.ratio_scope == "batch" else "per_response"


ANCHORS = register(
    Method(
        name="anchors",
        summary="AT-RL anchor tokens: most image-connected attention clusters (~15%) get weight 1",
        paper="AT-RL (anchor tokens by cross-modal attention connectivity)",
        config=AnchorConfig,
        needs=lambda _cfg: Needs(attention=True),
        compute=compute,
        loss_denominator=loss_denominator,
        selection_scope=selection_scope,
    )
)
