"""probe-heads wall time: one process vs `torchrun --nproc-per-node N` on the same MME set.

Each timed run is the real command in a fresh process tree, writing a fresh run folder:

  1   python -m vlmcredit probe-heads ...                      (OMP_NUM_THREADS=1)
  N   torchrun --standalone --nproc-per-node N -m vlmcredit probe-heads ...
                                                              (OMP_NUM_THREADS=1 in every rank)

for two sets of the same synthetic MME folder and model (the tiny qwen3-vl checkpoint with its
yes/no rows rewritten, as in tests/pipelines/test_distributed.py; `--mode layer-head`):

  compute    every question (--images-per-category x 14 categories x 2), `--generate`
  startup    `--max-questions` of them, logit answering: the configurations take a second or
             two, so starting Python, importing torch and loading the model dominate

Rounds are interleaved (1,N then N,1, ...), after one warm-up run of each mode. Besides the
wall time, every run's manifest timing is read back: `compute` is the busiest rank's own work
(encoding the questions, the gray copies, the mean pass, its share of the configurations; with
one process all of it), `fixed` = wall - compute: interpreter start, imports, model load,
rendezvous, reading MME, merging and writing the tables, exit. The two runs' heads.json are
compared byte for byte (both do the same work).

    python benchmarks/distributed_probe_heads.py                    # CPU, 2 processes, 3 rounds
    python benchmarks/distributed_probe_heads.py --device cuda --procs 8 --ckpt Qwen/...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load() -> tuple[float, ...]:
    """`uptime`'s load averages: the machine may be shared, and the table means little if busy."""
    return tuple(round(x, 2) for x in os.getloadavg())


def command(procs: int, args: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "vlmcredit", "probe-heads", *args]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", f"--nproc-per-node={procs}", "-m", "vlmcredit",
            "probe-heads", *args]  # fmt: skip


def run_once(procs: int, args: list[str], out: Path, env: dict[str, str]) -> dict[str, float]:
    """One timed run; its wall time, the busiest rank's own compute, and heads.json."""
    t0 = time.perf_counter()
    result = subprocess.run(command(procs, [*args, "--out", str(out)]), env=env,
                            capture_output=True, text=True, check=False)  # fmt: skip
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"{procs} process(es) failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    timing = manifest["timing"]
    units = manifest["configurations"]
    ranks = timing.get("ranks") or [{k: v for k, v in timing.items() if k != "configurations"}]
    # a fresh run deals unit i to rank i % procs (pipelines/skeleton.shares)
    busy = []
    for r, own in enumerate(ranks):
        share = sum(timing["configurations"][u] for i, u in enumerate(units) if i % procs == r)
        busy.append(share + sum(v for k, v in own.items() if isinstance(v, int | float)))
    heads = (out / "heads.json").read_text()
    shutil.rmtree(out)
    compute = max(busy)
    return {"wall": wall, "compute": compute, "fixed": wall - compute, "heads": heads}


def measure(name: str, args: list[str], procs: int, rounds: int, tmp: Path,
            env: dict[str, str]) -> dict[int, list[dict]]:  # fmt: skip
    modes = [1, procs]
    for mode in modes:  # warm-up: page cache, compiled kernels on disk, the built checkpoint
        run_once(mode, args, tmp / f"{name}-warm-{mode}", env)
    results: dict[int, list[dict]] = {1: [], procs: []}
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            results[mode].append(run_once(mode, args, tmp / f"{name}-{r}-{mode}", env))
            print(f"  {name} round {r} {mode} proc: {results[mode][-1]['wall']:.1f} s", flush=True)
    return results


def table(name: str, results: dict[int, list[dict]], procs: int) -> None:
    def mmm(values: list[float]) -> str:
        return f"{min(values):7.2f} {statistics.median(values):8.2f} {max(values):7.2f}"

    print(f"\n{name}")
    print(f"{'processes':<10} {'wall min':>8} {'median':>8} {'max':>7}   {'compute min':>11} "
          f"{'median':>8} {'max':>7}   {'fixed min':>9} {'median':>8} {'max':>7}")  # fmt: skip
    for mode in (1, procs):
        rows = results[mode]
        print(f"{mode:<10} {mmm([r['wall'] for r in rows])}   "
              f"{mmm([r['compute'] for r in rows]):>28}   "
              f"{mmm([r['fixed'] for r in rows]):>26}")  # fmt: skip

    def med(mode: int, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    def least(mode: int) -> float:
        return min(r["wall"] for r in results[mode])

    same = {r["heads"] for mode in (1, procs) for r in results[mode]}
    print(f"speed-up {procs} vs 1 (median wall): {med(1, 'wall') / med(procs, 'wall'):.2f}x; "
          f"min wall: {least(1) / least(procs):.2f}x; "
          f"compute only (median): {med(1, 'compute') / med(procs, 'compute'):.2f}x; "
          f"heads.json identical in all runs: {len(same) == 1}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images-per-category", type=int, default=7, help="x 28 questions")
    parser.add_argument("--startup-questions", type=int, default=24)
    parser.add_argument("--sets", nargs="+", default=["compute", "startup"],
                        choices=["compute", "startup"])  # fmt: skip
    parser.add_argument("--ckpt", default=None, help="default: tiny qwen3-vl with yes/no rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--mode", default="layer-head")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from vlmcredit.data.mme_synth import write_synthetic_mme

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="vlmcredit-dist-bench-"))
    try:
        mme = tmp / "mme"
        write_synthetic_mme(mme, args.images_per_category, seed=4)
        ckpt = args.ckpt
        if ckpt is None:
            from vlmcredit.models.tiny import make_tiny
            from vlmcredit.probes.tiny_answerer import yes_no_checkpoint

            ckpt = str(yes_no_checkpoint(make_tiny("qwen3-vl", tmp / "raw"), tmp / "yn", mme))
        common = ["--ckpt", ckpt, "--mme", str(mme), "--mode", args.mode, "--device", args.device,
                  "--dtype", args.dtype, "--batch-size", str(args.batch_size),
                  "--threshold", "300", "--quiet"]  # fmt: skip
        sets = {
            "compute": [*common, "--generate"],
            "startup": [*common, "--max-questions", str(args.startup_questions)],
        }
        import torch

        print(f"{os.uname().machine}, torch {torch.__version__}, {os.cpu_count()} CPUs, device "
              f"{args.device}, 1 thread per process, {args.rounds} rounds; load average at "
              f"start {load()}")  # fmt: skip
        results = {name: measure(name, sets[name], args.procs, args.rounds, tmp, env)
                   for name in args.sets}  # fmt: skip
        for name in args.sets:
            extra = "--generate, all questions" if name == "compute" else (
                f"logits, --max-questions {args.startup_questions}")  # fmt: skip
            table(f"{name} set ({extra}; {args.images_per_category * 28} questions in the MME "
                  "folder)", results[name], args.procs)  # fmt: skip
        print(f"\nload average at end {load()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
