"""TRL adapter: one real GRPO training step on a tiny Qwen2.5-VL, plain vs weighted.

Every run uses the same seed, checkpoint, dataset (images + prompts) and a verifiable reward, so
TRL samples the same completions; the test then compares what TRL itself computes:
- weights all 1 (from a signals file) reproduce the plain GRPOTrainer's loss, per-token
  gradients and updated parameters exactly;
- anchor-like 0/1 weights: per-token gradient = weight x plain gradient (0 where weight is 0),
  and the loss equals the hand-computed dapo loss -sum(A * w * m) / sum(m);
- a response missing from the file stops training with an error naming it (default); with
  on_miss="keep" it keeps weight 1, with "drop" weight 0, counted in the logged metrics;
- a selected-token denominator divides by the selected tokens only;
- an online weights_fn receives the batch contract (prompt + response ids, response mask,
  pixel values) and its weights enter the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.signals import SignalsMeta, response_id, write_signals

NUM_GENERATIONS = 2
COMPLETION_LENGTH = 6


@pytest.fixture(scope="module")
def trl_setup(tiny_ckpt, tmp_path_factory):
    from datasets import Dataset

    from tests.helpers import noise_image
    from vlmcredit.formats.provenance import tokenizer_hash
    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor

    ckpt = tiny_ckpt("qwen2.5-vl")
    processor = load_processor(ckpt, adapter_for("qwen2_5_vl", "test"))
    prompt = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}],
        }
    ]
    dataset = Dataset.from_list(
        [
            {
                "sample_id": f"img-{i}",
                "prompt": prompt,
                "image": noise_image(56, 56, i),
                "answer": a,
            }
            for i, a in enumerate(["red", "blue"])
        ]
    )
    return {
        "ckpt": ckpt,
        "processor": processor,
        "dataset": dataset,
        "tokenizer_sha1": tokenizer_hash(processor),
        "root": tmp_path_factory.mktemp("trl"),
    }


def verifiable_reward(completions, answer, **_kwargs) -> list[float]:
    """Share of the answer's letters present in the completion (plus a length tie-break)."""
    scores = []
    for completion, target in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[0]["content"]
        scores.append(sum(ch in text for ch in target) / len(target) + 0.01 * len(text))
    return scores


def train_one_step(setup, trainer_cls, name: str, **extra) -> dict:
    """One GRPO step; records completions, per-token grads of the loss and the parameters."""
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig

    model = AutoModelForImageTextToText.from_pretrained(
        setup["ckpt"], dtype=torch.float32, attn_implementation="sdpa"
    )
    record: dict = {"grads": [], "input_ids": [], "completions": []}

    def on_forward(_module, _args, kwargs, output):
        # The loss forward (grad enabled): keep its input ids and d loss / d log p per token.
        if torch.is_grad_enabled() and getattr(output, "log_probs", None) is not None:
            record["input_ids"].append(kwargs["input_ids"].detach().clone())
            output.log_probs.register_hook(lambda g: record["grads"].append(g.detach().clone()))

    model.register_forward_hook(on_forward, with_kwargs=True)

    def reward(prompts, completions, completion_ids, sample_id, **kwargs):
        record["completions"].extend(zip(sample_id, map(tuple, completion_ids), strict=True))
        return verifiable_reward(completions, **kwargs)

    args = GRPOConfig(
        output_dir=str(setup["root"] / name),
        per_device_train_batch_size=4,
        num_generations=NUM_GENERATIONS,
        max_completion_length=COMPLETION_LENGTH,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **extra.pop("args", {}),
    )
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=setup["dataset"],
        processing_class=setup["processor"],
        **extra,
    )
    out = trainer.train()
    (grads,) = record["grads"]
    (input_ids,) = record["input_ids"]
    return {
        "loss": out.training_loss,
        "grad_logp": grads[:, -COMPLETION_LENGTH:],
        "loss_completions": input_ids[:, -COMPLETION_LENGTH:],
        "completions": record["completions"],
        "advantages": list(trainer._logs["advantages"]),
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "logs": trainer.state.log_history[0],
        "trainer": trainer,
    }


