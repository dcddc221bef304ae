"""VERL adapter against VERL's own functions (verl.trainer.ppo.core_algos, verl.protocol).

VERL must be importable: `make test` installs it (`pip install --no-deps verl` + its runtime
minimum). A missing VERL fails this module at import, it is never skipped.

The batch goes the way VERL's driver sends it: GRPO advantages from VERL's
`compute_grpo_outcome_advantage`, the weights applied to the `DataProto` by `weight_dataproto`,
then VERL's registered "vanilla" policy loss. The per-token loss of each token is VERL's own
(the loss with a one-hot response mask, "token-sum"), compared with and without the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import verl.trainer.ppo.core_algos as core_algos
from verl.protocol import DataProto
from verl.workers.config import ActorConfig

from vlmcredit.errors import VlmCreditError
from vlmcredit.export.verl import (
    VerlWeighting,
    sample_ids_from_extra_info,
    weight_advantages,
    weight_dataproto,
)
from vlmcredit.formats.signals import SignalsMeta, read_signals, write_signals

LENGTHS = [6, 4, 5, 6]  # right-padded responses
T = 6
SAMPLES = ["img-0", "img-0", "img-1", "img-1"]  # two GRPO groups of two


def make_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    responses = torch.randint(3, 500, (4, T), generator=gen) * mask  # pad id 0
    scores = torch.tensor([1.0, 0.0, 0.2, 0.9])
    rewards = torch.zeros(4, T)
    rewards[torch.arange(4), torch.tensor(LENGTHS) - 1] = scores  # reward on the last token
    uid = np.array(["u0", "u0", "u1", "u1"], dtype=object)
    advantages, _returns = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=rewards, response_mask=mask, index=uid
    )
    old_log_prob = -torch.rand(4, T, generator=gen) * 3
    # Ratios from e^-1.5 to e^1.5: unclipped, clipped both sides and VERL's dual clip (> 3).
    log_prob = old_log_prob + (torch.rand(4, T, generator=gen) * 3 - 1.5)
    return {
        "responses": responses,
        "response_mask": mask,
        "advantages": advantages,
        "uid": uid,
        "old_log_prob": old_log_prob,
        "log_prob": log_prob,
        "input_ids": torch.cat([torch.randint(3, 500, (4, 5), generator=gen), responses], 1),
    }


def dataproto(batch: dict) -> DataProto:
    return DataProto.from_dict(
        tensors={
            k: batch[k].clone() for k in ("responses", "response_mask", "advantages", "input_ids")
        }
        | {"attention_mask": torch.cat([torch.ones(4, 5).long(), batch["response_mask"]], 1)},
        non_tensors={
            "uid": batch["uid"],
            "extra_info": np.array([{"sample_id": s, "index": i} for i, s in enumerate(SAMPLES)]),
        },
    )


def signals_for(tmp_path: Path, batch: dict, weight_of, skip=(), **meta_over):
    rows = []
    for b in range(4):
        if b in skip:
            continue
        n = LENGTHS[b]
        rows.append(
            {
                "sample_id": SAMPLES[b],
                "token_ids": batch["responses"][b, :n].tolist(),
                "weight": weight_of(b, n),
            }
        )
    write_signals(tmp_path, rows, SignalsMeta("anchors", {}, "tiny", None, "ab" * 20, **meta_over))
    return read_signals(tmp_path)


def actor_config() -> ActorConfig:
    return ActorConfig(
        strategy="fsdp", ppo_mini_batch_size=4, rollout_n=1, ppo_micro_batch_size_per_gpu=1
    )


def vanilla(batch: dict, advantages, mask, mode: str = "token-mean"):
    """VERL's registered vanilla policy loss and d loss / d log_prob."""
    loss_fn = core_algos.get_policy_loss_fn("vanilla")
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    loss, _metrics = loss_fn(
        old_log_prob=batch["old_log_prob"],
        log_prob=log_prob,
        advantages=advantages,
        response_mask=mask.bool(),
        loss_agg_mode=mode,
        config=actor_config(),
    )
    loss.backward()
    return loss.detach(), log_prob.grad


def per_token_loss(batch: dict, advantages) -> torch.Tensor:
    """Each token's loss term as VERL computes it: the token-sum loss over that token alone."""
    out = torch.zeros(4, T)
    for b in range(4):
        for t in range(LENGTHS[b]):
            onehot = torch.zeros(4, T, dtype=torch.bool)
            onehot[b, t] = True
            out[b, t] = vanilla(batch, advantages, onehot, mode="token-sum")[0]
    return out


def anchor(b: int, n: int) -> list[float]:
    pattern = [[1, 0, 0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 1, 0, 1], [0, 0, 1, 1, 0, 1]]
    return [float(x) for x in pattern[b][:n]]


