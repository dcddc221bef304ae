"""One-shot GPU check (issue #17): capture vs SDPA vs eager on a full-size Qwen2.5-VL-7B shape,
peak GPU memory, and probe-heads questions/second (logit answering vs generate-16).

No download: the model is built from its config with random weights (bf16, on the GPU), the
tokenizer and image processor are the offline tiny ones (`vlmcredit.models.tiny`; their special
token ids are wired into the config). Everything is timed the way benchmarks/capture.py does:
interleaved shuffled rounds in one process after a warm-up of every mode, ratios per round.

    bash benchmarks/gpu.sh                                  # 7B shape, cuda, S = 4096 8192
    bash benchmarks/gpu.sh --preset tiny --device cpu --seq 256 --questions 4   # smoke run

Prints markdown tables ready for benchmarks/RESULTS.md. A part that would run past
`--budget-s` (default 480 s = 8 minutes) is skipped and said so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import capture as bench  # benchmarks/capture.py: presets, inputs, interleaved timing

START = time.perf_counter()
MODES = ("sdpa", "capture-mean", "capture-heads", "capture-heads-bf16", "portable", "eager")


def fail_without_device(device: str) -> None:
    """Fail in a second, before building anything, when the device is not there."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"error: --device {device}: no CUDA device here (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); run on a GPU machine, or check the script "
            "with --preset tiny --device cpu",
            file=sys.stderr,
        )
        raise SystemExit(2)


def elapsed() -> float:
    return time.perf_counter() - START


