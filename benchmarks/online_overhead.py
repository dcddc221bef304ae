"""Online weights in a TRL GRPO step: step time with AT-RL anchor weights vs plain TRL.

    python benchmarks/online_overhead.py                # CPU, mid-size config
    python benchmarks/online_overhead.py --rounds 5 --completion-length 32

Modes, all with the same `--num-iterations` (default 2: TRL then runs its own no-grad
old-log-prob forward over prompt + completion):
- plain:     `trl.GRPOTrainer`;
- extra:     `VlmCreditGRPOTrainer(weights_fn=online.weights_fn("anchors"), piggyback=False)`:
             one more no-grad forward with capture, then AT-RL anchors per row;
- piggyback: the same weights_fn, capturing inside TRL's old-log-prob forward (no extra
             forward; `--num-iterations 1` has no such forward, and piggyback falls back to
             the extra forward, counted).
Model: the tiny Qwen2.5-VL checkpoint's tokenizer, processor and ids with a mid-size text model
(hidden 512, 8 layers, 8 heads / 2 kv heads), random weights. Each round builds a fresh trainer
per mode (untimed) and runs one GRPO step; the time is TRL's own `step_time` metric
(generation, scoring, old log-probs, weights, loss and backward), and, as a figure that a
shared machine disturbs less, the CPU time of the process during `train()` (`--threads 1`
makes it the work done). Every round runs every mode in
a shuffled order; round 0 warms every mode up and is discarded; prints min / median / max per
mode and the ratios of medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path


def mid_model(ckpt: Path):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(ckpt)
    text = config.text_config
    text.hidden_size, text.intermediate_size = 512, 1408
    text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads = 8, 8, 2
    text.head_dim = 64
    text.layer_types = ["full_attention"] * 8
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [8, 12, 12]}
    config.vision_config.out_hidden_size = 512
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    return model


def one_step(mode: str, ckpt: Path, processor, dataset, args, root: Path) -> tuple[float, float]:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from vlmcredit import online
    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    def reward(completions, **_kwargs):
        return [float(len(str(c))) for c in completions]

    config = GRPOConfig(
        output_dir=str(root / mode),
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        max_completion_length=args.completion_length,
        num_iterations=args.num_iterations,
        max_steps=1,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    common = {
        "model": mid_model(ckpt),
        "reward_funcs": reward,
        "args": config,
        "train_dataset": dataset,
        "processing_class": processor,
    }
    if mode == "plain":
        trainer = GRPOTrainer(**common)
    else:
        fn = online.weights_fn("anchors")
        trainer = VlmCreditGRPOTrainer(**common, weights_fn=fn, piggyback=mode == "piggyback")
    torch.set_num_threads(args.threads)
    cpu0 = time.process_time()
    trainer.train()
    cpu = time.process_time() - cpu0
    if mode != "plain":
        captured = trainer.piggyback_steps["captured"] == 1
        assert captured == (mode == "piggyback" and args.num_iterations > 1), mode
    return float(trainer.state.log_history[0]["step_time"]), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--image", type=int, default=224, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-iterations", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    args = parser.parse_args()

    import warnings

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from PIL import Image

    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor
    from vlmcredit.models.tiny import make_tiny

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    root = Path(tempfile.mkdtemp(prefix="online-overhead-"))
    ckpt = make_tiny("qwen2.5-vl", root / "ckpt")
    processor = load_processor(ckpt, adapter_for("qwen2_5_vl", "bench"))
    rng = torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.prompts):
        pixels = torch.randint(0, 256, (args.image, args.image, 3), generator=rng)
        prompt = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": f"Describe image {i}."}],
            }
        ]
        rows.append({"prompt": prompt, "image": Image.fromarray(pixels.numpy().astype("uint8"))})
    dataset = Dataset.from_list(rows)

    import random

    shuffle = random.Random(args.seed)
    modes = ("plain", "extra", "piggyback")
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):
        order = list(modes)
        shuffle.shuffle(order)
        for mode in order:
            t, c = one_step(mode, ckpt, processor, dataset, args, root)
            if r > 0:  # round 0 warms up
                wall[mode].append(t)
                cpu[mode].append(c)
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    )
    print(
        f"{args.prompts} prompts x {args.group} completions, {args.completion_length} tokens, "
        f"{args.image}px images, num_iterations {args.num_iterations}, {args.rounds} rounds "
        "after 1 warm-up"
    )
    for title, times in (("TRL step_time (wall)", wall), ("CPU time of train()", cpu)):
        print(f"{title}:")
        print(f"{'mode':10} {'min s':>8} {'median s':>9} {'max s':>8} {'/ plain':>8}")
        base = statistics.median(times["plain"])
        for mode, values in times.items():
            med = statistics.median(values)
            print(f"{mode:10} {min(values):8.3f} {med:9.3f} {max(values):8.3f} {med / base:8.3f}x")


if __name__ == "__main__":
    main()