def test_batch_exercises_every_branch_of_the_vanilla_loss() -> None:
    batch = make_batch()
    ratio = (batch["log_prob"] - batch["old_log_prob"]).exp()[batch["response_mask"].bool()]
    assert (ratio > 1.2).any() and (ratio < 0.8).any() and (ratio > 3).any()
    adv = batch["advantages"][:, 0]
    assert (adv > 0).any() and (adv < 0).any()


def test_weights_of_one_give_vanillas_per_token_loss(tmp_path: Path) -> None:
    batch = make_batch()
    data = dataproto(batch)
    signals = signals_for(tmp_path, batch, lambda _b, n: [1.0] * n)
    stats = weight_dataproto(data, VerlWeighting(signals=signals))
    assert stats["vlmcredit/rows_found"] == 4 and stats["vlmcredit/rows_missed"] == 0
    assert torch.equal(data.batch["advantages"], batch["advantages"])
    assert torch.equal(data.batch["response_mask"], batch["response_mask"])
    want = per_token_loss(batch, batch["advantages"])
    got = per_token_loss(batch, data.batch["advantages"])
    assert torch.equal(got, want) and want.abs().sum() > 0
    loss_w, grad_w = vanilla(batch, data.batch["advantages"], data.batch["response_mask"])
    loss, grad = vanilla(batch, batch["advantages"], batch["response_mask"])
    assert torch.equal(loss_w, loss) and torch.equal(grad_w, grad)


def test_zero_weights_contribute_nothing(tmp_path: Path) -> None:
    batch = make_batch()
    data = dataproto(batch)
    # Response 1 is not in the file (a fresh rollout): weight 1, counted.
    signals = signals_for(tmp_path, batch, anchor, skip=(1,))
    stats = weight_dataproto(data, VerlWeighting(signals=signals))
    assert stats == {
        "vlmcredit/rows_found": 3.0,
        "vlmcredit/rows_missed": 1.0,
        "vlmcredit/tokens_missed": 4.0,
    }
    assert data.meta_info["vlmcredit"] == stats
    w = torch.ones(4, T)
    for b in (0, 2, 3):
        w[b, : LENGTHS[b]] = torch.tensor(anchor(b, LENGTHS[b]))
    plain = per_token_loss(batch, batch["advantages"])
    weighted = per_token_loss(batch, data.batch["advantages"])
    valid = batch["response_mask"].bool()
    assert torch.equal(weighted, w * plain)
    assert (weighted[(w == 0) & valid] == 0).all()
    assert (plain[(w == 0) & valid] != 0).any()
    # Gradient: none through weight-0 tokens; the token-mean denominator stays all tokens.
    _, grad_w = vanilla(batch, data.batch["advantages"], data.batch["response_mask"])
    _, grad = vanilla(batch, batch["advantages"], batch["response_mask"])
    assert (grad_w[w == 0] == 0).all()
    assert torch.equal(grad_w[w == 1], grad[w == 1])


def test_fractional_weights_scale_the_clipped_term(tmp_path: Path) -> None:
    batch = make_batch(seed=1)
    data = dataproto(batch)
    signals = signals_for(tmp_path, batch, lambda b, n: [0.25 * ((b + t) % 5) for t in range(n)])
    weight_dataproto(data, VerlWeighting(signals=signals))
    w = torch.zeros(4, T)
    for b in range(4):
        w[b, : LENGTHS[b]] = torch.tensor([0.25 * ((b + t) % 5) for t in range(LENGTHS[b])])
    # PPO's clipped (and dual-clipped) term is positively homogeneous in the advantage.
    torch.testing.assert_close(
        per_token_loss(batch, data.batch["advantages"]),
        w * per_token_loss(batch, batch["advantages"]),
    )


def test_selected_tokens_denominator(tmp_path: Path) -> None:
    batch = make_batch()
    data = dataproto(batch)
    signals = signals_for(tmp_path, batch, anchor, loss_denominator="selected_tokens")
    weighting = VerlWeighting(signals=signals)
    assert weighting.loss_denominator == "selected_tokens"
    weight_dataproto(data, weighting)
    w = torch.zeros(4, T)
    for b in range(4):
        w[b, : LENGTHS[b]] = torch.tensor(anchor(b, LENGTHS[b]))
    assert torch.equal(data.batch["response_mask"], (w != 0).long())
    loss, _ = vanilla(batch, data.batch["advantages"], data.batch["response_mask"])
    tokens = per_token_loss(batch, batch["advantages"])
    want = (w * tokens).sum() / (w != 0).sum()
    torch.testing.assert_close(loss, want)
    # The override to all tokens keeps VERL's mask.
    data = dataproto(batch)
    weight_dataproto(data, VerlWeighting(signals=signals, loss_denominator="all_tokens"))
    assert torch.equal(data.batch["response_mask"], batch["response_mask"])


