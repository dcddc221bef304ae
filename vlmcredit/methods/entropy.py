"""High-entropy minority tokens ("beyond the 80/20 rule"): train only on the forking tokens.

Mask = the tokens whose next-token entropy is in the top `ratio` (20%) of the batch the method
receives (`vlmcredit weights`: one `--batch-size` batch; online: the trainer batch), or of each
response with scope="response". Selected tokens get weight 1, the others 0, and the loss is
averaged over the selected tokens (loss denominator selected_tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from vlmcredit.analysis.selection import top_share_scoped
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods.logprob_options import check_score, entropy_of
from vlmcredit.methods.registry import Method, MethodOutput, Needs, SamplePasses, register


@dataclass
class EntropyConfig:
    ENTROPY_VARIANTS: ClassVar[tuple[str, ...]] = ("image",)  # passes whose entropy is read
    ratio: float = 0.2  # share of tokens selected (the paper's top 20%)
    scope: str = "batch"  # "batch" (the paper: quantile over the batch) or "response"
    temperature: float = 1.0  # of the scored distribution
    top_p: float = 1.0  # entropy over the top-p nucleus when < 1

    def check(self) -> None:
        if not 0.0 < float(self.ratio) <= 1.0:
            raise VlmCreditError(f"entropy ratio {self.ratio}: must be in (0, 1]")
        if self.scope not in ("batch", "response"):
            raise VlmCreditError(f"entropy scope {self.scope!r}: use batch or response")
        check_score(self.temperature, self.top_p)


def compute(passes: Sequence[SamplePasses], cfg: EntropyConfig) -> list[MethodOutput]:
    entropy = [entropy_of(p, "image", cfg.temperature, cfg.top_p) for p in passes]
    masks = top_share_scoped(entropy, cfg.ratio, cfg.scope)
    return [
        MethodOutput(
            weight=mask.astype(np.float32),
            mask=mask,
            columns={"entropy": np.asarray(ent, dtype=np.float32)},
        )
        for ent, mask in zip(entropy, masks, strict=True)
    ]


def _scope(cfg: Any) -> str:
    return "per_batch" if cfg.scope == "batch" else "per_response"


ENTROPY = register(
    Method(
        name="entropy",
        summary="high-entropy minority tokens: the batch's top 20% by next-token entropy",
        paper="Beyond the 80/20 rule: high-entropy minority tokens drive RLVR",
        config=EntropyConfig,
        needs=lambda _cfg: Needs(logprobs=("image",)),
        compute=compute,
        loss_denominator="selected_tokens",
        selection_scope=_scope,
        columns={"entropy": "float32"},
    )
)
