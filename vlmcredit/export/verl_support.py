"""Which VERL policy losses and loss aggregations carry vlmcredit's per-token weights exactly.

The adapter scales VERL's advantages (and, for a `selected_tokens` denominator, narrows the
loss mask). That is exact only where each token's loss term is positively homogeneous in its
own advantage and the mask enters nothing but the aggregation. This table is the one place
that says where that holds for verl 0.9.1's registry (`core_algos.POLICY_LOSS_REGISTRY`);
`tests/export/test_verl_losses.py` checks every entry against VERL's own loss functions and
fails when VERL registers a loss the table does not know. The export README is written from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmcredit.errors import VlmCreditError

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
# A selected-token denominator needs a token count to narrow: the batch's (token-mean) or each
# sequence's (seq-mean-token-mean). The others divide by sequences or a constant.
SELECTED_AGG_MODES = ("token-mean", "seq-mean-token-mean")


@dataclass(frozen=True)
class LossSupport:
    """None: weighted exactly; otherwise why the adapter refuses it. `aggregation`: the
    loss_agg_mode the loss always uses, whatever the config says."""

    all_tokens: str | None = None
    selected_tokens: str | None = None
    aggregation: str | None = None


POLICY_LOSSES: dict[str, LossSupport] = {
    "vanilla": LossSupport(),
    "dppo_tv": LossSupport(),
    "dppo_kl": LossSupport(),
    "gspo": LossSupport(
        selected_tokens="its sequence importance ratio averages the log-ratio over response_mask, "
        "so narrowing the mask to the selected tokens changes the ratio itself"
    ),
    "sapo": LossSupport(aggregation="seq-mean-token-mean"),
    "gpg": LossSupport(),
    "clip_cov": LossSupport(
        all_tokens="it picks the tokens to detach by the covariance of advantage and log-prob "
        "(and a random draw), so scaled advantages change which tokens are clipped"
    ),
    "kl_cov": LossSupport(
        all_tokens="its KL penalty on the highest-covariance tokens does not scale with the "
        "advantage: weight-0 tokens still get gradient"
    ),
    "geo_mean": LossSupport(
        all_tokens="it takes one geometric-mean ratio per sequence whose gradient is shared by "
        "all its tokens, so a token's weight leaks to the others"
    ),
    "dro": LossSupport(
        all_tokens="its quadratic log-ratio penalty does not depend on the advantage: weight-0 "
        "tokens still get gradient"
    ),
    "cispo": LossSupport(),
    "bypass_mode": LossSupport(
        selected_tokens="its rollout importance weights and rejection statistics aggregate over "
        "response_mask, which the selected tokens would change"
    ),
}

UNWEIGHTED_TERMS_OPTION = "allow_unweighted_terms"


def refusal(loss_mode: str, loss_agg_mode: str, loss_denominator: str) -> str | None:
    """Why (loss_mode, loss_agg_mode, loss_denominator) cannot carry the weights, or None."""
    support = POLICY_LOSSES.get(loss_mode)
    if support is None:
        return (
            f"policy loss {loss_mode!r} is not one vlmcredit has checked (supported: "
            f"{', '.join(POLICY_LOSSES)})"
        )
    if loss_agg_mode not in LOSS_AGG_MODES:
        return f"loss_agg_mode {loss_agg_mode!r} is not one of {', '.join(LOSS_AGG_MODES)}"
    loss_agg_mode = support.aggregation or loss_agg_mode
    if support.all_tokens is not None:
        return f"policy loss {loss_mode!r}: {support.all_tokens}"
    if loss_denominator == "selected_tokens":
        if support.selected_tokens is not None:
            return f"policy loss {loss_mode!r} with a selected_tokens denominator: " + (
                support.selected_tokens
            )
        if loss_agg_mode not in SELECTED_AGG_MODES:
            return (
                f"loss_agg_mode {loss_agg_mode!r} has no token count to narrow to the selected "
                f"tokens (use {' or '.join(SELECTED_AGG_MODES)}, or loss_denominator=all_tokens)"
            )
    return None


def check_loss_config(
    loss_mode: str,
    loss_agg_mode: str,
    loss_denominator: str,
    use_kl_loss: bool = False,
    entropy_coeff: float = 0.0,
    allow_unweighted_terms: bool = False,
) -> None:
    """Raise a one-line VlmCreditError unless the actor's loss applies the weights exactly."""
    reason = refusal(loss_mode, loss_agg_mode, loss_denominator)
    if reason is not None:
        raise VlmCreditError(
            f"VERL actor config: {reason}; choose another actor.policy_loss.loss_mode / "
            "actor.loss_agg_mode"
        )
    if (use_kl_loss or entropy_coeff) and not allow_unweighted_terms:
        term = "actor.use_kl_loss" if use_kl_loss else f"actor.entropy_coeff={entropy_coeff}"
        raise VlmCreditError(
            f"VERL actor config: {term} adds a loss term the weights do not scale (weight-0 "
            f"tokens still train); turn it off or pass +vlmcredit.{UNWEIGHTED_TERMS_OPTION}=true"
        )


def support_matrix_markdown() -> str:
    """The supported matrix as a Markdown table (the export README's VERL section)."""
    lines = [
        "| policy loss | all_tokens | selected_tokens | why not |",
        "|---|---|---|---|",
    ]
    for name, support in POLICY_LOSSES.items():
        all_ok = "every loss_agg_mode" if support.all_tokens is None else "refused"
        refused = support.all_tokens is not None or support.selected_tokens is not None
        sel = "refused" if refused else ", ".join(SELECTED_AGG_MODES)
        if support.aggregation and not refused:
            all_ok = sel = f"every loss_agg_mode (always {support.aggregation})"
        why = support.all_tokens or support.selected_tokens or ""
        lines.append(f"| `{name}` | {all_ok} | {sel} | {why} |")
    return "\n".join(lines) + "\n"
