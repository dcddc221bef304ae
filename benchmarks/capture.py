"""Capture vs plain SDPA vs eager `output_attentions`, interleaved in one process.

Time: every mode runs on the same model and input in ONE process, in rounds; each round runs
every mode once in a freshly shuffled order, after one warm-up forward per mode (the SDPA and
eager references included). Each ratio is taken within a round (mode / sdpa of that round), so
load drift on a shared machine hits both sides; printed as min / median / max over rounds.
On the CPU the time is the process's CPU time with one thread (`--threads 1`), which a busy
neighbour inflates far less than wall time; on CUDA it is wall time after a synchronize.

Memory (CPU): one fresh child process per mode, reading the kernel's peak RSS (VmHWM, reset
through /proc/self/clear_refs) around a single forward. A fresh process has no memory that
glibc kept from earlier forwards, so the rise is what the forward really needed (in-process
readings after a warm-up are fooled by retained arenas). CUDA: torch's peak allocated bytes.

Modes: sdpa (reference), capture-mean, capture-heads (fp32 store), capture-heads-bf16 (bf16
store), portable (capture-heads with `kernel_lse=False`: plain SDPA + full-row recompute, the
fallback path), eager. Every mode computes the logits of the last position only
(`logits_to_keep=1`, as `vlmcredit capture` does).

    python benchmarks/capture.py                           # CPU, mid config, S = 1024..4096
    python benchmarks/capture.py --seq 8192 --modes sdpa capture-mean capture-heads
    python benchmarks/capture.py --preset 7b --device cuda --dtype bf16 --seq 4096 8192

Sizes follow S: T = S/4 response tokens, N ~ 0.7 S image tokens (one square-ish image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS: dict[str, dict[str, Any]] = {
    # A few-MB model for the quick test that this script runs (tests/test_benchmarks_gpu.py).
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
        "vision": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                       out_hidden_size=64),
        "mrope": [2, 3, 3],  # head_dim 16 -> sections sum to 8
    },
    # Mid-size: hidden 512, 8 layers, 8 heads / 2 kv heads; small vision tower.
    "mid": {
        "text": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=4096),
        "vision": dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                       out_hidden_size=512),
        "mrope": [8, 12, 12],  # head_dim 64 -> sections sum to 32
    },
    # Full-size Qwen2.5-VL-7B (random weights): text and vision tower at their real sizes.
    "7b": {
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=3584),
        "mrope": [16, 24, 24],
    },
}  # fmt: skip
MODES = ("sdpa", "capture-mean", "capture-heads", "capture-heads-bf16", "portable", "eager")


def build_model(preset: str, dtype: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    p = PRESETS[preset]
    vocab = p["text"]["vocab_size"]
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config={
            **p["text"],
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": p["mrope"]},
        },
        vision_config={
            **p["vision"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 112, "fullatt_block_indexes": [p["vision"]["depth"] - 1],
        },
        image_token_id=vocab - 3, video_token_id=vocab - 2,
        vision_start_token_id=vocab - 5, vision_end_token_id=vocab - 4,
    )  # fmt: skip
    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
    model.eval()
    return model, config


def build_inputs(config: Any, seq: int, device: str, dtype: Any = None) -> tuple[dict, list]:
    """One sequence of ~`seq` tokens: T = seq/4 response tokens, ~0.7 seq image tokens."""
    import torch

    from vlmcredit.models.families import ModelGeometry
    from vlmcredit.models.layout import build_layouts, build_mm_token_type_ids

    response = seq // 4
    side = int(math.sqrt(0.7 * seq))
    rows, cols = side, int(0.7 * seq) // side
    n_img = rows * cols
    prompt_text = seq - n_img - 2 - response
    if prompt_text < 2:
        raise SystemExit(f"--seq {seq} too short")
    gen = torch.Generator().manual_seed(1)
    vocab = config.text_config.vocab_size - 8
    ids = torch.cat(
        [
            torch.randint(0, vocab, (prompt_text // 2,), generator=gen),
            torch.tensor([config.vision_start_token_id]),
            torch.full((n_img,), config.image_token_id),
            torch.tensor([config.vision_end_token_id]),
            torch.randint(0, vocab, (prompt_text - prompt_text // 2 + response,), generator=gen),
        ]
    )[None]
    grid = torch.tensor([[1, rows * 2, cols * 2]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=gen)
    geo = ModelGeometry.from_config(config)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": build_mm_token_type_ids(ids, geo).long(),
        "pixel_values": pixels if dtype is None else pixels.to(dtype),
        "image_grid_thw": grid,
    }
    length = ids.shape[1]
    layouts = build_layouts(ids, None, grid, geo, [(length - response, length)])
    return {k: v.to(device) for k, v in inputs.items()}, layouts


def make_forward(model: Any, mode: str, inputs: dict, layouts: list) -> Callable[[], Any]:
    """One forward of `mode`; returns what it keeps (the capture result, eager's matrices)."""
    import torch

    from vlmcredit.probes.capture import CaptureSpec, capture_session
    from vlmcredit.probes.response_attention import row_targets

    targets = row_targets(layouts, inputs["input_ids"].device)
    spec = {
        "capture-mean": CaptureSpec(reduce="mean"),
        "capture-heads": CaptureSpec(reduce="heads"),
        "capture-heads-bf16": CaptureSpec(reduce="heads", store_dtype="bf16"),
        "portable": CaptureSpec(reduce="heads", kernel_lse=False),
    }.get(mode)

    def forward() -> Any:
        model.model.rope_deltas = None
        with torch.no_grad():
            if spec is not None:
                with capture_session(model, spec, targets) as session:
                    model(**inputs, logits_to_keep=1)
                    return session.result(0).attention
            if mode == "eager":
                model.set_attn_implementation("eager")
                try:
                    return model(**inputs, output_attentions=True, logits_to_keep=1).attentions
                finally:
                    model.set_attn_implementation("sdpa")
            return model(**inputs, logits_to_keep=1).logits

    return forward


def interleaved(
    forwards: dict[str, Callable[[], Any]], rounds: int, cuda: bool, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per mode per round: one warm-up each, then `rounds` shuffled rounds."""
    import torch

    clock = time.perf_counter if cuda else time.process_time
    rng = random.Random(seed)
    for fn in forwards.values():  # warm-up, every mode (the references too)
        fn()
    times: dict[str, list[float]] = {m: [] for m in forwards}
    for _ in range(rounds):
        order = list(forwards)
        rng.shuffle(order)
        for mode in order:
            if cuda:
                torch.cuda.synchronize()
            t0 = clock()
            kept = forwards[mode]()
            if cuda:
                torch.cuda.synchronize()
            times[mode].append(clock() - t0)
            del kept
    return times


def ratios(times: dict[str, list[float]], ref: str = "sdpa") -> dict[str, list[float]]:
    """Per-round ratio against the reference measured in the same round."""
    return {m: [t / r for t, r in zip(ts, times[ref], strict=True)] for m, ts in times.items()}


def growth_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y over log x (None with < 2 positive points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


# -- memory: one fresh process per mode ------------------------------------------------------
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one forward of `args.child` in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    model, config = build_model(args.preset, args.dtype, args.device)
    inputs, layouts = build_inputs(config, args.seq_len, args.device)
    forward = make_forward(model, args.child, inputs, layouts)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        kept = forward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        base = _status_bytes("VmRSS")
        kept = forward()
        peak = _status_bytes("VmHWM")
    # The capture's kept result (the logits of sdpa and eager's matrices are not "a result").
    keeps = args.child.startswith("capture") or args.child == "portable"
    result = kept.numel() * kept.element_size() if keeps else 0
    return {"mode": args.child, "extra": peak - base, "result": result}


def measure_memory(args: argparse.Namespace, seq: int, modes: list[str]) -> dict[str, dict]:
    out = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode, "--seq-len", str(seq),
               "--preset", args.preset, "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads)]  # fmt: skip
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            out[mode] = {"mode": mode, "error": tail}
        else:
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# -- report -----------------------------------------------------------------------------------
def _mmm(values: list[float], spec: str = ".3f") -> str:
    if not values:
        return "-"
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{lo:{spec}} / {mid:{spec}} / {hi:{spec}}"


def report_time(seq: int, shape: tuple[int, int], times: dict[str, list[float]]) -> None:
    r = ratios(times)
    print(f"\nS={seq} T={shape[0]} N={shape[1]}  (seconds and ratio to sdpa: min / median / max)")
    print(f"{'mode':<20} {'seconds':>26} {'time / sdpa':>26}")
    for mode, ts in times.items():
        print(f"{mode:<20} {_mmm(ts):>26} {_mmm(r[mode]):>26}")


def report_memory(mem: dict[str, dict]) -> None:
    print(f"{'mode':<20} {'extra MiB':>10} {'result MiB':>11} {'beyond sdpa+result':>19}")
    base = mem.get("sdpa", {}).get("extra")
    eager = mem.get("eager", {}).get("extra")
    for mode, row in mem.items():
        if "error" in row:
            print(f"{mode:<20} failed: {row['error']}")
            continue
        line = f"{mode:<20} {row['extra'] / 2**20:>10.0f} {row['result'] / 2**20:>11.0f}"
        if base is not None and row["result"]:
            beyond = (row["extra"] - base - row["result"]) / row["result"]
            line += f" {beyond:>18.1%} of result"
            if eager is not None and eager > base:
                line += f"; {(row['extra'] - base) / (eager - base):.1%} of eager's extra"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--no-memory", action="store_true", help="Time only.")
    parser.add_argument("--eager-max-seq", type=int, default=4096, help="Skip eager above.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(args)))
        return
    import torch

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, config = build_model(args.preset, args.dtype, args.device)
    print(
        f"preset={args.preset} device={args.device} dtype={args.dtype} threads={args.threads} "
        f"rounds={args.rounds} torch={torch.__version__} load={os.getloadavg()[0]:.2f}"
    )
    extra: dict[str, list[float]] = {}
    seqs = []
    for seq in args.seq:
        modes = [
            m for m in args.modes if m != "sdpa" and (m != "eager" or seq <= args.eager_max_seq)
        ]
        inputs, layouts = build_inputs(config, seq, args.device)
        forwards = {m: make_forward(model, m, inputs, layouts) for m in ["sdpa", *modes]}
        times = interleaved(forwards, args.rounds, cuda)
        shape = (layouts[0].num_response_tokens, int(layouts[0].image_positions.size))
        report_time(int(inputs["input_ids"].shape[1]), shape, times)
        seqs.append(float(inputs["input_ids"].shape[1]))
        for mode, ts in times.items():
            diffs = [t - r for t, r in zip(ts, times["sdpa"], strict=True)]
            extra.setdefault(mode, []).append(statistics.median(diffs))
        if not args.no_memory:
            report_memory(measure_memory(args, seq, ["sdpa", *modes]))
        print(f"load after S={seq}: {os.getloadavg()[0]:.2f}")
        del forwards, inputs
    if len(seqs) > 1:
        print("\nextra time over sdpa (median of per-round differences), growth exponent in S:")
        for mode, ys in extra.items():
            if mode == "sdpa" or len(ys) != len(seqs):
                continue
            k = growth_exponent(seqs, ys)
            cells = "  ".join(f"S={int(s)}: {y:.3f}s" for s, y in zip(seqs, ys, strict=True))
            print(f"{mode:<20} {cells}  exponent {'-' if k is None else f'{k:.2f}'}")


if __name__ == "__main__":
    main()