def build(args: argparse.Namespace, folder: Path) -> Any:
    """A LoadedCheckpoint of the preset with random weights and the offline tiny processor."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmcredit.models.families import ModelGeometry, adapter_of
    from vlmcredit.models.loading import LoadedCheckpoint, load_processor
    from vlmcredit.models.tiny import (
        QWEN_VL_CHAT_TEMPLATE,
        SPECIAL_TOKENS,
        build_image_processor,
        build_tokenizer,
    )

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    p = bench.PRESETS[args.preset]
    text = {**p["text"], "vocab_size": max(p["text"]["vocab_size"], len(tok))}
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config={**text, "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": p["mrope"]},
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config={**p["vision"], "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [p["vision"]["depth"] - 1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    # The processor folder as a checkpoint has it, without weights: config.json (the
    # processor class follows its model_type), tokenizer, image processor, chat template.
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    build_image_processor("qwen2_5_vl").save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
    adapter = adapter_of(model)
    processor = load_processor(folder, adapter)
    geometry = ModelGeometry.from_config(model.config)
    return LoadedCheckpoint(model, processor, adapter, geometry, f"random:{args.preset}", folder)


def capture_table(args: argparse.Namespace, model: Any) -> list[str]:
    import torch

    cuda = args.device.startswith("cuda")
    lines = [
        "| S | T | N | mode | seconds (median) | time / sdpa (min / median / max) | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for seq in args.seq:
        if elapsed() > args.budget_s:
            lines.append(f"| {seq} | | | skipped: past the {args.budget_s:.0f} s budget | | | |")
            continue
        modes = [m for m in args.modes if m != "eager" or seq <= args.eager_max_seq]
        modes = ["sdpa", *(m for m in modes if m != "sdpa")]
        dtype = next(model.parameters()).dtype
        inputs, layouts = bench.build_inputs(model.config, seq, args.device, dtype)
        forwards = {m: bench.make_forward(model, m, inputs, layouts) for m in modes}
        peaks: dict[str, float] = {}
        if cuda:  # one forward per mode for its peak (also the warm-up of the timing below)
            for mode, fn in forwards.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                kept = fn()
                torch.cuda.synchronize()
                peaks[mode] = torch.cuda.max_memory_allocated() / 2**30
                del kept
        times = bench.interleaved(forwards, args.rounds, cuda)
        ratio = bench.ratios(times)
        t, n = layouts[0].num_response_tokens, int(layouts[0].image_positions.size)
        length = int(inputs["input_ids"].shape[1])
        for mode in modes:
            r = ratio[mode]
            peak = f"{peaks[mode]:.1f}" if mode in peaks else "-"
            lines.append(
                f"| {length} | {t} | {n} | {mode} | {statistics.median(times[mode]):.3f} | "
                f"{min(r):.3f} / {statistics.median(r):.3f} / {max(r):.3f} | {peak} |"
            )
        skipped = [m for m in args.modes if m not in modes]
        if skipped:
            lines.append(f"| {length} | {t} | {n} | {', '.join(skipped)}: not run at this S | |||")
        del forwards, inputs
        if cuda:
            torch.cuda.empty_cache()
    return lines


def probe_heads_table(args: argparse.Namespace, ck: Any, folder: Path) -> list[str]:
    """Questions/second: logit answering (features cached, shared prefixes) vs generate-16."""
    import torch

    from vlmcredit.data.mme import read_mme
    from vlmcredit.data.mme_synth import write_synthetic_mme
    from vlmcredit.data.sample import Sample
    from vlmcredit.probes.mme_answer import (
        ImageFeatureCache,
        MMEInputs,
        answer_questions,
        yes_no_tokens,
    )
    from vlmcredit.probes.response_attention import GenerationConfig, generate_responses

    if elapsed() > args.budget_s:
        return [f"probe-heads: skipped, past the {args.budget_s:.0f} s budget"]
    mme_dir = folder / "mme"
    write_synthetic_mme(mme_dir, 1, seed=0)
    questions = read_mme(mme_dir).questions[: args.questions]
    tokens = yes_no_tokens(ck.tokenizer)
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 34))
    t0 = time.perf_counter()
    bank.prepare()
    sync()
    prepare = time.perf_counter() - t0
    batches = bank.batches(args.batch_size)

    def logits() -> None:
        answer_questions(bank, batches, "logits", tokens)

    def generate16() -> None:
        for batch in batches:
            samples = [Sample([questions[i].load_image()], questions[i].question) for i in batch]
            generate_responses(ck, samples, GenerationConfig(16, temperature=0.0))

    runs = {"logits": logits, "generate-16": generate16}
    for fn in runs.values():  # warm-up, both
        fn()
    times: dict[str, list[float]] = {m: [] for m in runs}
    for round_ in range(args.rounds):
        for mode in runs if round_ % 2 == 0 else reversed(list(runs)):
            sync()
            t0 = time.perf_counter()
            runs[mode]()
            sync()
            times[mode].append(time.perf_counter() - t0)
    n = len(questions)
    speed = {m: n / statistics.median(ts) for m, ts in times.items()}
    per_round = [g / f for f, g in zip(times["logits"], times["generate-16"], strict=True)]
    return [
        "| path | questions/s (median) | x generate-16 (min / median / max) |",
        "|---|---|---|",
        f"| logits (features cached, shared prefix) | {speed['logits']:.1f} | "
        f"{min(per_round):.2f} / {statistics.median(per_round):.2f} / {max(per_round):.2f} |",
        f"| generate-16 (processor + vision every question) | {speed['generate-16']:.1f} | 1.00 |",
        f"questions={n} batch={args.batch_size}; one-time preparation (processor + vision "
        f"tower for the logit path): {prepare:.2f} s",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=sorted(bench.PRESETS), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rounds", type=int, default=2)
    # eager keeps every layer's (H, S, S) matrices: 26 GB at 4k on the 7B shape, 105 GB at 8k
    parser.add_argument("--eager-max-seq", type=int, default=4096)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    fail_without_device(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory(prefix="vlmcredit-gpu-check-") as tmp:
        ck = build(args, Path(tmp))
        print(
            f"# GPU check: preset={args.preset} ({ck.geometry.num_layers} layers, "
            f"{ck.geometry.num_heads} heads / {ck.geometry.num_kv_heads} kv, hidden "
            f"{ck.geometry.hidden_size}) dtype={args.dtype} device={args.device} "
            f"({device_name}) torch={torch.__version__} built in {elapsed():.0f} s"
        )
        print("\n## capture vs SDPA vs eager\n")
        print("\n".join(capture_table(args, ck.model)), flush=True)
        print("\n## probe-heads questions/s\n")
        print("\n".join(probe_heads_table(args, ck, Path(tmp))))
    print(
        f"\ntotal {elapsed():.0f} s (budget {args.budget_s:.0f} s); load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
