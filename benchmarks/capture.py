"""Capture vs plain SDPA vs eager `output_attentions`, side by side on one model and input.

Each mode runs in its own fresh process (same seed, same random-weight model, same input), so
peak-memory readings do not leak between modes. Memory is the rise of the process's peak RSS
(CPU) or of torch's peak allocated memory (CUDA) during the timed forwards, above what the
loaded model and inputs already hold.

    python benchmarks/capture.py                      # CPU, mid-size config (the CI machine)
    python benchmarks/capture.py --preset 7b --device cuda --dtype bf16 --seq 4096 8192

Prints one table and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    # Mid-size: hidden 512, 8 layers, 8 heads / 2 kv heads; small vision tower.
    "mid": {
        "text": dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=4096,
        ),
        "vision": dict(
            depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=512
        ),
        "mrope": [8, 12, 12],  # head_dim 64 -> sections sum to 32
    },
    # Full-size Qwen2.5-VL-7B text config (random weights); real vision tower size.
    "7b": {
        "text": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        "vision": dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584
        ),
        "mrope": [16, 24, 24],
    },
}
MODES = ("sdpa", "capture-heads", "capture-mean", "eager")


def build_model(preset: str, dtype: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    p = PRESETS[preset]
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config={
            **p["text"],
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": p["mrope"],
            },
        },
        vision_config={
            **p["vision"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [p["vision"]["depth"] - 1],
        },
        image_token_id=p["text"]["vocab_size"] - 3,
        video_token_id=p["text"]["vocab_size"] - 2,
        vision_start_token_id=p["text"]["vocab_size"] - 5,
        vision_end_token_id=p["text"]["vocab_size"] - 4,
    )
    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
    model.eval()
    return model, config


def build_inputs(config, seq: int, image_tokens: int, response: int, device: str):
    """input_ids with one square-ish image block; pixel_values matching its grid."""
    import math

    import torch

    from vlmcredit.models.families import ModelGeometry
    from vlmcredit.models.layout import build_layouts, build_mm_token_type_ids

    side = int(math.sqrt(image_tokens))
    rows, cols = side, image_tokens // side
    n_img = rows * cols
    text = seq - n_img - 2
    if text <= response:
        raise SystemExit(f"--seq {seq} too short for {n_img} image tokens + {response} response")
    gen = torch.Generator().manual_seed(1)
    vocab = config.text_config.vocab_size - 8
    prompt_text = text - response
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
    patch_dim = 3 * 2 * 14 * 14
    pixels = torch.randn(int(grid.prod()), patch_dim, generator=gen)
    geo = ModelGeometry.from_config(config)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": build_mm_token_type_ids(ids, geo).long(),
        "pixel_values": pixels,
        "image_grid_thw": grid,
    }
    seq_len = ids.shape[1]
    layouts = build_layouts(ids, None, grid, geo, [(seq_len - response, seq_len)])
    return {k: v.to(device) for k, v in inputs.items()}, layouts


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    import torch

    from vlmcredit.probes.capture import CaptureSpec, capture_session, use_capture_attention
    from vlmcredit.probes.response_attention import row_targets

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, config = build_model(args.preset, args.dtype, args.device)
    inputs, layouts = build_inputs(
        config, args.seq_len, args.image_tokens, args.response, args.device
    )
    cuda = args.device.startswith("cuda")
    if mode == "eager":
        model.set_attn_implementation("eager")
    elif mode.startswith("capture"):
        use_capture_attention(model)
    else:
        model.set_attn_implementation("sdpa")
    spec = CaptureSpec(reduce="heads" if mode == "capture-heads" else "mean")
    targets = row_targets(layouts, args.device)

    def forward():
        model.model.rope_deltas = None
        with torch.no_grad():
            if mode.startswith("capture"):
                with capture_session(model, spec, targets) as session:
                    out = model(**inputs)
                    kept = session.result(0).attention
                return out, kept
            if mode == "eager":
                return model(**inputs, output_attentions=True), None
            return model(**inputs), None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    result = forward()  # warm-up
    del result
    times, extras = [], []
    oom = False
    for _ in range(args.repeats):
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak()
            base = rss_bytes("VmRSS")
        t0 = time.perf_counter()
        try:
            result = forward()
            sync()
        except torch.OutOfMemoryError:
            oom = True
            break
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")
        extras.append(peak - base)
        del result
    return {
        "mode": mode,
        "seconds": statistics.median(times) if times else None,
        "extra_bytes": max(extras) if extras else None,
        "oom": oom,
        "seq_len": int(inputs["input_ids"].shape[1]),
        "image_tokens": int(layouts[0].image_positions.size),
        "response_tokens": layouts[0].num_response_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--seq", type=int, nargs="+", default=[2304])
    parser.add_argument("--image-tokens", type=int, default=1600)
    parser.add_argument("--response", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args, args.child)))
        return
    for seq in args.seq:
        rows = []
        for mode in args.modes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--seq-len",
                str(seq),
                "--preset",
                args.preset,
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--image-tokens",
                str(args.image_tokens),
                "--response",
                str(args.response),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
            )
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                rows.append(
                    {
                        "mode": mode,
                        "seconds": None,
                        "extra_bytes": None,
                        "oom": False,
                        "error": tail[0],
                    }
                )
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        report(args, seq, rows)


def report(args: argparse.Namespace, seq: int, rows: list[dict]) -> None:
    by = {r["mode"]: r for r in rows}
    shape = next((r for r in rows if r.get("seq_len")), {})
    print(
        f"\npreset={args.preset} device={args.device} dtype={args.dtype} "
        f"S={shape.get('seq_len', seq)} image_tokens={shape.get('image_tokens')} "
        f"response_tokens={shape.get('response_tokens')} repeats={args.repeats}"
    )
    print(f"{'mode':<14} {'median s':>10} {'extra MiB':>10} {'time / sdpa':>12}")
    base = by.get("sdpa", {})
    for r in rows:
        secs, extra = r.get("seconds"), r.get("extra_bytes")
        ratio = secs / base["seconds"] if secs and base.get("seconds") else None
        print(
            f"{r['mode']:<14} {_fmt(secs, '.3f'):>10} "
            f"{_fmt(extra / 2**20 if extra is not None else None, '.0f'):>10} "
            f"{_fmt(ratio, '.3f'):>12}" + _status(r)
        )
    eager = by.get("eager", {})
    if base.get("extra_bytes") is not None and eager.get("extra_bytes") is not None:
        eager_extra = eager["extra_bytes"] - base["extra_bytes"]
        for mode in ("capture-heads", "capture-mean"):
            r = by.get(mode, {})
            if r.get("extra_bytes") is not None and eager_extra > 0:
                share = (r["extra_bytes"] - base["extra_bytes"]) / eager_extra
                print(f"{mode}: extra memory over sdpa = {share:.1%} of eager's extra memory")


def _status(row: dict) -> str:
    if row.get("oom"):
        return "  out of memory"
    return f"  failed: {row['error']}" if row.get("error") else ""


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