@pytest.fixture(scope="module")
def plain(trl_setup):
    from trl import GRPOTrainer

    return train_one_step(trl_setup, GRPOTrainer, "plain")


def write_weights(setup, plain_run, name: str, weight_of, skip=(), **meta_over) -> Path:
    folder = setup["root"] / name
    rows = [
        {"sample_id": sid, "token_ids": list(ids), "weight": weight_of(k, len(ids))}
        for k, (sid, ids) in enumerate(plain_run["completions"])
        if k not in skip
    ]
    meta = SignalsMeta(
        method="anchors",
        parameters={"test": name},
        checkpoint_id=str(setup["ckpt"]),
        weights_sha1=None,
        tokenizer_sha1=setup["tokenizer_sha1"],
        **meta_over,
    )
    write_signals(folder, rows, meta)
    return folder


def loss_row_weights(run, table: dict) -> torch.Tensor:
    """The weights of each row of the loss batch (TRL shuffles rows after generation)."""
    return torch.stack([table[tuple(row.tolist())] for row in run["loss_completions"]])


def anchor_weights(k: int, n: int) -> list[float]:
    pattern = [[1, 0, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 1], [0, 0, 1, 1, 0, 1]]
    return [float(x) for x in pattern[k % 4][:n]]


def test_plain_step_has_signal(plain) -> None:
    # The verifiable reward separates the completions of each group: advantages are nonzero,
    # so gradients exist and a zero gradient below means the weight removed it.
    assert len(plain["completions"]) == 4
    assert all(abs(a) > 0.1 for a in plain["advantages"])
    assert plain["grad_logp"].abs().sum(1).min() > 0


def test_weights_of_one_reproduce_plain_trl_exactly(trl_setup, plain) -> None:
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    ones = write_weights(trl_setup, plain, "ones", lambda _k, n: [1.0] * n)
    run = train_one_step(trl_setup, VlmCreditGRPOTrainer, "ones", signals=ones)
    assert run["completions"] == plain["completions"]  # same seed: same rollouts
    assert torch.equal(run["loss_completions"], plain["loss_completions"])
    assert run["loss"] == plain["loss"]
    assert torch.equal(run["grad_logp"], plain["grad_logp"])
    for name, value in plain["params"].items():
        assert torch.equal(run["params"][name], value), name
    assert run["logs"]["vlmcredit/rows_missed"] == 0
    assert run["logs"]["vlmcredit/rows_found"] == 4


def test_anchor_weights_zero_the_gradient_of_unselected_tokens(trl_setup, plain) -> None:
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    # Completion 3 is left out of the file: kept at weight 1 on request, counted as a miss.
    folder = write_weights(trl_setup, plain, "anchors", anchor_weights, skip=(3,))
    run = train_one_step(trl_setup, VlmCreditGRPOTrainer, "anchors", signals=folder, on_miss="keep")
    assert run["completions"] == plain["completions"]
    table = {
        ids: torch.tensor(anchor_weights(k, len(ids)) if k != 3 else [1.0] * len(ids))
        for k, (_sid, ids) in enumerate(plain["completions"])
    }
    w = loss_row_weights(run, table)
    assert (w == 0).any() and (w == 1).any()
    # Per token: weighted gradient = weight x plain gradient; exactly 0 where the weight is 0.
    assert torch.equal(run["grad_logp"], w * plain["grad_logp"])
    assert (run["grad_logp"][w == 0] == 0).all()
    assert (run["grad_logp"][w == 1] != 0).all()
    # The loss against the hand formula (dapo, first step: ratio 1): -sum(A * w) / sum(m).
    adv = {ids: a for (_sid, ids), a in zip(plain["completions"], plain["advantages"], strict=True)}
    a = torch.tensor([adv[tuple(r.tolist())] for r in run["loss_completions"]])
    want = -(a[:, None] * w).sum() / w.numel()
    assert run["loss"] == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert run["loss"] != plain["loss"]
    changed = [n for n, v in plain["params"].items() if not torch.equal(run["params"][n], v)]
    assert changed  # the update moved in a different direction from the plain one
    assert run["logs"]["vlmcredit/rows_missed"] == 1
    assert run["logs"]["vlmcredit/match_rate"] == 0.75
    assert run["logs"]["vlmcredit/tokens_missed"] == COMPLETION_LENGTH
    assert run["trainer"].signal_misses == {"rows": 1, "tokens": COMPLETION_LENGTH}


