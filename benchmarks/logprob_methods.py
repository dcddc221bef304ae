"""Extra cost of the log-probability methods over one plain teacher-forced forward.

    python benchmarks/logprob_methods.py                  # CPU, mid-size config
    python benchmarks/logprob_methods.py --rounds 7 --response 256 --vocab 65536

Each mode computes one method's weights for the same trainer batch through
`vlmcredit.online.weights` (its passes + the method), or the shared passes of several methods
(`tor+vppo+entropy`: the three logprob variants in one call, as `vlmcredit weights` runs them).
`plain` is one no-grad forward of the model over the batch with logits of the response
positions only and log p of the taken tokens (what a trainer's old-log-prob pass costs).
Model: the tiny Qwen2.5-VL checkpoint's tokenizer and processor with a mid-size text model
(hidden 512, 8 layers, 8 heads / 2 kv heads, vocabulary --vocab), random weights. Rounds
interleave the modes (order alternating), after one warm-up call per mode; prints min /
median / max seconds per mode and the ratio of medians to `plain`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mid_model(ckpt: Path, vocab: int):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(ckpt)
    text = config.text_config
    text.hidden_size, text.intermediate_size = 512, 1408
    text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads = 8, 8, 2
    text.head_dim = 64
    text.vocab_size = vocab
    text.layer_types = ["full_attention"] * 8
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [8, 12, 12]}
    config.vision_config.out_hidden_size = 512
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()


def trainer_batch(ck, batch_size: int, response: int, side: int):
    """Prompt block left padded + response block (random ids) right padded."""
    import numpy as np
    import torch

    from tests.helpers import noise_image
    from vlmcredit.data.sample import Sample
    from vlmcredit.models.inputs import encode_samples

    rng = np.random.default_rng(0)
    prompts, pixels, grids = [], [], []
    for i in range(batch_size):
        image = noise_image(side, side, i)
        enc = encode_samples(ck.processor, ck.geometry, [Sample([image], "Describe.", [])])
        prompts.append(enc.inputs["input_ids"][0])
        pixels.append(enc.inputs["pixel_values"])
        grids.append(enc.inputs["image_grid_thw"])
    p = max(len(x) for x in prompts)
    lengths = [response - 16 * (i % 2) for i in range(batch_size)]  # uneven responses
    ids = torch.zeros((batch_size, p + response), dtype=torch.long)
    mask = torch.zeros_like(ids)
    rmask = torch.zeros((batch_size, response), dtype=torch.long)
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        ids[i, p - len(prompt) : p] = prompt
        ids[i, p : p + n] = torch.from_numpy(rng.integers(300, 480, n))
        mask[i, p - len(prompt) : p + n] = 1
        rmask[i, :n] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "response_mask": rmask,
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.cat(grids),
        "boxes": [[[0, 0, side // 2, side // 2]]] * batch_size,
    }


def modes(model, batch, processor):
    import torch

    from vlmcredit import online
    from vlmcredit.methods import registry
    from vlmcredit.methods.logprob_options import collect
    from vlmcredit.models.families import adapter_of
    from vlmcredit.models.layout import build_mm_token_type_ids
    from vlmcredit.probes.logprobs import black_values, score_trainer_batch
    from vlmcredit.probes.response_attention import response_rows

    geo_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                        "image_grid_thw")}  # fmt: skip
    from vlmcredit.models.families import ModelGeometry

    geo = ModelGeometry.from_config(model.config)
    geo_inputs["mm_token_type_ids"] = build_mm_token_type_ids(batch["input_ids"], geo).long()
    plain_inputs = adapter_of(model).with_positions(model, geo_inputs)
    lengths = response_rows(batch["response_mask"])
    black = black_values(processor.image_processor)

    width = batch["response_mask"].shape[1]
    targets = batch["input_ids"][:, -width:]

    def plain():
        # a trainer's old-log-prob pass: logits of the response positions only, log p taken
        with torch.no_grad():
            logits = model(**plain_inputs, logits_to_keep=width + 1).logits[:, :-1]
            torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])

    def method(name, **params):
        return lambda: online.weights(model, batch, method=name, processor=processor, **params)

    # the pass options `vlmcredit weights --method tor,vppo,entropy` derives from the configs
    opts = collect([registry.get(n).make_config() for n in ("tor", "vppo", "entropy")])

    def shared():
        score_trainer_batch(
            model, batch, lengths, ["image", "no_image", "perturbed"], opts["scores"],
            opts["perturb"], black, opts["entropy_variants"],
        )  # fmt: skip

    return {
        "plain": plain,
        "entropy": method("entropy"),
        "tor": method("tor"),
        "tor(top_p=1)": method("tor", top_p=1.0),  # without the nucleus search
        "vppo": method("vppo"),
        "sayo": method("sayo"),
        "tor+vppo+entropy": shared,
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--image", type=int, default=448, help="image side in pixels")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vlmcredit.models.loading import load_checkpoint
    from vlmcredit.models.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny"
        make_tiny("qwen2.5-vl", ckpt, seed=0)
        ck = load_checkpoint(ckpt, dtype="fp32")
        model = mid_model(ckpt, args.vocab)
        batch = trainer_batch(ck, args.batch, args.response, args.image)
        runs = modes(model, batch, ck.processor)
        for fn in runs.values():  # warm-up every mode
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
    seq = batch["input_ids"].shape[1]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads; batch {args.batch} x {seq} tokens ({args.response} response, "
        f"{args.image}px images), vocab {args.vocab}, {args.rounds} rounds"
    )
    base = statistics.median(times["plain"])
    print(f"{'mode':18} {'min s':>7} {'median s':>9} {'max s':>7} {'/ plain':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:18} {min(ts):7.3f} {med:9.3f} {max(ts):7.3f} {med / base:8.2f}")


if __name__ == "__main__":
    main()
