"""experiments/credit_ablation.py: the smoke run trains every arm with real TRL GRPO steps.

The model is the shipped built-in (`builtin:tiny-qwen2.5-vl`) when the package holds it, else an
untrained model of the same architecture and tokenizer (`train_tiny.build_parts`). The smoke run
(2 steps per arm, one seed, tiny evaluation) must write every result file within a minute of CPU
time, log TRL's grad norm and vlmcredit's metrics for every step, and give the anchors / low /
random arms the same token share (< 1) on the same completions. The anchors arm's weights are
those of `online.weights(method="anchors")`, and `low` picks the least connected non-anchors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import credit_ablation as ca

SMOKE_BUDGET_S = 60.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    from vlmcredit.models.builtin import root

    if (root() / "tiny-qwen2.5-vl" / "config.json").is_file():
        return "builtin:tiny-qwen2.5-vl"
    from vlmcredit.models.tiny import save_checkpoint
    from vlmcredit.pipelines.train_tiny import build_parts

    tokenizer, model, image_processor = build_parts(0)
    folder = tmp_path_factory.mktemp("ablation-ckpt") / "tiny-qwen2.5-vl"
    save_checkpoint(model, tokenizer, image_processor, folder)
    return str(folder)


@pytest.fixture(scope="module")
def smoke(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ablation")
    threads = torch.get_num_threads()
    t0, cpu0 = time.perf_counter(), time.process_time()
    rc = ca.main(["--out", str(out), "--smoke", "--ckpt", ckpt, "--threads", "1"])
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert torch.get_num_threads() == threads  # the run restores the caller's setting

    def lines(name: str) -> list[dict]:
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    return {
        "rc": rc,
        "out": out,
        "elapsed": elapsed,
        "cpu": cpu,
        "steps": lines("steps.jsonl"),
        "evals": lines("evals.jsonl"),
        "probes": lines("probes.jsonl"),
        "summary": json.loads((out / "summary.json").read_text()),
    }


def test_smoke_writes_every_file_within_budget(smoke) -> None:
    assert smoke["rc"] == 0
    for name in (*ca.FILES, *ca.FIGURES):
        assert (smoke["out"] / name).stat().st_size > 0, name
    assert (smoke["out"] / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (smoke["out"] / "accuracy.svg").read_bytes()[:400]
    assert not (smoke["out"] / "trainer").exists()  # TRL's scratch folders are removed
    # CPU time, not wall time: on a shared machine (another job at higher priority) the same
    # work has taken 16 s to 100 s of wall time; alone it is about 16 s of both.
    assert smoke["cpu"] < SMOKE_BUDGET_S, (
        f"smoke run used {smoke['cpu']:.1f}s of CPU ({smoke['elapsed']:.1f}s wall)"
    )


def test_every_arm_ran_its_steps(smoke) -> None:
    summary = smoke["summary"]
    assert summary["skipped"] == {}  # KAWHI runs online on this model
    assert sorted(summary["arms"]) == sorted(ca.ARMS)
    for arm in ca.ARMS:
        rows = [r for r in smoke["steps"] if r["arm"] == arm]
        assert [r["step"] for r in rows] == [1, 2], arm
        assert summary["arms"][arm]["steps_run"] == {"0": 2}
        for r in rows:
            # TRL's own logs reached the records: the optimizer stepped with a measured norm
            assert np.isfinite(r["grad_norm"]) and "loss" in r and "reward" in r
            assert r["wall_s"] > 0
        evals = sorted(e["step"] for e in smoke["evals"] if e["arm"] == arm)
        assert evals == [0, 2]
        ends = [p for p in smoke["probes"] if p["arm"] == arm and p["when"] == "end"]
        assert len(ends) == 1 and ends[0]["tokens"] > 0
    assert summary["arms"]["anchors"]["overhead_vs_plain"]["n"] == 1
    (start,) = [p for p in smoke["probes"] if p["when"] == "start"]
    assert 0 < start["anchor_share"] < 1 and start["bimodality"] >= 0


def test_weights_reached_the_trainer(smoke) -> None:
    by = {(r["arm"], r["step"]): r for r in smoke["steps"]}
    assert not any(k.startswith(("w/", "vlmcredit/")) for k in by[("plain", 1)])
    for arm in ("anchors", "low", "random", "kawhi"):
        for step in (1, 2):
            r = by[(arm, step)]
            # VlmCreditGRPOTrainer ran the weights_fn on the batch it trains on
            assert r["vlmcredit/rows_text_only"] == 0
            assert 0 < r["w/selected_share"] <= 1
    # Step 1: same seed, same checkpoint, so the same completions in every arm; the three
    # selections then take the same number of tokens, a share below 1.
    share = by[("anchors", 1)]["w/selected_share"]
    assert 0 < share < 1
    assert by[("low", 1)]["w/selected_share"] == share
    assert by[("random", 1)]["w/selected_share"] == share
    assert by[("anchors", 1)]["w/selected_anchor_overlap"] == 1.0
    assert by[("low", 1)]["w/selected_anchor_overlap"] == 0.0


@pytest.fixture
def one_thread():
    """One torch thread, as the experiment runs (two stall on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_anchor_arm_is_online_anchors_and_low_is_its_complement(ckpt, one_thread) -> None:
    from vlmcredit import online
    from vlmcredit.models.loading import load_checkpoint

    ck = load_checkpoint(ckpt, dtype="fp32")
    batch = ca.teacher_forced_batch(ck.processor, ca.questions(ca.PROBE_SEED, 1))
    settings = ca.Settings()
    with torch.no_grad():
        anchors = ca.ArmWeights("anchors", settings, 0)(ck.model, batch)
        assert torch.equal(anchors, online.weights(ck.model, batch, method="anchors"))
        low_fn = ca.ArmWeights("low", settings, 0)
        low = low_fn(ck.model, batch)
    mask = batch["response_mask"].bool()
    a, lo = anchors[mask], low[mask]
    assert set(a.unique().tolist()) <= {0.0, 1.0} and set(lo.unique().tolist()) <= {0.0, 1.0}
    assert ((a == 1) & (lo == 1)).sum() == 0  # disjoint
    assert torch.equal((anchors * mask).sum(1), (low * mask).sum(1))  # same count per response
    assert low_fn.last["selected_anchor_overlap"] == 0.0


def test_selection_rules() -> None:
    anchor = np.array([1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    conn = np.array([0.9, 0.1, 0.5, 0.8, 0.1, 0.05, 0.7, 0.3])
    rng = np.random.default_rng(0)
    assert ca.selection("anchors", anchor, conn, rng).tolist() == anchor.tolist()
    # the two least connected non-anchors; the 0.1 tie goes to the earlier token
    assert np.flatnonzero(ca.selection("low", anchor, conn, rng)).tolist() == [1, 5]
    picked = ca.selection("random", anchor, conn, rng)
    assert picked.sum() == 2


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("There is a red circle.\n\nSo the answer is yes.", "yes"),
        ("So the answer is no. No wait, the answer is: YES", "yes"),
        ("the answer is yesterday", None),
        ("Yes", None),
        ("", None),
    ],
)
def test_parse_answer(text: str, want: str | None) -> None:
    assert ca.parse_answer(text) == want


def test_reward_reads_conversational_completions() -> None:
    done = [{"role": "assistant", "content": "So the answer is no."}]
    assert ca.verifiable_reward([done, "the answer is no", "no"], ["no", "yes", "no"]) == [
        1.0,
        0.0,
        0.0,
    ]


def test_held_out_questions_are_new(tmp_path: Path) -> None:
    train = ca.questions(ca.TRAIN_SEED, 3)
    held = ca.questions(ca.EVAL_SEED, 3)
    assert len(train) == len(held) == 3 * 4 * 2
    assert ca.overlap(train, held) == 0
    assert {q.category for q in train[:4]} == set(ca.CATEGORIES)  # interleaved