def test_a_missing_completion_stops_training_unless_told(trl_setup, plain) -> None:
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    folder = write_weights(trl_setup, plain, "missing", anchor_weights, skip=(2,))
    sid, ids = plain["completions"][2]
    with pytest.raises(VlmCreditError) as err:
        train_one_step(trl_setup, VlmCreditGRPOTrainer, "missing-error", signals=folder)
    message = str(err.value)
    assert "\n" not in message
    assert f"sample {sid!r}" in message and response_id(list(ids))[:12] in message
    assert "3 of 4 responses matched (75%)" in message and "on_miss='keep'" in message
    # "drop": the missing completion gets weight 0, so no gradient at all.
    run = train_one_step(
        trl_setup, VlmCreditGRPOTrainer, "missing-drop", signals=folder, on_miss="drop"
    )
    table = {
        c: torch.tensor(anchor_weights(k, len(c)) if k != 2 else [0.0] * len(c))
        for k, (_sid, c) in enumerate(plain["completions"])
    }
    w = loss_row_weights(run, table)
    assert torch.equal(run["grad_logp"], w * plain["grad_logp"])
    dropped = [i for i, r in enumerate(run["loss_completions"]) if tuple(r.tolist()) == ids]
    assert dropped and (run["grad_logp"][dropped] == 0).all()
    assert run["logs"]["vlmcredit/rows_missed"] == 1
    assert run["logs"]["vlmcredit/match_rate"] == 0.75


def test_selected_tokens_denominator(trl_setup, plain) -> None:
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    folder = write_weights(
        trl_setup, plain, "selected", anchor_weights, loss_denominator="selected_tokens"
    )
    run = train_one_step(trl_setup, VlmCreditGRPOTrainer, "selected", signals=folder)
    table = {
        ids: torch.tensor(anchor_weights(k, len(ids)))
        for k, (_sid, ids) in enumerate(plain["completions"])
    }
    w = loss_row_weights(run, table)
    selected = int((w != 0).sum())
    # dapo normalises by the token count: now the selected tokens only.
    scale = w.numel() / selected
    torch.testing.assert_close(run["grad_logp"], w * plain["grad_logp"] * scale)
    adv = {ids: a for (_sid, ids), a in zip(plain["completions"], plain["advantages"], strict=True)}
    a = torch.tensor([adv[tuple(r.tolist())] for r in run["loss_completions"]])
    want = -(a[:, None] * w).sum() / selected
    assert run["loss"] == pytest.approx(want.item(), rel=1e-5, abs=1e-7)


