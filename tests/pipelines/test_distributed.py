"""Data-parallel runs under torchrun (gloo, 2 CPU processes) write what one process writes; a
failing rank fails the run naming it; a model split by a device map captures the same numbers.

Every run here is a real `torchrun --nproc-per-node 2 -m vlmcredit ...` (or `python -m vlmcredit`
for the one-process reference) in a subprocess, with OMP_NUM_THREADS=1 in both so the two do the
same floating-point work; results are compared exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.run import Run
from vlmcredit.pipelines.distributed import FAIL_AT_START_ENV
from vlmcredit.pipelines.skeleton import CRASH_ENV, FAIL_RANK_ENV

pytestmark = pytest.mark.slow

FAMILY = "qwen2.5-vl"
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    """5 rollouts over 2 images: 3 batches of 2 (the last short), so the ranks get 2 and 1."""
    folder = tmp_path_factory.mktemp("dist-rollouts")
    noise_image(84, 112, 1).save(folder / "a.png")
    noise_image(112, 84, 2).save(folder / "b.png")
    texts = [
        "A noisy picture of dots.",
        "Static everywhere, red and green.",
        "Nothing to see but grain.",
        "Two colours mixed at random.",
        "It looks like an old television.",
    ]
    rows = [
        {"id": f"r{i}", "images": ["a.png" if i % 2 else "b.png"], "prompt": "Describe.",
         "response": text}
        for i, text in enumerate(texts)
    ]  # fmt: skip
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(CRASH_ENV, None)
    env.pop(FAIL_RANK_ENV, None)
    env.pop(FAIL_AT_START_ENV, None)
    env.setdefault("VLMCREDIT_DIST_TIMEOUT", "300")
    return {**env, **extra}


def _vlmcredit(
    procs: int, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """`python -m vlmcredit ARGS` (procs 1) or `torchrun --nproc-per-node N -m vlmcredit ARGS`."""
    if procs == 1:
        cmd = [sys.executable, "-m", "vlmcredit", *args]
    else:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={procs}", "-m", "vlmcredit",
               *args]  # fmt: skip
    return subprocess.run(
        cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _same_tensors(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    """Both runs hold the same rows (apart from where the shard lies) and identical tensors."""
    run_a, run_b = Run.load(a), Run.load(b)
    assert run_a.manifest["status"] == run_b.manifest["status"] == "finished"
    rows_a = [{k: v for k, v in r.items() if k != "shard"} for r in run_a.rows]
    rows_b = [{k: v for k, v in r.items() if k != "shard"} for r in run_b.rows]
    assert json.dumps(rows_a, default=str) == json.dumps(rows_b, default=str)
    for row in run_a.rows:
        if row["status"] != "done":
            continue
        ta, tb = run_a.tensors(row["id"]), run_b.tensors(row["id"])
        assert sorted(ta) == sorted(tb)
        for name in ta:
            if name not in skip:
                assert torch.equal(ta[name], tb[name]), (row["id"], name)


def _split_across_ranks(run_dir: Path) -> None:
    """Rank 1 wrote shards of its own under rank-1/, and its rows table was merged away."""
    rows = Run.load(run_dir).rows
    shards = {r["shard"] for r in rows if isinstance(r.get("shard"), str)}
    assert any(s.startswith("rank-1/") for s in shards), shards
    assert any("/" not in s for s in shards), shards
    assert not (run_dir / "rank-1" / "samples.parquet").exists()
    assert not list(run_dir.glob(".rank-*"))
    assert json.loads((run_dir / "manifest.json").read_text())["processes"] == 2


def test_capture_two_ranks_equals_one_and_resumes_per_rank(tiny_ckpt, rollouts, tmp_path):
    common = ["capture", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts),
              "--batch-size", "2", "--reduce", "heads", "--quiet"]  # fmt: skip
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _ok(_vlmcredit(1, *common, "--out", str(one)))
    _ok(_vlmcredit(2, *common, "--out", str(two)))
    _same_tensors(one, two)
    _split_across_ranks(two)
    # every rank dies (kill -9 style) after its first commit; the rerun finishes the rest
    crashed = _vlmcredit(2, *common, "--out", str(killed), env=_env(**{CRASH_ENV: "1"}))
    assert crashed.returncode != 0
    partial = Run.load(killed)
    assert partial.manifest["status"] == "running"
    assert (killed / "rank-1" / "samples.parquet").exists()  # rank 1's commit, not merged yet
    _ok(_vlmcredit(2, *common, "--out", str(killed), "--resume"))
    _same_tensors(one, killed)


def test_anchors_two_ranks_equals_one(tiny_ckpt, rollouts, tmp_path):
    common = ["anchors", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts),
              "--batch-size", "2", "--quiet"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_vlmcredit(1, *common, "--out", str(one)))
    _ok(_vlmcredit(2, *common, "--out", str(two)))
    _same_tensors(one, two, skip=("timing",))
    _split_across_ranks(two)
    for table in ("anchors.parquet", "signals.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(one / table), pd.read_parquet(two / table))
    a, b = (json.loads((run / "anchors.json").read_text()) for run in (one, two))
    for report in (a, b):
        report.pop("timing", None)
    assert a == b


def test_weights_two_ranks_equals_one(tiny_ckpt, rollouts, tmp_path):
    common = ["weights", "--method", "anchors,kawhi", "-p", "kawhi.heads=all",
              "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts), "--batch-size", "2",
              "--quiet"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_vlmcredit(1, *common, "--out", str(one)))
    _ok(_vlmcredit(2, *common, "--out", str(two)))
    _same_tensors(one, two, skip=("wall_seconds",))  # each batch's own wall time
    _split_across_ranks(two)
    for method in ("anchors", "kawhi"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(one / method / "signals.parquet"),
            pd.read_parquet(two / method / "signals.parquet"),
        )


@pytest.fixture(scope="module")
def mme(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-mme")
    args = ["mme-synth", "--out", str(root / "set"), "--images-per-category", "1", "--seed", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "set"


def test_probe_heads_two_ranks_equals_one(tiny_ckpt, mme, tmp_path):
    from vlmcredit.probes.tiny_answerer import yes_no_checkpoint

    ckpt = yes_no_checkpoint(tiny_ckpt("qwen3-vl"), tmp_path / "yn", mme)
    common = ["probe-heads", "--ckpt", str(ckpt), "--mme", str(mme), "--ablation", "mean",
              "--batch-size", "5", "--threshold", "300", "--quiet"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_vlmcredit(1, *common, "--out", str(one)))
    _ok(_vlmcredit(2, *common, "--out", str(two)))
    # heads.json holds no timing fields: byte for byte the same
    assert (one / "heads.json").read_text() == (two / "heads.json").read_text()
    pd.testing.assert_frame_equal(
        pd.read_parquet(one / "heads.parquet"), pd.read_parquet(two / "heads.parquet")
    )
    units = json.loads((one / "manifest.json").read_text())["configurations"]
    assert len(units) == 6  # baseline, gray image, 4 heads: 3 per rank
    for unit in units:
        pd.testing.assert_frame_equal(
            pd.read_parquet(one / "predictions" / f"{unit}.parquet"),
            pd.read_parquet(two / "predictions" / f"{unit}.parquet"),
        )
    # the mean-ablation reference is computed once (rank 0) and stored once
    assert torch.equal(
        Run.load(one).tensors("means")["value"], Run.load(two).tensors("means")["value"]
    )
    rows = [r["id"] for r in Run.load(two).rows]
    assert rows == [r["id"] for r in Run.load(one).rows] and rows.count("means") == 1
    manifest = json.loads((two / "manifest.json").read_text())
    assert sorted(manifest["timing"]["configurations"]) == sorted(units)  # every rank's units
    assert len(manifest["timing"]["ranks"]) == 2


def test_a_failing_rank_fails_the_run_naming_it(tiny_ckpt, rollouts, tmp_path):
    out = ["--out", str(tmp_path / "run")]
    common = ["capture", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts),
              "--batch-size", "1", "--no-qk", "--quiet", *out]  # fmt: skip
    failed = _vlmcredit(2, *common, env=_env(**{FAIL_RANK_ENV: "1"}))
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "rank 1 fails on purpose" in output
    assert "rank 1 failed: rank 1 fails on purpose" in output  # what rank 0 says
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("rank 1 failed")
    # the same command continues the failed run and finishes it
    _ok(_vlmcredit(2, *common))
    run = Run.load(tmp_path / "run")
    assert run.manifest["status"] == "finished"
    assert [r["id"] for r in run.rows] == [f"r{i}" for i in range(5)]


def test_a_rank_failing_on_its_own_ends_the_run_without_waiting(tiny_ckpt, rollouts, tmp_path):
    """Rank 1 fails before the run is opened while rank 0 waits for it in an exchange: rank 1
    exits at once (no farewell barrier) and torchrun ends rank 0, naming rank 1; nobody sits
    out the 20-minute timeout (the subprocess limit is 10 minutes)."""
    env = _env(**{FAIL_AT_START_ENV: "1", "VLMCREDIT_DIST_TIMEOUT": "1200"})
    args = ["capture", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts), "--quiet",
            "--out", str(tmp_path / "run")]  # fmt: skip
    result = _vlmcredit(2, *args, env=env, timeout=600)
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    root_cause = result.stderr.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause, result.stderr[-2000:]


def test_a_rank_whose_peers_never_come_fails_within_the_timeout(tiny_ckpt, rollouts, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(
        WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), VLMCREDIT_DIST_TIMEOUT="5",
    )  # fmt: skip
    args = ["capture", "--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(rollouts), "--quiet",
            "--out", str(tmp_path / "run")]  # fmt: skip
    result = _vlmcredit(1, *args, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "rank 0 of 2: could not join the other ranks" in result.stderr
    assert not (tmp_path / "run").exists()


_FAREWELL = """
import json, sys, time
import torch.distributed as dist
from vlmcredit.pipelines import distributed

