"""Which TRL GRPO loss configurations apply vlmcredit's per-token weights exactly.

The weights enter as advantages A * w. A configuration is *weighted* when every token's gradient
is then exactly w times its plain-GRPO gradient (weight-0 tokens get none); otherwise the
adapter refuses it at construction. One table serves the adapter's check, the tests (each
weighted entry is a real GRPO step on the tiny model, each refused one a construction that
raises) and the export README's matrix, so the three cannot disagree. Checked against trl 1.16.
No trl import here: the export README is written without trl installed.
"""

from __future__ import annotations

from dataclasses import dataclass

# trl 1.16's GRPOConfig.loss_type values.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IS_LEVELS = ("token", "sequence")

# Why a configuration does not weight per token (one line each, shown in the refusal).
SEQUENCE_RATIO = (
    "importance_sampling_level='sequence' makes one ratio per response whose gradient spreads "
    "over all its tokens, so weight-0 tokens still train; use importance_sampling_level='token'"
)
KL_TERM = (
    "beta > 0 adds a KL term that trains every token whatever its weight; set beta=0 (the "
    "weights cannot reach the KL term)"
)
ENTROPY_BONUS = (
    "the entropy bonus (entropy_coef / use_adaptive_entropy) trains every token whatever its "
    "weight; set entropy_coef=0 and use_adaptive_entropy=False"
)


@dataclass(frozen=True)
class LossMode:
    loss_type: str
    importance_sampling_level: str
    refused: str | None  # the reason, None = weighted

    @property
    def weighted(self) -> bool:
        return self.refused is None


def _mode(loss_type: str, level: str) -> LossMode:
    # cispo's ratio is clamped and detached, vespo's gamma weight is detached: with either the
    # ratio only scales a token's gradient, whatever its level. Every other loss differentiates
    # the ratio itself, which at sequence level mixes the tokens of a response.
    sequence_ok = loss_type in ("cispo", "vespo")
    refused = SEQUENCE_RATIO if level == "sequence" and not sequence_ok else None
    return LossMode(loss_type, level, refused)


# beta = 0, no entropy bonus; beta > 0 and the entropy bonus are refused for every loss type.
TABLE: tuple[LossMode, ...] = tuple(_mode(t, lv) for t in LOSS_TYPES for lv in IS_LEVELS)


def refusal(
    loss_type: str,
    importance_sampling_level: str,
    beta: float,
    entropy_coef: float = 0.0,
    use_adaptive_entropy: bool = False,
) -> str | None:
    """Why this configuration cannot apply per-token weights exactly; None when it can."""
    if loss_type not in LOSS_TYPES:
        return (
            f"loss_type {loss_type!r} has not been checked with per-token weights; use one of "
            f"{', '.join(LOSS_TYPES)}"
        )
    if importance_sampling_level not in IS_LEVELS:
        return f"importance_sampling_level {importance_sampling_level!r}: use token or sequence"
    if beta != 0.0:
        return KL_TERM
    if entropy_coef != 0.0 or use_adaptive_entropy:
        return ENTROPY_BONUS
    (mode,) = [
        m
        for m in TABLE
        if m.loss_type == loss_type and m.importance_sampling_level == importance_sampling_level
    ]
    return mode.refused


def matrix_markdown() -> str:
    """The supported matrix as a markdown table (the export README's)."""
    short = {SEQUENCE_RATIO: "refused: sequence-level ratio"}
    lines = [
        "| loss_type | token-level ratio, beta = 0 | sequence-level ratio, beta = 0 | beta > 0 |",
        "|---|---|---|---|",
    ]
    for loss_type in LOSS_TYPES:
        cells = []
        for level in IS_LEVELS:
            reason = refusal(loss_type, level, 0.0)
            cells.append("weighted" if reason is None else short[reason])
        cells.append("refused: KL term")
        lines.append(f"| `{loss_type}` | {' | '.join(cells)} |")
    return "\n".join(lines)
