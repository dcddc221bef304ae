"""Every TRL loss configuration: weighted exactly, or refused at construction.

The table in `vlmcredit.export.trl_modes` drives both halves, so the export README's matrix
(generated from the same table) is what these tests showed: for each weighted (loss_type,
importance_sampling_level), a real GRPO step on the tiny model with 0/1 anchor weights gives
every token exactly weight x its plain-TRL gradient; every refused one (and beta > 0, and the
entropy bonus, for every loss type) raises a one-line VlmCreditError when the trainer is built.
"""

from __future__ import annotations

import pytest
import torch

from tests.export.test_trl import (
    NUM_GENERATIONS,
    anchor_weights,
    loss_row_weights,
    train_one_step,
    trl_setup,  # noqa: F401  (the module fixture)
    verifiable_reward,
    write_weights,
)
from vlmcredit.errors import VlmCreditError
from vlmcredit.export import trl_modes

WEIGHTED = [(m.loss_type, m.importance_sampling_level) for m in trl_modes.TABLE if m.weighted]
REFUSED = [(m.loss_type, m.importance_sampling_level) for m in trl_modes.TABLE if not m.weighted]


def test_the_table_covers_every_trl_loss_type() -> None:
    from trl import GRPOConfig

    # The installed TRL's list, from its own help text: a new loss type must enter the table.
    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    for loss_type in trl_modes.LOSS_TYPES:
        assert f"'{loss_type}'" in help_text
    assert {m.loss_type for m in trl_modes.TABLE} == set(trl_modes.LOSS_TYPES)
    assert WEIGHTED and REFUSED
    # The README matrix is rendered from the table.
    matrix = trl_modes.matrix_markdown()
    for loss_type in trl_modes.LOSS_TYPES:
        assert f"| `{loss_type}` |" in matrix
    assert matrix.count("weighted") == len(WEIGHTED)


@pytest.mark.parametrize(("loss_type", "level"), WEIGHTED)
def test_weighted_modes_scale_every_token_gradient(trl_setup, loss_type, level) -> None:  # noqa: F811
    from trl import GRPOTrainer

    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    config = {"loss_type": loss_type, "importance_sampling_level": level}
    name = f"{loss_type}-{level}"
    plain = train_one_step(trl_setup, GRPOTrainer, f"plain-{name}", args=dict(config))
    folder = write_weights(trl_setup, plain, f"w-{name}", anchor_weights)
    run = train_one_step(
        trl_setup, VlmCreditGRPOTrainer, f"weighted-{name}", signals=folder, args=dict(config)
    )
    assert run["completions"] == plain["completions"]
    table = {
        ids: torch.tensor(anchor_weights(k, len(ids)))
        for k, (_sid, ids) in enumerate(plain["completions"])
    }
    w = loss_row_weights(run, table)
    assert (w == 0).any() and (w == 1).any()
    assert plain["grad_logp"].abs().sum() > 0
    assert torch.equal(run["grad_logp"], w * plain["grad_logp"])
    assert (run["grad_logp"][w == 0] == 0).all()


def build(setup, name: str, **config):
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig

    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    model = AutoModelForImageTextToText.from_pretrained(setup["ckpt"], dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(setup["root"] / name),
        per_device_train_batch_size=4,
        num_generations=NUM_GENERATIONS,
        report_to="none",
        use_cpu=True,
        **config,
    )
    return VlmCreditGRPOTrainer(
        model=model,
        reward_funcs=verifiable_reward,
        args=args,
        train_dataset=setup["dataset"],
        processing_class=setup["processor"],
        weights_fn=lambda _model, batch: torch.ones(batch["response_mask"].shape),
    )


@pytest.mark.parametrize(("loss_type", "level"), REFUSED)
def test_refused_modes_fail_at_construction(trl_setup, loss_type, level) -> None:  # noqa: F811
    with pytest.raises(VlmCreditError, match="importance_sampling_level='sequence'") as err:
        build(trl_setup, "refused", loss_type=loss_type, importance_sampling_level=level)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("loss_type", trl_modes.LOSS_TYPES)
def test_kl_term_and_entropy_bonus_are_refused(trl_setup, loss_type) -> None:  # noqa: F811
    with pytest.raises(VlmCreditError, match="beta > 0 adds a KL term"):
        build(trl_setup, "kl", loss_type=loss_type, beta=0.04)
    with pytest.raises(VlmCreditError, match="entropy bonus"):
        build(trl_setup, "entropy", loss_type=loss_type, entropy_coef=0.01)
