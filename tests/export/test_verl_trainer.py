"""verl 0.9's v1 trainer mode through VERL's own classes on CPU: registration in VERL's trainer
registry, one `_compute_advantage` step of the registered trainer on a real TransferQueue (Ray
local), and the loss VERL's engine computes from what that step wrote back.

The engine divides the token-mean by `loss_mask`'s count (`forward_backward_batch`), so with a
selected_tokens denominator the step must narrow `loss_mask` as well as `response_mask`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

import ray  # noqa: E402  (the verl extra, installed by `make test`: never skipped)
import transfer_queue as tq  # noqa: E402
import verl.trainer.ppo.core_algos as core_algos  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.v1 import get_trainer_cls  # noqa: E402
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from vlmcredit.errors import VlmCreditError  # noqa: E402
from vlmcredit.export.verl import TRAINER_NAME, register_trainer  # noqa: E402
from vlmcredit.formats.signals import SignalsMeta, write_signals  # noqa: E402

LENGTHS = [5, 3, 4, 6]
PROMPT = 3
UIDS = ["p0", "p0", "p1", "p1"]  # two GRPO groups of two
SAMPLES = ["img-0", "img-0", "img-1", "img-1"]
SCORES = [1.0, 0.0, 0.2, 0.9]
WEIGHTS = [[1, 0, 0, 1, 1], [0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1, 0, 1]]


@pytest.fixture(scope="module")
def transfer_queue():
    # logical CPUs: TransferQueue's controller and storage actors each hold one
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


def nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def trainer_config(signals: Path, denominator: str, **actor: object) -> OmegaConf:
    path = resources.files("verl.trainer.config") / "_generated_ppo_trainer.yaml"
    config = OmegaConf.load(str(path))
    config.algorithm.adv_estimator = "grpo"
    config.actor_rollout_ref.rollout.n = 2
    config.trainer.v1.trainer_mode = TRAINER_NAME
    for key, value in actor.items():
        OmegaConf.update(config, f"actor_rollout_ref.actor.{key}", value)
    config.vlmcredit = {"signals": str(signals), "loss_denominator": denominator}
    return config


def test_registration_in_verls_registry() -> None:
    cls = get_trainer_cls(TRAINER_NAME)
    assert TRAINER_REGISTRY[TRAINER_NAME] is cls
    assert issubclass(cls, get_trainer_cls("sync"))
    assert register_trainer() is cls  # importing the module again is not an error
    with pytest.raises(VlmCreditError, match=r"trainer mode 'renamed' .* is not registered"):
        register_trainer("other", base="renamed")
    assert "other" not in TRAINER_REGISTRY


def test_trainer_refuses_a_loss_that_ignores_the_weights(tmp_path: Path) -> None:
    write_signals(
        tmp_path,
        [{"sample_id": "a", "token_ids": [5], "weight": [1.0]}],
        SignalsMeta("anchors", {}, "tiny", None, "ab" * 20),
    )
    config = trainer_config(tmp_path, "all_tokens", **{"policy_loss.loss_mode": "dro"})
    with pytest.raises(VlmCreditError, match="policy loss 'dro': its quadratic"):
        get_trainer_cls(TRAINER_NAME)(config)
    config = trainer_config(tmp_path, "selected_tokens", **{"policy_loss.loss_mode": "gspo"})
    with pytest.raises(VlmCreditError, match="'gspo' with a selected_tokens denominator"):
        get_trainer_cls(TRAINER_NAME)(config)


def test_advantage_step_and_engine_denominator(transfer_queue, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    responses = [torch.randint(5, 200, (n,), generator=gen) for n in LENGTHS]
    write_signals(
        tmp_path,
        [
            {"sample_id": s, "token_ids": r.tolist(), "weight": [float(x) for x in w]}
            for s, r, w in zip(SAMPLES, responses, WEIGHTS, strict=True)
        ],
        SignalsMeta("anchors", {}, "tiny", None, "ab" * 20, loss_denominator="selected_tokens"),
    )
    trainer = get_trainer_cls(TRAINER_NAME)(trainer_config(tmp_path, "selected_tokens"))
    trainer.tokenizer = None  # a replay check against the tokenizer is tested in test_verl.py

    masks = [torch.ones(n, dtype=torch.long) for n in LENGTHS]
    scores = []
    for n, s in zip(LENGTHS, SCORES, strict=True):
        row = torch.zeros(n)
        row[-1] = s
        scores.append(row)
    keys = [f"{u}_{i % 2}_0" for i, u in enumerate(UIDS)]  # {uid}_{session}_{turn}
    fields = {
        "uid": UIDS,
        "prompts": nested([torch.randint(5, 200, (PROMPT,), generator=gen) for _ in LENGTHS]),
        "responses": nested(responses),
        "response_mask": nested(masks),
        "loss_mask": nested(masks),  # what VERL's agent loop writes (agent_loop_tq.py)
        "rm_scores": nested(scores),
        "extra_info": [{"sample_id": s} for s in SAMPLES],
    }
    meta = tq.kv_batch_put(
        keys=keys, partition_id="train", fields=TensorDict(fields, batch_size=len(keys))
    )
    metrics: dict = {}
    meta = trainer._compute_advantage(meta, metrics)
    assert metrics["vlmcredit/rows_found"] == 4 and metrics["vlmcredit/rows_missed"] == 0

    out = tq.kv_batch_get(
        keys=keys,
        partition_id="train",
        select_fields=["advantages", "response_mask", "loss_mask", "prompts", "responses"],
    )
    # Independent reference: VERL's GRPO estimator on the padded batch, times the weights.
    mask = torch.zeros(4, max(LENGTHS), dtype=torch.long)
    w = torch.zeros(4, max(LENGTHS))
    rewards = torch.zeros(4, max(LENGTHS))
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
        w[b, :n] = torch.tensor(WEIGHTS[b], dtype=torch.float32)
        rewards[b, n - 1] = SCORES[b]
    grpo, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=rewards, response_mask=mask, index=np.array(UIDS)
    )
    advantages = out["advantages"].to_padded_tensor(0.0)
    torch.testing.assert_close(advantages, grpo * w)
    selected = (w != 0).long()
    assert torch.equal(out["response_mask"].to_padded_tensor(0), selected)
    assert torch.equal(out["loss_mask"].to_padded_tensor(0), selected)

    # VERL's engine: batch_num_tokens from loss_mask (fsdp forward_backward_batch), then its
    # ppo_loss per micro-batch. Ratio 1 (log_probs == old_log_probs): each token's loss is -A*w.
    old = [torch.full((PROMPT + n,), -1.0) for n in LENGTHS]
    batch_num_tokens = int(out["loss_mask"].sum())
    assert batch_num_tokens == int(selected.sum()) == 8

    def engine_loss(rows: list[int]) -> torch.Tensor:
        data = TensorDict(
            {
                "prompts": nested([out["prompts"][i] for i in rows]),
                "responses": nested([out["responses"][i] for i in rows]),
                "response_mask": nested([out["response_mask"][i] for i in rows]),
                "advantages": nested([out["advantages"][i] for i in rows]),
                "old_log_probs": nested([torch.full((LENGTHS[i],), -1.0) for i in rows]),
            },
            batch_size=len(rows),
        )
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=batch_num_tokens)
        tu.assign_non_tensor(data, global_batch_size=4)
        log_probs = nested([old[i].clone().requires_grad_(True) for i in rows])
        config = ActorConfig(
            strategy="fsdp", ppo_mini_batch_size=4, rollout_n=1, ppo_micro_batch_size_per_gpu=1
        )
        loss, _ = ppo_loss(config, {"log_probs": log_probs}, data)
        return loss

    total = sum(engine_loss([i]) for i in range(4))
    want = -(grpo * w)[selected.bool()].sum() / selected.sum()  # the selected-token mean
    all_tokens = -(grpo * w)[mask.bool()].sum() / mask.sum()  # what a stale loss_mask gives
    torch.testing.assert_close(total, want)
    assert abs(float(want - all_tokens)) > 1e-3
    # Response 1 has no selected token: its micro-batch gives 0, not NaN.
    assert engine_loss([1]).item() == 0.0
