"""Every VERL policy loss x loss_agg_mode x loss denominator: weighted exactly, or refused.

For each combination `verl_support.refusal` accepts, the gradient of VERL's own loss function
(registry entry, `agg_loss` with the global batch info VERL's engine passes) on the adapter's
output (`weight_advantages`: A * w and, for selected_tokens, the narrowed mask) must equal an
independent reference: w times each token's own gradient (the token-sum loss over the full
response mask, unweighted) divided by the aggregation's denominator, computed here by hand.
Every refused combination raises at construction, and for the refused losses the test shows
the reason is real: the weighted gradient is not w-scaled.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import verl.trainer.ppo.core_algos as core_algos
from verl.workers.config import ActorConfig, PolicyLossConfig

from vlmcredit.errors import VlmCreditError
from vlmcredit.export.verl import VerlWeighting, check_actor_config, weight_advantages
from vlmcredit.export.verl_support import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    check_loss_config,
    refusal,
    support_matrix_markdown,
)
from vlmcredit.formats.signals import LOSS_DENOMINATORS

B, T = 6, 7
LENGTHS = torch.tensor([7, 4, 5, 7, 3, 6])


def make_case(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < LENGTHS[:, None]
    old = -torch.rand(B, T, generator=gen) * 3
    # Ratios e^-1.5 .. e^1.5: unclipped, clipped on both sides, dual-clipped.
    log_prob = old + (torch.rand(B, T, generator=gen) * 3 - 1.5)
    adv = torch.randn(B, 1, generator=gen).expand(B, T).clone()
    w = torch.rand(B, T, generator=gen).round(decimals=1)
    w = w * (torch.rand(B, T, generator=gen) < 0.6) * mask
    w[0] = 0.0  # a response with no selected token
    return {"mask": mask, "old": old, "log_prob": log_prob, "adv": adv, "w": w}


def actor(loss_mode: str, **policy: float) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=B,
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **({"dro_beta": 0.1} | policy)),
    )


def grad(case, loss_mode, agg, advantages, mask, global_info=None, **policy) -> torch.Tensor:
    """d loss / d log_prob of VERL's registered loss function."""
    config = actor(loss_mode, **policy)
    config.global_batch_info.update(global_info or {})
    log_prob = case["log_prob"].clone().requires_grad_(True)
    torch.manual_seed(1)  # clip_cov draws at random: the same draw for every call
    loss, _ = core_algos.get_policy_loss_fn(loss_mode)(
        old_log_prob=case["old"],
        log_prob=log_prob,
        advantages=advantages,
        response_mask=mask,
        loss_agg_mode=agg,
        config=config,
    )
    loss.backward()
    assert log_prob.grad is not None
    return log_prob.grad


def own_token_grad(case, loss_mode) -> torch.Tensor:
    """Each token's gradient of its own loss term, unweighted: the token-sum loss over the full
    response mask; for a loss with a fixed aggregation (sapo), one loss per token alone."""
    if POLICY_LOSSES[loss_mode].aggregation is None:
        return grad(case, loss_mode, "token-sum", case["adv"], case["mask"])
    out = torch.zeros(B, T)
    for b, t in case["mask"].nonzero().tolist():
        alone = torch.zeros(B, T, dtype=torch.bool)
        alone[b, t] = True
        out[b, t] = grad(case, loss_mode, "token-sum", case["adv"], alone)[b, t]
    return out


def reference(case, loss_mode, agg, denominator) -> torch.Tensor:
    """w * (each token's own gradient) / (the aggregation's denominator), by hand."""
    token_grad = own_token_grad(case, loss_mode)
    keep = case["mask"] & ((case["w"] != 0) if denominator == "selected_tokens" else True)
    per_row = keep.sum(-1, keepdim=True).float()
    scale = {
        "token-mean": torch.full((B, 1), 1.0 / keep.sum().item()),
        "token-sum": torch.ones(B, 1),
        "seq-mean-token-sum": torch.full((B, 1), 1.0 / B),
        "seq-mean-token-mean": torch.where(per_row > 0, 1.0 / (B * per_row), 0.0),
        "seq-mean-token-sum-norm": torch.full((B, 1), 1.0 / (B * T)),
    }[agg]
    return case["w"] * token_grad * scale * keep


COMBOS = [
    (loss, agg, den)
    for loss in POLICY_LOSSES
    for agg in LOSS_AGG_MODES
    for den in LOSS_DENOMINATORS
]


def test_table_covers_verls_registry_exactly() -> None:
    assert set(core_algos.POLICY_LOSS_REGISTRY) == set(POLICY_LOSSES)
    assert len(POLICY_LOSSES) == 12
    # Every aggregation agg_loss knows, and no other.
    for agg in LOSS_AGG_MODES:
        core_algos.agg_loss(torch.ones(1, 2), torch.ones(1, 2), agg)
    with pytest.raises(ValueError):
        core_algos.agg_loss(torch.ones(1, 2), torch.ones(1, 2), "seq-sum")


