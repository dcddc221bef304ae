"""VERL's batch layout -> rollouts file -> `vlmcredit anchors` -> replay through the adapter.

The batch is built the way VERL's `RLHFDataset` and rollout build it for a Qwen-VL model: the
processor's chat template over `raw_prompt` (with `<image>` placeholders), the processor's
prompt ids left-padded, responses right-padded with EOS included, GRPO advantages from VERL's
own estimator, two completions per prompt sharing `uid` and `extra_info.sample_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import verl.trainer.ppo.core_algos as core_algos
from PIL import Image
from typer.testing import CliRunner
from verl.protocol import DataProto

from vlmcredit.cli.main import app
from vlmcredit.data.rollouts import read_rollouts
from vlmcredit.errors import VlmCreditError
from vlmcredit.export.verl import VerlWeighting, weight_dataproto
from vlmcredit.export.verl_rollouts import VerlRolloutWriter, read_generation_dump
from vlmcredit.formats.provenance import tokenizer_hash
from vlmcredit.formats.signals import read_signals
from vlmcredit.models.families import adapter_for
from vlmcredit.models.loading import load_processor

runner = CliRunner()
FAMILY = "qwen2.5-vl"
TEXTS = ["a red square", "it is red", "a blue circle on white", "blue"]
SAMPLES = ["img-0", "img-0", "img-1", "img-1"]
SCORES = [1.0, 0.0, 0.3, 0.8]


def image(color: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (56, 56), (255, 255, 255))
    img.paste(Image.new("RGB", (28, 28), color), (14, 14))
    return img


@pytest.fixture(scope="module")
def verl_batch(tiny_ckpt):
    ckpt = tiny_ckpt(FAMILY)
    processor = load_processor(ckpt, adapter_for("qwen2_5_vl", "test"))
    tok = processor.tokenizer
    images = {"img-0": image((220, 30, 30)), "img-1": image((30, 30, 220))}
    raw = {s: [{"role": "user", "content": "<image>What is shown?"}] for s in images}
    prompts, responses = [], []
    for sample, text in zip(SAMPLES, TEXTS, strict=True):
        # VERL's dataset: the chat template over image parts, then the processor with the images.
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}],
            }
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[prompt], images=[images[sample]], return_tensors="pt")["input_ids"][0]
        prompts.append(ids)
        responses.append(torch.tensor([*tok.encode(text), tok.convert_tokens_to_ids("<|im_end|>")]))
    P, T = max(map(len, prompts)), max(map(len, responses))
    pad = tok.pad_token_id
    prompt_block = torch.full((4, P), pad)
    response_block = torch.full((4, T), pad)
    attention = torch.zeros(4, P + T, dtype=torch.long)
    rewards = torch.zeros(4, T)
    for b in range(4):
        prompt_block[b, P - len(prompts[b]) :] = prompts[b]
        response_block[b, : len(responses[b])] = responses[b]
        attention[b, P - len(prompts[b]) : P + len(responses[b])] = 1
        rewards[b, len(responses[b]) - 1] = SCORES[b]
    response_mask = attention[:, P:]
    uid = np.array(["u0", "u0", "u1", "u1"], dtype=object)
    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=rewards, response_mask=response_mask, index=uid
    )
    data = DataProto.from_dict(
        tensors={
            "prompts": prompt_block,
            "responses": response_block,
            "input_ids": torch.cat([prompt_block, response_block], 1),
            "attention_mask": attention,
            "response_mask": response_mask,
            "token_level_scores": rewards,
            "advantages": advantages,
        },
        non_tensors={
            "uid": uid,
            "extra_info": np.array([{"sample_id": s} for s in SAMPLES], dtype=object),
            "raw_prompt": np.array([raw[s] for s in SAMPLES], dtype=object),
            "multi_modal_data": np.array([{"image": [images[s]]} for s in SAMPLES], dtype=object),
        },
    )
    return {"ckpt": ckpt, "processor": processor, "data": data, "responses": responses}


def test_batch_to_rollouts_file(verl_batch, tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    writer = VerlRolloutWriter(path)
    assert writer.write(verl_batch["data"]) == 4
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == SAMPLES
    assert [r["completion_index"] for r in rows] == [0, 1, 0, 1]
    for row, response in zip(rows, verl_batch["responses"], strict=True):
        assert row["response_ids"] == response.tolist()  # EOS included
        assert row["messages"][0]["content"][0] == {"type": "image"}
        assert (path.parent / row["images"][0]).is_file()
    assert rows[0]["images"] == rows[1]["images"] != rows[2]["images"]
    assert [r["reward"] for r in rows] == pytest.approx(SCORES)
    assert rows[0]["advantage"] == pytest.approx(-rows[1]["advantage"])
    # vlmcredit's reader takes the file as a trainer rollouts file: groups kept apart.
    samples = read_rollouts(path).samples
    assert len(samples) == 4
    assert len({s.id for s in samples}) == 4
    with pytest.raises(VlmCreditError, match="exists and is not empty"):
        VerlRolloutWriter(path)


def test_record_anchors_replay_through_verls_batch_layout(verl_batch, tmp_path: Path) -> None:
    """The done-when test of issue 12 for VERL: 100% matched, per-token loss w-scaled."""
    path = tmp_path / "rollouts.jsonl"
    VerlRolloutWriter(path).write(verl_batch["data"])
    run = tmp_path / "anchors"
    args = ["anchors", "--ckpt", str(verl_batch["ckpt"]), "--data", str(path), "--out", str(run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    data = verl_batch["data"]
    plain = data.batch["advantages"].clone()
    sha = tokenizer_hash(verl_batch["processor"])
    stats = weight_dataproto(data, VerlWeighting.from_path(run, tokenizer_sha1=sha))
    assert stats["vlmcredit/rows_found"] == 4 and stats["vlmcredit/rows_missed"] == 0

    signals = read_signals(run)
    w = torch.zeros_like(plain)
    for b, (sample, response) in enumerate(zip(SAMPLES, verl_batch["responses"], strict=True)):
        found = signals.lookup(sample, response.tolist())
        assert found is not None
        w[b, : len(response)] = torch.tensor(np.array(found))
    assert (w == 0).any() and (w == 1).any()
    torch.testing.assert_close(data.batch["advantages"], plain * w)
    # VERL's vanilla loss: per-token gradients of the weighted batch are w times the plain ones.
    from verl.workers.config import ActorConfig

    config = ActorConfig(
        strategy="fsdp", ppo_mini_batch_size=4, rollout_n=1, ppo_micro_batch_size_per_gpu=1
    )
    mask = data.batch["response_mask"].bool()
    grads = []
    for adv in (data.batch["advantages"], plain):
        log_prob = torch.full(plain.shape, -1.0, requires_grad=True)
        loss, _ = core_algos.get_policy_loss_fn("vanilla")(
            old_log_prob=torch.full(plain.shape, -1.0),
            log_prob=log_prob,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode="token-sum",
            config=config,
        )
        loss.backward()
        grads.append(log_prob.grad)
    torch.testing.assert_close(grads[0], w * grads[1])


def test_generation_dump_reader(tmp_path: Path) -> None:
    dump = tmp_path / "3.jsonl"
    rows = [
        {
            "input": "What is shown?",
            "output": "red",
            "gts": None,
            "score": 1.0,
            "step": 3,
            "uid": "6f1c_0_0",
        },
        {
            "input": "What is shown?",
            "output": "blue",
            "gts": None,
            "score": 0.0,
            "step": 3,
            "uid": "6f1c_1_0",
        },
    ]
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_generation_dump(dump)
    assert [(r["id"], r["completion_index"], r["response"]) for r in got] == [
        ("6f1c", 0, "red"),
        ("6f1c", 1, "blue"),
    ]
    assert all("response_ids" not in r for r in got)
    legacy = tmp_path / "legacy.jsonl"  # the legacy trainer's dump has no uid column
    legacy.write_text(json.dumps({"input": "q", "output": "a", "score": 1.0, "step": 1}) + "\n")
    with pytest.raises(VlmCreditError, match=r"legacy.jsonl line 1: not a VERL generation dump"):
        read_generation_dump(legacy)
