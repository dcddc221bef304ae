"""ToR token reweighting: reasoning tokens (high entropy) and perception tokens (high |delta log p|
with vs without the image) get the gradient, the rest none.

reasoning  = top `reasoning_ratio` (30%) by next-token entropy (the paper: over the top-p 0.95
             nucleus); perception = top `perception_ratio` (30%) by |log p(o_t | image, q, o_<t)
             - log p(o_t | q, o_<t)|, the second from the prompt re-templated without the image.
Quantiles over all tokens of the batch the method receives (scope="batch", the paper; one
`--batch-size` batch in `vlmcredit weights`) or per response (scope="response"). Weights: both
1.0, reasoning only 1.0, perception only 0.5, neither 0 (all parameters). The weights reweight
GRPO's token-mean loss, whose denominator stays all response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from vlmcredit.analysis.selection import top_share_scoped
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods.logprob_options import check_score, entropy_of, logprob_of
from vlmcredit.methods.registry import Method, MethodOutput, Needs, SamplePasses, register


@dataclass
class TorConfig:
    ENTROPY_VARIANTS: ClassVar[tuple[str, ...]] = ("image",)  # passes whose entropy is read
    reasoning_ratio: float = 0.3
    perception_ratio: float = 0.3
    scope: str = "batch"  # "batch" (the paper) or "response"
    weight_both: float = 1.0
    weight_reasoning: float = 1.0  # reasoning only
    weight_perception: float = 0.5  # perception only
    weight_neither: float = 0.0
    temperature: float = 1.0
    top_p: float = 0.95  # the paper's entropy is over the top-p 0.95 nucleus

    def check(self) -> None:
        for name in ("reasoning_ratio", "perception_ratio"):
            if not 0.0 < float(getattr(self, name)) <= 1.0:
                raise VlmCreditError(f"tor {name} {getattr(self, name)}: must be in (0, 1]")
        if self.scope not in ("batch", "response"):
            raise VlmCreditError(f"tor scope {self.scope!r}: use batch or response")
        for name in ("weight_both", "weight_reasoning", "weight_perception", "weight_neither"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value < 0:
                raise VlmCreditError(f"tor {name} {value}: must be a finite number >= 0")
        check_score(self.temperature, self.top_p)


def compute(passes: Sequence[SamplePasses], cfg: TorConfig) -> list[MethodOutput]:
    entropy, delta = [], []
    for p in passes:
        logp = logprob_of(p, "image", cfg.temperature, cfg.top_p)
        ent = entropy_of(p, "image", cfg.temperature, cfg.top_p)
        bare = logprob_of(p, "no_image", cfg.temperature, cfg.top_p)
        entropy.append(np.asarray(ent, dtype=np.float32))
        delta.append(
            (np.asarray(logp, np.float64) - np.asarray(bare, np.float64)).astype(np.float32)
        )
    reasoning = top_share_scoped(entropy, cfg.reasoning_ratio, cfg.scope)
    perception = top_share_scoped([np.abs(d) for d in delta], cfg.perception_ratio, cfg.scope)
    out = []
    for ent, d, r, q in zip(entropy, delta, reasoning, perception, strict=True):
        weight = np.select(
            [r & q, r, q],
            [cfg.weight_both, cfg.weight_reasoning, cfg.weight_perception],
            default=cfg.weight_neither,
        ).astype(np.float32)
        out.append(
            MethodOutput(
                weight=weight,
                mask=r | q,
                columns={"entropy": ent, "delta_logp": d, "reasoning": r, "perception": q},
            )
        )
    return out


def _scope(cfg: Any) -> str:
    return "per_batch" if cfg.scope == "batch" else "per_response"


TOR = register(
    Method(
        name="tor",
        summary="ToR: top-30% entropy (reasoning) and top-30% |delta log p| without the image "
        "(perception) tokens, reweighted",
        paper="Bridging Perception and Reasoning: Token Reweighting for RLVR in MLLMs (ToR)",
        config=TorConfig,
        needs=lambda _cfg: Needs(logprobs=("image", "no_image")),
        compute=compute,
        loss_denominator="all_tokens",
        selection_scope=_scope,
        columns={
            "entropy": "float32",
            "delta_logp": "float32",
            "reasoning": "bool",
            "perception": "bool",
        },
    )
)
