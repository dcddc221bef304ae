"""Record -> analyse -> replay, end to end on a real TRL GRPO step (4 completions per prompt).

A plain `GRPOTrainer` step on the tiny Qwen2.5-VL records its rollouts with `record_rollouts`;
`vlmcredit anchors` runs on that file; the same step replayed with `signals=` matches every
completion (by sample id + exact token ids, EOS included) and each token's gradient is its
anchor weight times the plain one. A tampered completion stops the replay naming its row, and
trains with on_miss="keep".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.export.test_trl import loss_row_weights, verifiable_reward
from tests.helpers import noise_image
from vlmcredit.cli.main import app
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.signals import read_signals, response_id

GROUP = 4
COMPLETION_LENGTH = 6
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    from datasets import Dataset

    from vlmcredit.formats.provenance import tokenizer_hash
    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor

    ckpt = tiny_ckpt("qwen2.5-vl")
    processor = load_processor(ckpt, adapter_for("qwen2_5_vl", "test"))

    def prompt(text: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    # Different prompt lengths and image sizes: the prompt block is padded.
    dataset = Dataset.from_list(
        [
            {
                "sample_id": "circle",
                "prompt": prompt("What color is the circle?"),
                "image": noise_image(56, 56, 0),
                "answer": "red",
            },
            {
                "sample_id": "square",
                "prompt": prompt("Look closely at this noisy picture: what color is the square?"),
                "image": noise_image(84, 112, 1),
                "answer": "blue",
            },
        ]
    )
    return {
        "ckpt": ckpt,
        "processor": processor,
        "dataset": dataset,
        "tokenizer_sha1": tokenizer_hash(processor),
        "root": tmp_path_factory.mktemp("trl-rollouts"),
    }


def grpo_step(setup, trainer_cls, name: str, record: Path | None = None, **extra) -> dict:
    """One GRPO step, 2 prompts x 4 completions; per-token d loss / d log p of the loss pass."""
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig

    from vlmcredit.export.trl_rollouts import record_rollouts

    model = AutoModelForImageTextToText.from_pretrained(
        setup["ckpt"], dtype=torch.float32, attn_implementation="sdpa"
    )
    seen: dict = {"grads": [], "input_ids": [], "completions": []}

    def on_forward(_module, _args, kwargs, output):
        if torch.is_grad_enabled() and getattr(output, "log_probs", None) is not None:
            seen["input_ids"].append(kwargs["input_ids"].detach().clone())
            output.log_probs.register_hook(lambda g: seen["grads"].append(g.detach().clone()))

    model.register_forward_hook(on_forward, with_kwargs=True)

    def reward(prompts, completions, completion_ids, sample_id, **kwargs):
        seen["completions"].extend(zip(sample_id, map(tuple, completion_ids), strict=True))
        return verifiable_reward(completions, **kwargs)

    args = GRPOConfig(
        output_dir=str(setup["root"] / name),
        per_device_train_batch_size=2 * GROUP,
        num_generations=GROUP,
        max_completion_length=COMPLETION_LENGTH,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=setup["dataset"],
        processing_class=setup["processor"],
        **extra,
    )
    recorder = record_rollouts(trainer, record) if record is not None else None
    trainer.train()
    (grads,) = seen["grads"]
    (input_ids,) = seen["input_ids"]
    return {
        "grad_logp": grads[:, -COMPLETION_LENGTH:],
        "loss_completions": input_ids[:, -COMPLETION_LENGTH:],
        "completions": seen["completions"],
        "advantages": list(trainer._logs["advantages"]),
        "logs": trainer.state.log_history[0],
        "recorder": recorder,
    }


def anchors(setup, data: Path, out: Path) -> Path:
    args = ["anchors", "--ckpt", str(setup["ckpt"]), "--data", str(data), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def recorded(setup):
    from trl import GRPOTrainer

    path = setup["root"] / "rollouts.jsonl"
    plain = grpo_step(setup, GRPOTrainer, "plain", record=path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return plain, path, rows


def test_the_recorded_file_is_the_sampled_group(setup, recorded) -> None:
    plain, path, rows = recorded
    assert plain["recorder"].rows_written == 2 * GROUP and plain["recorder"].skipped == 0
    assert [(r["id"], tuple(r["response_ids"])) for r in rows] == plain["completions"]
    for sample_id in ("circle", "square"):
        group = [r for r in rows if r["id"] == sample_id]
        assert [r["completion_index"] for r in group] == list(range(GROUP))
        assert len({tuple(r["prompt_ids"]) for r in group}) == 1
        # The image is stored once per content, beside the file.
        assert len({r["images"][0] for r in group}) == 1
        assert (path.parent / group[0]["images"][0]).is_file()
    assert [r["advantage"] for r in rows] == pytest.approx(plain["advantages"])
    assert all(r["reward"] is not None for r in rows)
    # TRL's own rendering: the image part where TRL put it, no pixels inline.
    assert rows[0]["messages"][0]["content"][0] == {"type": "image"}
    tok = setup["processor"].tokenizer
    for r in rows:  # prompt ids as fed: the templated prompt, image tokens expanded
        assert tok.decode(r["prompt_ids"]).startswith("<|im_start|>")


def test_replay_of_a_recorded_group_matches_every_completion(setup, recorded) -> None:
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    plain, path, _rows = recorded
    run = anchors(setup, path, setup["root"] / "anchors")
    signals = read_signals(run)
    assert len(signals.frame) == 2 * GROUP
    assert set(signals.frame["sample_id"]) == {"circle", "square"}
    replay = grpo_step(setup, VlmCreditGRPOTrainer, "replay", signals=run)
    assert replay["completions"] == plain["completions"]  # same seed: same rollouts
    assert replay["logs"]["vlmcredit/match_rate"] == 1.0
    assert replay["logs"]["vlmcredit/rows_found"] == 2 * GROUP
    table = {}
    for sid, ids in plain["completions"]:
        w = torch.tensor(signals.lookup(sid, ids))
        table[ids] = torch.cat([w, torch.ones(COMPLETION_LENGTH - len(w))])
    w = loss_row_weights(replay, table)
    assert (w == 0).any() and (w == 1).any()
    # AT-RL's signals average the loss over the anchors (dapo: divide by their count), so each
    # token's gradient is w x the plain one x (all tokens / selected tokens); exactly 0 off them.
    assert signals.loss_denominator == "selected_tokens"
    scale = w.numel() / int((w != 0).sum())
    torch.testing.assert_close(replay["grad_logp"], w * plain["grad_logp"] * scale)
    assert (replay["grad_logp"][w == 0] == 0).all()
    assert (replay["grad_logp"][w != 0] != 0).all()


def test_a_tampered_completion_is_named_and_kept_on_request(setup, recorded) -> None:
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    plain, _path, rows = recorded
    tampered = [dict(r) for r in rows]
    victim = tampered[5]
    victim["response_ids"] = [*victim["response_ids"][:-1], (victim["response_ids"][-1] + 1) % 50]
    data = setup["root"] / "tampered.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tampered))
    run = anchors(setup, data, setup["root"] / "anchors-tampered")  # same images, same folder
    with pytest.raises(VlmCreditError) as err:
        grpo_step(setup, VlmCreditGRPOTrainer, "tampered", signals=run)
    sid, ids = plain["completions"][5]
    message = str(err.value)
    assert f"sample {sid!r}" in message and response_id(list(ids))[:12] in message
    assert "7 of 8 responses matched (88%)" in message
    kept = grpo_step(setup, VlmCreditGRPOTrainer, "tampered-keep", signals=run, on_miss="keep")
    assert kept["logs"]["vlmcredit/match_rate"] == 7 / 8
    assert kept["logs"]["vlmcredit/rows_missed"] == 1