def test_online_weights_fn(trl_setup, plain) -> None:
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    position_weights = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.5, 0.0])
    seen = []

    def by_position(model, batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        assert not torch.is_grad_enabled()  # weights are computed outside the graph
        t = batch["response_mask"].shape[1]
        return position_weights[:t].expand(batch["response_mask"].shape[0], t).clone()

    recorded = trl_setup["root"] / "online-rollouts.jsonl"
    run = train_one_step(
        trl_setup,
        VlmCreditGRPOTrainer,
        "online",
        weights_fn=by_position,
        record_rollouts=recorded,
    )
    # The built-in recorder writes the rollouts with TRL's advantages before weighting.
    rows = [json.loads(line) for line in recorded.read_text().splitlines()]
    assert [(r["id"], tuple(r["response_ids"])) for r in rows] == plain["completions"]
    assert [r["advantage"] for r in rows] == pytest.approx(plain["advantages"])
    assert [r["completion_index"] for r in rows] == [0, 1, 0, 1]
    (batch,) = seen
    assert set(batch) >= {"input_ids", "attention_mask", "response_mask", "pixel_values"}
    assert set(batch) >= {"image_grid_thw", "mm_token_type_ids"}
    # The response block is the last T columns of input_ids, as the online contract says.
    responses = {tuple(r.tolist()) for r in batch["input_ids"][:, -COMPLETION_LENGTH:]}
    assert responses == {ids for _sid, ids in plain["completions"]}
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert torch.equal(run["grad_logp"], position_weights * plain["grad_logp"])


def test_refuses_signals_of_another_tokenizer(trl_setup, plain) -> None:
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig

    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    folder = trl_setup["root"] / "other-tokenizer"
    write_signals(
        folder,
        [{"sample_id": "img-0", "token_ids": [1, 2, 3], "weight": [1.0, 0.0, 1.0]}],
        SignalsMeta("anchors", {}, "other", None, tokenizer_sha1="e" * 40),
    )
    model = AutoModelForImageTextToText.from_pretrained(trl_setup["ckpt"], dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(trl_setup["root"] / "refused"),
        per_device_train_batch_size=4,
        num_generations=NUM_GENERATIONS,
        report_to="none",
        use_cpu=True,
    )
    common = {
        "model": model,
        "reward_funcs": verifiable_reward,
        "args": args,
        "train_dataset": trl_setup["dataset"],
        "processing_class": trl_setup["processor"],
    }
    with pytest.raises(VlmCreditError, match=r"written for tokenizer eeeeeeeeeeee"):
        VlmCreditGRPOTrainer(**common, signals=folder)
    with pytest.raises(VlmCreditError, match="exactly one of signals or weights_fn"):
        VlmCreditGRPOTrainer(**common)
    good = write_weights(
        trl_setup, plain, "sel-drgrpo", anchor_weights, loss_denominator="selected_tokens"
    )
    args.loss_type = "dr_grpo"
    with pytest.raises(VlmCreditError, match="loss_type 'dr_grpo' divides by a constant"):
        VlmCreditGRPOTrainer(**common, signals=good)
    args.loss_type = "dapo"
    with pytest.raises(VlmCreditError, match="no 'rollout' column"):
        VlmCreditGRPOTrainer(**common, signals=good, sample_id_column="rollout")
    assert np.isfinite(plain["loss"])


def test_online_anchor_weights_in_a_real_step(trl_setup, plain) -> None:
    """`vlmcredit.online.weights` as the trainer's weights_fn: the step trains, the weights are
    AT-RL's 0/1 anchors, and each token's gradient is its anchor weight times the plain one."""
    from vlmcredit import online
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    seen = []

    def anchors(model, batch):
        w = online.weights(model, batch, method="anchors")
        seen.append((batch["input_ids"][:, -COMPLETION_LENGTH:].clone(), w.clone()))
        return w

    run = train_one_step(trl_setup, VlmCreditGRPOTrainer, "online-anchors", weights_fn=anchors)
    ((completions, w),) = seen
    assert set(w.unique().tolist()) <= {0.0, 1.0} and (w == 1.0).any() and (w == 0.0).any()
    # The loss pass may reorder rows: match them by their completion tokens.
    by_tokens = {tuple(c.tolist()): row for c, row in zip(completions, w, strict=True)}
    w_loss = torch.stack([by_tokens[tuple(c.tolist())] for c in run["loss_completions"]])
    assert torch.equal(run["grad_logp"], w_loss * plain["grad_logp"])