def test_online_weights_fn_gets_the_batch() -> None:
    batch = make_batch()
    data = dataproto(batch)
    seen = {}

    def by_position(b):
        seen.update(b)
        return torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.5]).expand(4, T)

    weight_dataproto(data, VerlWeighting(weights_fn=by_position))
    assert set(seen) == {"input_ids", "attention_mask", "response_mask", "responses"}
    assert torch.equal(seen["input_ids"][:, -T:], batch["responses"])  # response block last
    torch.testing.assert_close(
        data.batch["advantages"], batch["advantages"] * torch.tensor([1.0, 0, 0.5, 1, 0, 0.5])
    )


def test_errors(tmp_path: Path) -> None:
    batch = make_batch()
    signals = signals_for(tmp_path, batch, anchor)
    data = dataproto(batch)
    data.non_tensor_batch["extra_info"] = np.array([{"index": i} for i in range(4)])
    with pytest.raises(VlmCreditError, match=r"row 0: extra_info has no 'sample_id'"):
        weight_dataproto(data, VerlWeighting(signals=signals))
    with pytest.raises(VlmCreditError, match="exactly one of signals or weights_fn"):
        VerlWeighting()
    with pytest.raises(VlmCreditError, match="do not match the advantages"):
        weight_advantages(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 4))
    assert sample_ids_from_extra_info([{"sample_id": 7}]) == ["7"]
    # A tokenizer mismatch is refused when the weighting is built from a path.
    with pytest.raises(VlmCreditError, match="written for tokenizer abababababab"):
        VerlWeighting.from_path(tmp_path, tokenizer_sha1="cd" * 20)


def test_weighting_from_trainer_config(tmp_path: Path, monkeypatch, tiny_ckpt) -> None:
    """What the registered v1 trainer reads: +vlmcredit.signals / loss_denominator, with the
    tokenizer check against the trainer's processor."""
    from omegaconf import OmegaConf

    from vlmcredit.export.verl import _weighting_from_config
    from vlmcredit.formats.provenance import tokenizer_hash
    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor

    processor = load_processor(tiny_ckpt("qwen2.5-vl"), adapter_for("qwen2_5_vl", "test"))
    batch = make_batch()
    folder = tmp_path / "sig"
    write_signals(
        folder,
        [{"sample_id": "img-0", "token_ids": batch["responses"][0].tolist(), "weight": [1.0] * T}],
        SignalsMeta("anchors", {}, "tiny", None, tokenizer_hash(processor)),
    )
    config = OmegaConf.create(
        {
            "trainer": {},
            "vlmcredit": {"signals": str(folder), "loss_denominator": "selected_tokens"},
        }
    )
    weighting = _weighting_from_config(config, processor)
    assert weighting.loss_denominator == "selected_tokens"
    assert len(weighting.signals.frame) == 1
    monkeypatch.delenv("VLMCREDIT_SIGNALS", raising=False)
    with pytest.raises(VlmCreditError, match=r"\+vlmcredit\.signals=PATH"):
        _weighting_from_config(OmegaConf.create({"trainer": {}}))
    other = tmp_path / "other"
    write_signals(
        other,
        [{"sample_id": "a", "token_ids": [1], "weight": [1.0]}],
        SignalsMeta("anchors", {}, "x", None, "0" * 40),
    )
    monkeypatch.setenv("VLMCREDIT_SIGNALS", str(other))
    with pytest.raises(VlmCreditError, match="written for tokenizer 000000000000"):
        _weighting_from_config(OmegaConf.create({"trainer": {}}), processor)


def test_rows_selecting_nothing_are_said_once_per_batch(caplog) -> None:
    """A row that selects no token is fine inside a mini-batch that selects some (VERL divides
    by the mini-batch's count); a mini-batch of only such rows gets 0 / 0 in VERL's own
    aggregation (shown here with verl's `agg_loss`), which VERL's non-finite grad-norm check
    turns into a skipped update. vlmcredit says how many such rows each batch has."""
    advantages = torch.ones(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    weights = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
    with caplog.at_level("WARNING", logger="vlmcredit.verl"):
        weighted, narrowed = weight_advantages(advantages, mask, weights, None, "selected_tokens")
    assert "1 of 3 rows select no token" in caplog.text
    assert torch.equal(narrowed, weights != 0) and torch.equal(weighted, weights)
    # Mini-batch {row 0, row 1}: its own selected count (2) divides, row 1 adds nothing.
    loss = core_algos.agg_loss(weighted[:2], narrowed[:2], "token-mean", batch_num_tokens=2)
    assert float(loss) == 1.0
    # Mini-batch {row 1} alone: VERL's count is 0 and its token mean is 0 / 0.
    lone = core_algos.agg_loss(weighted[1:2], narrowed[1:2], "token-mean", batch_num_tokens=0)
    assert torch.isnan(lone)
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmcredit.verl"):
        weight_advantages(advantages, mask, torch.ones(3, 4), None, "selected_tokens")
    assert "select no token" not in caplog.text