@pytest.mark.parametrize(("loss_mode", "agg", "denominator"), COMBOS)
def test_weighted_exactly_or_refused(loss_mode: str, agg: str, denominator: str) -> None:
    case = make_case()
    reason = refusal(loss_mode, agg, denominator)
    if reason is not None:
        with pytest.raises(VlmCreditError, match="VERL actor config: ") as info:
            check_loss_config(loss_mode, agg, denominator)
        assert "\n" not in str(info.value)
        with pytest.raises(VlmCreditError):
            VerlWeighting(
                weights_fn=lambda b: b,
                loss_denominator=denominator,
                actor=replace(actor(loss_mode), loss_agg_mode=agg),
            )
        return
    check_loss_config(loss_mode, agg, denominator)
    adv, mask = weight_advantages(
        case["adv"], case["mask"], case["w"], loss_denominator=denominator
    )
    mask = mask.bool()
    # The global batch info VERL's engine passes: token count of the (narrowed) loss mask, the
    # number of sequences.
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": B}
    got = grad(case, loss_mode, agg, adv, mask, info)
    assert torch.isfinite(got).all()
    effective = POLICY_LOSSES[loss_mode].aggregation or agg  # sapo ignores loss_agg_mode
    want = reference(case, loss_mode, effective, denominator)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (got[case["w"] == 0] == 0).all()


REFUSED_DEMOS = {  # loss -> policy settings that make the refusal's reason visible
    "clip_cov": {"clip_cov_lb": 0.0, "clip_cov_ub": 5.0, "clip_cov_ratio": 0.5},
    "kl_cov": {"kl_cov_ratio": 0.2},
    "geo_mean": {},
    "dro": {},
}


@pytest.mark.parametrize("loss_mode", sorted(REFUSED_DEMOS))
def test_refused_losses_really_are_not_w_scaled(loss_mode: str) -> None:
    assert POLICY_LOSSES[loss_mode].all_tokens is not None
    case = make_case()
    demo = REFUSED_DEMOS[loss_mode]
    weighted = grad(case, loss_mode, "token-sum", case["adv"] * case["w"], case["mask"], **demo)
    plain = grad(case, loss_mode, "token-sum", case["adv"], case["mask"], **demo)
    assert (weighted - case["w"] * plain).abs().max() > 1e-3


def test_gspo_selected_mask_changes_the_sequence_ratio() -> None:
    case = make_case()
    _, narrowed = weight_advantages(
        case["adv"], case["mask"], case["w"], loss_denominator="selected_tokens"
    )
    got = grad(case, "gspo", "token-sum", case["adv"] * case["w"], narrowed.bool())
    want = case["w"] * grad(case, "gspo", "token-sum", case["adv"], case["mask"])
    assert (got - want).abs().max() > 1e-3
    assert "ratio itself" in str(refusal("gspo", "token-mean", "selected_tokens"))


def test_unknown_loss_and_agg_mode_are_refused() -> None:
    with pytest.raises(VlmCreditError, match="policy loss 'my_loss' is not one vlmcredit"):
        check_loss_config("my_loss", "token-mean", "all_tokens")
    with pytest.raises(VlmCreditError, match="loss_agg_mode 'seq-sum' is not one of"):
        check_loss_config("vanilla", "seq-sum", "all_tokens")


def test_kl_loss_and_entropy_terms_need_an_explicit_option() -> None:
    config = replace(actor("vanilla"), use_kl_loss=True)
    with pytest.raises(VlmCreditError, match=r"use_kl_loss adds a loss term.*allow_unweighted"):
        check_actor_config(config, "all_tokens")
    check_actor_config(config, "all_tokens", allow_unweighted_terms=True)
    entropy = {"actor": {"policy_loss": {"loss_mode": "vanilla"}, "entropy_coeff": 0.01}}
    with pytest.raises(VlmCreditError, match=r"entropy_coeff=0\.01"):
        check_actor_config(entropy["actor"], "all_tokens")
    # VERL's defaults pass.
    check_actor_config(actor("vanilla"), "selected_tokens")


def test_matrix_table_lists_every_loss() -> None:
    table = support_matrix_markdown()
    for name, support in POLICY_LOSSES.items():
        line = next(row for row in table.splitlines() if row.startswith(f"| `{name}` |"))
        assert ("refused" in line) == (
            support.all_tokens is not None or support.selected_tokens is not None
        )


def test_export_readme_is_written_from_the_table() -> None:
    from vlmcredit.export.formats import README

    text = README["verl"].format(
        method="anchors",
        rows=1,
        denominator="all_tokens",
        scope="per_response",
        tokenizer="ab",
        heads="",
        folder="/x",
        trl_matrix="",
        verl_matrix=support_matrix_markdown(),
    )
    for name in POLICY_LOSSES:
        assert f"| `{name}` |" in text
    assert "allow_unweighted_terms=true" in text
