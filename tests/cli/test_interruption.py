"""kill -9 at several points of `weights` and `export` (a real SIGKILL of a subprocess): the
resumed or rerun command ends identical to an uninterrupted one, nothing duplicated; a resumed
weights run's `seconds` and anchors run's `timing` count every invocation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app
from vlmcredit.export.formats import BUILDING
from vlmcredit.pipelines.skeleton import CRASH_ENV

runner = CliRunner()
FAMILY = "qwen2.5-vl"

# Runs the CLI and SIGKILLs itself when a file named KILL_AT=<name>:<before|after> is renamed
# into place (every vlmcredit file and folder is written aside and renamed): a real kill at a
# chosen point, with no cleanup and no finally blocks.
KILLER = """
import os, signal, sys
from pathlib import Path

name, when = os.environ["KILL_AT"].split(":")

def guarded(real):
    def call(src, dst, *args, **kwargs):
        hit = Path(dst).name == name
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(src, dst, *args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call

os.replace, os.rename = guarded(os.replace), guarded(os.rename)
sys.argv = ["vlmcredit", *sys.argv[1:]]
from vlmcredit.cli.main import main
main()
"""


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill-rollouts")
    noise_image(56, 84, 1).save(folder / "a.png")
    noise_image(84, 56, 2).save(folder / "b.png")
    texts = ["Dots, many dots.", "Static noise here.", "A grey field of noise."]
    rows = [
        {"id": f"r{i}", "images": ["ab"[i % 2] + ".png"], "prompt": "Describe.", "response": t}
        for i, t in enumerate(texts)
    ]
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(command: str, ckpt: Path, data: Path) -> list[str]:
    return [command, "--ckpt", str(ckpt), "--data", str(data), "--batch-size", "1", "--quiet"]


def _killed(argv: list[str], **env: str) -> None:
    """Run the CLI in a subprocess that dies by SIGKILL (or the crash switch's exit 137)."""
    if "KILL_AT" in env:
        cmd = [sys.executable, "-c", KILLER, *argv]
    else:
        cmd = [sys.executable, "-m", "vlmcredit.cli.main", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    assert done.returncode in (-signal.SIGKILL, 137), (done.returncode, done.stderr[-2000:])


def _shard_tensors(run: Path, suffix: str) -> list:
    """Every shard tensor whose key ends with `suffix`, in shard order."""
    found = []
    for shard in sorted(run.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="np") as f:
            found += [f.get_tensor(k) for k in f.keys() if k.endswith(suffix)]  # noqa: SIM118
    return found


def _shard_keys(run: Path) -> list[str]:
    keys = []
    for shard in sorted(run.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="np") as f:
            keys.extend(f.keys())
    return keys


@pytest.fixture(scope="module")
def whole(tiny_ckpt, rollouts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill-whole") / "run"
    result = runner.invoke(app, [*_args("weights", tiny_ckpt(FAMILY), rollouts), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "point",
    [{CRASH_ENV: "2"}, {"KILL_AT": "signals.parquet:after"}],
    ids=["after 2 of 3 batches", "after signals.parquet, before the run finished"],
)
def test_weights_killed_then_resumed_equals_uninterrupted(
    point, tiny_ckpt, rollouts, whole, tmp_path
) -> None:
    out = tmp_path / "run"
    args = [*_args("weights", tiny_ckpt(FAMILY), rollouts), "--out", str(out)]
    _killed(args, **point)
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    start = time.perf_counter()
    resumed = runner.invoke(app, [*args, "--resume"])
    resume_seconds = time.perf_counter() - start
    assert resumed.exit_code == 0, resumed.output
    # `seconds` sums both invocations: the killed one's batches (and model loading) too
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["invocations"] == 2 and manifest["seconds"] > resume_seconds
    walls = [t[0] for t in _shard_tensors(out, "/wall_seconds")]
    assert len(walls) == 3 and all(w > 0 for w in walls)
    assert manifest["seconds"] >= sum(walls)
    assert (out / "signals.parquet").read_bytes() == (whole / "signals.parquet").read_bytes()
    ids = pd.read_parquet(out / "samples.parquet")["id"].tolist()
    assert ids == pd.read_parquet(whole / "samples.parquet")["id"].tolist()
    assert len(ids) == len(set(ids)) == 3  # nothing duplicated, nothing lost
    keys = _shard_keys(out)
    assert sorted(keys) == sorted(_shard_keys(whole)) and len(keys) == len(set(keys))
    assert not list(out.glob(".*.*"))  # no temporary file of the kill is left


@pytest.mark.parametrize("point", ["signals.parquet:after", "README.md:after"])
def test_export_killed_leaves_no_output_and_a_rerun_works(point, whole, tmp_path) -> None:
    reference = tmp_path / "reference"
    assert runner.invoke(app, ["export", str(whole), "--out", str(reference)]).exit_code == 0
    out = tmp_path / "out"
    _killed(["export", str(whole), "--out", str(out)], KILL_AT=point)
    assert not out.exists()  # the folder appears whole (one rename) or not at all
    leftovers = list(tmp_path.glob(".out.*"))
    assert len(leftovers) == 1 and (leftovers[0] / BUILDING).is_file()  # killed mid-way
    rerun = runner.invoke(app, ["export", str(whole), "--out", str(out)])
    assert rerun.exit_code == 0, rerun.output
    assert not list(tmp_path.glob(".out.*"))  # the killed export's scratch folder is gone
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in ("signals.parquet",):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (out, reference)]
    for m in manifests:
        m.pop("created")
    assert manifests[0] == manifests[1]


def test_resumed_anchors_timing_counts_every_invocation(tiny_ckpt, rollouts, tmp_path) -> None:
    out = tmp_path / "run"
    args = [*_args("anchors", tiny_ckpt(FAMILY), rollouts), "--out", str(out)]
    _killed(args, **{CRASH_ENV: "1"})
    start = time.perf_counter()
    resumed = runner.invoke(app, [*args, "--resume"])
    resume_seconds = time.perf_counter() - start
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "anchors.json").read_text())
    timing = summary["timing"]
    assert summary["invocations"] == 2
    # the killed invocation's batch (model loading included) is in the total: more than this
    # invocation alone took, and at least its parts
    assert timing["total"] > resume_seconds
    assert timing["total"] >= timing["capture"] + timing["graph"] + timing["cluster"]
    walls = [t[3] for t in _shard_tensors(out, "/timing")]
    assert len(walls) == 3 and all(w > 0 for w in walls)
    assert timing["total"] >= sum(walls)
