"""What the teacher-forced log-probability pass must compute, gathered from the methods' configs.

Methods that read log p / entropy (ToR, VPPO, entropy, SAYO) share one pass per input variant.
Each config names the distribution it scores (`temperature`, `top_p`); VPPO's also names the
image perturbation (`perturb`). `collect` merges them into the pass options the pipelines and
`vlmcredit.online` hand to the probe: every distinct (temperature, top_p) is scored in the same
forward (the logits are computed once; each extra temperature costs a softmax, each top_p < 1 a
nucleus search), and `score_key` names where a method finds its arrays in
`SamplePasses.logprobs` / `SamplePasses.entropy`. No module here registers a method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from vlmcredit.errors import VlmCreditError

DEFAULT_SCORE = (1.0, 1.0)  # (temperature, top_p): the plain policy distribution
VARIANTS = ("image", "no_image", "perturbed")  # = registry.LOGPROB_VARIANTS


@dataclass
class PerturbConfig:
    """VPPO's perturbed image: patches blacked out independently with `probability`.

    Patches are `patch_px` pixels square on the image the vision tower sees (the resized image),
    aligned to its top-left corner; `cells=True` uses the merged image-token cells instead (28 px
    on Qwen2/2.5-VL, 32 px on Qwen3-VL). The draw is seeded by `seed` and the sample id.
    """

    probability: float = 0.5
    patch_px: int = 14
    cells: bool = False
    seed: int = 0

    def check(self) -> None:
        if not 0.0 <= float(self.probability) <= 1.0:
            raise VlmCreditError(f"perturb.probability {self.probability}: must be between 0 and 1")
        if int(self.patch_px) < 1:
            raise VlmCreditError(f"perturb.patch_px {self.patch_px}: must be at least 1 pixel")


def check_score(temperature: float, top_p: float) -> None:
    if not float(temperature) > 0:
        raise VlmCreditError(f"temperature {temperature}: must be > 0")
    if not 0.0 < float(top_p) <= 1.0:
        raise VlmCreditError(f"top_p {top_p}: must be in (0, 1]")


def score_key(variant: str, temperature: float = 1.0, top_p: float = 1.0) -> str:
    """Where the arrays of `variant` scored at (temperature, top_p) live in SamplePasses."""
    if (float(temperature), float(top_p)) == DEFAULT_SCORE:
        return variant
    return f"{variant}@T={float(temperature):g},p={float(top_p):g}"


def collect(configs: Iterable[Any]) -> dict[str, Any]:
    """The logprobs pass options for these method configs.

    `scores`: the distinct (temperature, top_p) pairs to score; `perturb`: the perturbation as a
    dict (None when no config names one). Two configs asking for different perturbations of
    the one perturbed pass is an error: the pass runs once per batch.
    """
    scores: list[tuple[float, float]] = []
    perturb: dict[str, Any] | None = None
    entropy: set[str] = set()
    for cfg in configs:
        # the variants whose entropy the method reads (ENTROPY_VARIANTS on its config class);
        # a config that does not say gets every variant
        entropy |= set(getattr(cfg, "ENTROPY_VARIANTS", VARIANTS))
        if hasattr(cfg, "temperature"):
            pair = (float(cfg.temperature), float(getattr(cfg, "top_p", 1.0)))
            if pair not in scores:
                scores.append(pair)
        own = getattr(cfg, "perturb", None)
        if isinstance(own, PerturbConfig):
            as_dict = asdict(own)
            if perturb is not None and perturb != as_dict:
                raise VlmCreditError(
                    f"two methods ask for different image perturbations ({perturb} vs "
                    f"{as_dict}); the perturbed pass runs once: give them the same perturb.*"
                )
            perturb = as_dict
    return {
        "scores": scores or [DEFAULT_SCORE],
        "perturb": perturb,
        "entropy_variants": [v for v in VARIANTS if v in entropy],
    }


def logprob_of(sample: Any, variant: str, temperature: float = 1.0, top_p: float = 1.0) -> Any:
    """(T,) log p of the taken tokens in `variant`, or a one-line error when the pass did not
    run (a method read a variant its Needs do not declare)."""
    return _read(sample.logprobs, sample, variant, temperature, top_p, "log p")


def entropy_of(sample: Any, variant: str, temperature: float = 1.0, top_p: float = 1.0) -> Any:
    """(T,) next-token entropy in `variant` (its config's ENTROPY_VARIANTS must name it)."""
    return _read(sample.entropy, sample, variant, temperature, top_p, "entropy")


def _read(table: Any, sample: Any, variant: str, temperature: float, top_p: float, what: str):
    key = score_key(variant, temperature, top_p)
    if table.get(key) is None:
        raise VlmCreditError(
            f"sample {sample.sample_id}: no {what} of the logprobs pass {key!r} (declare the "
            "variant in the method's Needs, its temperature/top_p in its config, and the "
            "variants whose entropy it reads in ENTROPY_VARIANTS)"
        )
    return table[key]
