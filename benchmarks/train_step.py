"""One train-tiny step (forward, loss, backward, AdamW): vocabulary projection over the answer
window (`train_tiny.answer_window`, what the run does) vs over every position (the reference).

Both modes train their own copy of the same fresh model on the same batches (a mixed step of the
shipped model's later stages: 80 image tokens, pairs, every answer style), in interleaved rounds
after a warm-up of each; the loss of the two copies is compared on every step, so the window
is shown to compute the same loss, not only to be faster.

    python benchmarks/train_step.py --threads 2 --rounds 5 --steps 10

Prints min / median / max seconds per step of each mode and the ratio reference / window.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vlmcredit.pipelines import train_tiny as tt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per mode per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = tt.TrainConfig(
        batch_size=16,
        image_max_tokens=80,
        mrope_section=(1, 1, 6),
        per_dialog_loss=True,
        paired_questions=True,
        lookup_copyable=False,
        style_weights={"describe": 0.15, "reason": 0.15, "lookup": 0.3, "mme": 0.4},
    )
    tokenizer, model, processor = tt.build_parts(0, 80, (1, 1, 6))
    tt.IMAGE_ID[0] = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pixels = tt.Pixels(processor)
    _, grid = pixels([tt.step_dialogs(cfg, 0)[0][0].image])
    encoder = tt.Encoder(tokenizer, int(grid[0].prod()) // 4)

    def full(m, inputs, enc):
        return m(**inputs).logits, enc["labels"]

    modes = {"reference (all positions)": full, "window (answer positions)": tt.answer_window}
    models = {name: copy.deepcopy(model) for name in modes}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in modes}
    worst = 0.0

    def step(name: str, s: int) -> float:
        batch = tt.step_dialogs(cfg, s)
        enc = encoder.batch([d for _, d in batch])
        inputs = tt.model_inputs(enc, pixels([it.image for it, _ in batch]))
        loss = tt.answer_loss(*modes[name](models[name], inputs, enc), per_dialog=True)
        optims[name].zero_grad(set_to_none=True)
        loss.backward()
        optims[name].step()
        return float(loss)

    for name in modes:  # warm-up of every mode, the reference included
        step(name, 10_000)
    s = 0
    for _ in range(args.rounds):
        losses: dict[str, list[float]] = {}
        for name in modes:
            t0 = time.perf_counter()
            losses[name] = [step(name, s + k) for k in range(args.steps)]
            times[name].append((time.perf_counter() - t0) / args.steps)
        a, b = losses.values()
        worst = max(worst, *(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)))
        s += args.steps
    print(f"train-tiny step, batch 16, 80 image tokens, {args.threads} threads")
    for name, t in times.items():
        mid = statistics.median(t)
        print(f"  {name:28s} min {min(t):.3f}  median {mid:.3f}  max {max(t):.3f} s")
    ref, win = (statistics.median(t) for t in times.values())
    print(f"ratio reference / window (medians): {ref / win:.2f}x")
    print(f"largest relative loss difference between the two copies: {worst:.1e}")


if __name__ == "__main__":
    main()