me = distributed.join(backend=sys.argv[1])
try:  # why the barrier needs its own group: torch refuses it on a combined-backend group
    dist.monitored_barrier()
    default_group = "ok"
except ValueError as exc:
    default_group = str(exc)
if me.rank == 1:
    time.sleep(2.0)  # rank 0 must wait for this rank at the farewell barrier
distributed.leaving_together()
t0 = time.perf_counter()
distributed._leave()
report = {"waited": time.perf_counter() - t0, "initialized": dist.is_initialized(),
          "default_group": default_group}
with open(sys.argv[2] + f"/rank-{me.rank}.json", "w") as f:
    json.dump(report, f)
"""


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo"])
def test_the_farewell_barrier_holds_on_a_combined_backend(backend, tmp_path) -> None:
    """GPU runs join with "cpu:gloo,cuda:nccl"; `dist.monitored_barrier` accepts only a group
    whose backend is exactly gloo, so the farewell barrier runs on a gloo subgroup there. The
    combined form "cpu:gloo" takes the same path on CPU: rank 0 still waits for rank 1, and
    nothing raises."""
    script = tmp_path / "farewell.py"
    script.write_text(_FAREWELL)
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", str(script), backend,
           str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["waited"] >= 1.5, reports  # held until rank 1 came
    assert not any(r["initialized"] for r in reports)  # every group destroyed
    expected = "ok" if backend == "gloo" else "monitored_barrier is only implemented for GLOO"
    assert all(r["default_group"].startswith(expected) for r in reports), reports


# -- in-process checks ----------------------------------------------------------------------------
def test_commands_that_do_not_split_refuse_torchrun(monkeypatch, tmp_path) -> None:
    from vlmcredit.pipelines.distributed import rank_device
    from vlmcredit.pipelines.skeleton import refuse_taken

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(VlmCreditError, match="rank 1 of 2: this command does not share its work"):
        refuse_taken(tmp_path / "out", resume=False)
    with pytest.raises(VlmCreditError, match="--device-map auto under torchrun"):
        rank_device(None, "auto")
    with pytest.raises(VlmCreditError, match="--device cuda:1 under torchrun"):
        rank_device("cuda:1", None)
    assert rank_device("cpu", None) == "cpu" and rank_device(None, None) is None
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(VlmCreditError, match="WORLD_SIZE=2 RANK=2 LOCAL_RANK=1: inconsistent"):
        rank_device(None, None)


def test_orphans_of_a_killed_rank_are_dropped_and_tables_merged(tmp_path) -> None:
    """Rank 0's open (and a one-process resume) folds the ranks' tables in, drops the shards no
    row names, and keeps the first row of an id written twice."""
    out = tmp_path / "run"
    run = Run.open(out, "capture", {"a": 1}, resume=False)
    run.commit([{"id": "x", "status": "done"}], {"x/v": torch.ones(2)})
    peer = Run.join(out, rank=1, world=2)
    peer.commit([{"id": "y", "status": "done"}], {"y/v": torch.zeros(2)})
    peer.commit([{"id": "x", "status": "done"}])  # a duplicate (kill between merge and unlink)
    (out / "rank-1" / "shard-00007.safetensors").write_bytes(b"half")  # killed mid-commit
    peer.write_manifest()  # a rank > 0 never writes the manifest
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    again = Run.open(out, "capture", {"a": 1}, resume=True)
    assert [r["id"] for r in again.rows] == ["x", "y"]
    assert again.shard_of("y") == "rank-1/shard-00000.safetensors"
    assert torch.equal(again.tensors("y")["v"], torch.zeros(2))
    assert not (out / "rank-1" / "samples.parquet").exists()
    assert not (out / "rank-1" / "shard-00007.safetensors").exists()
    again.order_rows(["y", "x"])
    assert [r["id"] for r in Run.load(out).rows] == ["y", "x"]


def _split_model(folder: Path, offload: Path):
    """The tiny model with its decoder layers split between two places: layer 0 (and the rest
    of the model) in memory, layers 1-2 offloaded to disk and brought in by accelerate's hooks
    at each forward (the dispatch `--device-map auto` uses for layers that do not fit)."""
    from transformers import AutoModelForImageTextToText

    device_map = {
        "model.visual": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "disk",
        "model.language_model.layers.2": "disk",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForImageTextToText.from_pretrained(
        folder,
        dtype=torch.float32,
        device_map=device_map,
        offload_folder=str(offload),
        attn_implementation="sdpa",
    )
    return model.eval()


def test_a_device_map_split_captures_and_ablates_the_same(loaded, tiny_ckpt, tmp_path) -> None:
    from dataclasses import replace

    from vlmcredit.data.sample import Sample
    from vlmcredit.models.inputs import encode_samples
    from vlmcredit.probes.ablation import ablate_heads, head_means
    from vlmcredit.probes.capture import CaptureSpec
    from vlmcredit.probes.response_attention import capture_samples

    plain = loaded(FAMILY)
    split = replace(plain, model=_split_model(tiny_ckpt(FAMILY), tmp_path / "offload"))
    layers = split.model.model.language_model.layers
    assert layers[1].self_attn.o_proj.weight.device.type == "meta"  # really not in place

    # accelerate's hooks load the weights of layers 1-2 at each forward (e.g. o_proj, where
    # the ablation hook sits), and leave layer 0's in place
    assert [layer.self_attn.o_proj._hf_hook.offload for layer in layers] == [False, True, True]
    samples = [
        Sample([noise_image(84, 112, 3)], "Describe.", "Dots of colour everywhere."),
        Sample([noise_image(112, 84, 4)], "What is it?", "Grain."),
    ]
    spec = CaptureSpec(reduce="heads", qk_layers=[0, 2])
    for a, b in zip(capture_samples(plain, samples, spec), capture_samples(split, samples, spec),
                    strict=True):  # fmt: skip
        assert torch.equal(a.capture.attention, b.capture.attention)
        for layer in (0, 2):
            assert torch.equal(a.capture.queries[layer], b.capture.queries[layer])
            assert torch.equal(a.capture.keys[layer], b.capture.keys[layer])
    batch = encode_samples(plain.processor, plain.geometry, samples).inputs
    means = head_means(plain, [batch])
    assert torch.equal(means, head_means(split, [batch]))

    def logits(ck, mode):
        with torch.no_grad(), ablate_heads(ck, [(None, 1), (2, 3)], mode, means):
            inputs = ck.adapter.with_positions(ck.model, dict(batch))
            return ck.model(**inputs).logits

    for mode in ("zero", "mean"):
        ablated = logits(plain, mode)
        assert torch.equal(ablated, logits(split, mode))
        with torch.no_grad():
            unablated = plain.model(**plain.adapter.with_positions(plain.model, dict(batch)))
        assert not torch.allclose(ablated, unablated.logits)  # the hooks did act
