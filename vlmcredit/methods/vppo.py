"""VPPO: tokens whose probability moves when the image is perturbed, and a trajectory weight.

Per token d = clamp(log p(o_t | I') - log p(o_t | I), -d_clamp, d_clamp) with I' the image with
patches blacked out (probability 0.5, 14 px patches: `perturb.*`), and the sampled-token KL
estimator S_t = clamp(exp(d) - d - 1, 0, s_clamp). Mask = the top `ratio` (40%) of each response
by S_t: weight 1 there, 0 elsewhere; the loss denominator stays all response tokens.
Trajectory shaping: alpha = beta_min + (beta_max - beta_min) * minmax(mean S of the response)
over the batch the method receives (one `--batch-size` batch in `vlmcredit weights`); a batch
whose means are all equal (or one response) gives every response beta_min, as
(x - min) / (max - min + eps) does. alpha is exported as `sample_weight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from vlmcredit.analysis.selection import top_share
from vlmcredit.errors import VlmCreditError
from vlmcredit.methods.logprob_options import PerturbConfig, check_score, logprob_of
from vlmcredit.methods.registry import Method, MethodOutput, Needs, SamplePasses, register


@dataclass
class VppoConfig:
    ENTROPY_VARIANTS: ClassVar[tuple[str, ...]] = ()  # reads log p only
    ratio: float = 0.4  # share of each response's tokens kept, by S_t
    d_clamp: float = 20.0
    s_clamp: float = 10.0
    beta_min: float = 0.9
    beta_max: float = 1.0  # not given in the summaries we hold: our choice (no up-weighting)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    temperature: float = 1.0

    def check(self) -> None:
        if not 0.0 < float(self.ratio) <= 1.0:
            raise VlmCreditError(f"vppo ratio {self.ratio}: must be in (0, 1]")
        if not 0.0 <= float(self.beta_min) <= float(self.beta_max):
            raise VlmCreditError(
                f"vppo beta_min {self.beta_min}, beta_max {self.beta_max}: need "
                "0 <= beta_min <= beta_max"
            )
        if not (self.d_clamp > 0 and self.s_clamp > 0):
            raise VlmCreditError("vppo d_clamp and s_clamp: must be > 0")
        self.perturb.check()
        check_score(self.temperature, 1.0)


def kl_estimate(logp: np.ndarray, logp_perturbed: np.ndarray, cfg: VppoConfig) -> tuple:
    """(d, S_t) per token, in float64."""
    d = np.clip(
        np.asarray(logp_perturbed, np.float64) - np.asarray(logp, np.float64),
        -cfg.d_clamp,
        cfg.d_clamp,
    )
    s = np.clip(np.expm1(d) - d, 0.0, cfg.s_clamp)  # exp(d) - d - 1, exact near d = 0
    return d, s


def trajectory_alpha(means: Sequence[float], beta_min: float, beta_max: float) -> np.ndarray:
    """beta_min + (beta_max - beta_min) * minmax(means); equal means -> beta_min."""
    m = np.asarray(means, dtype=np.float64)
    if m.size == 0:
        return m
    span = m.max() - m.min()
    norm = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    return beta_min + (beta_max - beta_min) * norm


def compute(passes: Sequence[SamplePasses], cfg: VppoConfig) -> list[MethodOutput]:
    ds, ss = [], []
    for p in passes:
        logp = logprob_of(p, "image", cfg.temperature)
        pert = logprob_of(p, "perturbed", cfg.temperature)
        d, s = kl_estimate(logp, pert, cfg)
        ds.append(d)
        ss.append(s)
    alpha = trajectory_alpha([s.mean() if s.size else 0.0 for s in ss], cfg.beta_min, cfg.beta_max)
    out = []
    for d, s, a in zip(ds, ss, alpha, strict=True):
        mask = top_share(s, cfg.ratio)
        out.append(
            MethodOutput(
                weight=mask.astype(np.float32),
                mask=mask,
                columns={"s_t": s.astype(np.float32), "delta_logp": d.astype(np.float32)},
                sample_weight=float(a),
            )
        )
    return out


VPPO = register(
    Method(
        name="vppo",
        summary="VPPO: top-40% tokens by perturbed-image KL estimate, trajectory alpha by mean",
        paper="VPPO (visually-perceptive policy optimization, perturbed-image dependency)",
        config=VppoConfig,
        needs=lambda _cfg: Needs(logprobs=("image", "perturbed")),
        compute=compute,
        loss_denominator="all_tokens",
        selection_scope="per_response",
        columns={"s_t": "float32", "delta_logp": "float32"},
    )
)
