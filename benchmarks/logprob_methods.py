"""Extra cost of the log-probability methods over one plain teacher-forced forward.

    python benchmarks/logprob_methods.py                  # CPU, mid-size random model
    python benchmarks/logprob_methods.py --model builtin  # the shipped trained tiny model
    python benchmarks/logprob_methods.py --rounds 7 --response 256 --vocab 65536

Each mode computes one method's weights for the same trainer batch through
`vlmcredit.online.weights` (its passes + the method), or the shared passes of several methods
(`tor+vppo+entropy`: the three logprob variants in one call, as `vlmcredit weights` runs them).
`plain` is one no-grad forward of the model over the batch with logits of the response tokens
only (no pad positions) and log p of the taken tokens (what a trainer's old-log-prob pass
costs), the log-softmax taken in cache-sized row blocks as the probe does (one fp32 log-softmax
over the whole (B, T, vocab) logits is slower, page-faulting a fresh tensor of that size).
Models: `mid` = the tiny Qwen2.5-VL checkpoint's tokenizer and processor with a mid-size text
model (hidden 512, 8 layers, 8 heads / 2 kv heads, vocabulary --vocab), random weights: nearly
flat next-token distributions, random response ids. `builtin` = `builtin:tiny-qwen2.5-vl`
(trained; vocabulary 628), batch rows = synthetic shape images with their descriptions as the
responses: peaked distributions. Rounds run the modes in a shuffled order (seeded), after one
warm-up call of every mode; prints min / median / max seconds per mode and the ratio of medians
to `plain`, then the nucleus entropy alone on the image pass's logits: the histogram search
against the full sort it replaced.
"""

from __future__ import annotations

import argparse
import platform
import random
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


def noise_samples(batch_size: int, response: int, side: int) -> list:
    """Noise images, "Describe." and random response ids (uneven lengths)."""
    import numpy as np

    from tests.helpers import noise_image
    from vlmcredit.data.sample import Sample

    rng = np.random.default_rng(0)
    return [
        Sample(
            [noise_image(side, side, i)],
            "Describe.",
            rng.integers(300, 480, response - 16 * (i % 2)).tolist(),
        )
        for i in range(batch_size)
    ]


def shape_samples(batch_size: int) -> list:
    """Synthetic shape images with the built-in model's training answers (descriptions and
    reasoned yes/no answers) as the responses."""
    from vlmcredit.data.mme_synth import synth_items
    from vlmcredit.data.sample import Sample
    from vlmcredit.data.synth_dialogs import dialogs

    out = []
    for i, item in enumerate(synth_items("position", batch_size, seed=0)):
        dialog = dialogs(item, ("describe", "reason"))[i % 3]
        out.append(Sample([item.image], dialog.question, dialog.answer))
    return out


def trainer_batch(ck, samples, box_side: int):
    """Prompt block left padded + response block right padded, as a trainer holds them."""
    import torch

    from vlmcredit.models.inputs import encode_samples

    prompts, responses, pixels, grids = [], [], [], []
    for sample in samples:
        enc = encode_samples(ck.processor, ck.geometry, [sample])
        start, _ = enc.layouts[0].response_span
        prompts.append(enc.inputs["input_ids"][0, :start])
        responses.append(torch.tensor(enc.response_ids[0], dtype=torch.long))
        pixels.append(enc.inputs["pixel_values"])
        grids.append(enc.inputs["image_grid_thw"])
    p = max(len(x) for x in prompts)
    width = max(len(r) for r in responses)
    ids = torch.zeros((len(samples), p + width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    rmask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (prompt, resp) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, p - len(prompt) : p] = prompt
        ids[i, p : p + len(resp)] = resp
        mask[i, p - len(prompt) : p + len(resp)] = 1
        rmask[i, : len(resp)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "response_mask": rmask,
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.cat(grids),
        "boxes": [[[0, 0, box_side, box_side]]] * len(samples),
    }


def modes(model, batch, processor):
    import torch

    from vlmcredit import online
    from vlmcredit.methods import registry
    from vlmcredit.methods.logprob_options import collect
    from vlmcredit.models.families import adapter_of
    from vlmcredit.models.layout import build_mm_token_type_ids
    from vlmcredit.probes.logprobs import BLOCK, black_values, score_trainer_batch
    from vlmcredit.probes.response_attention import response_rows

    geo_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                        "image_grid_thw")}  # fmt: skip
    from vlmcredit.models.families import ModelGeometry

    geo = ModelGeometry.from_config(model.config)
    geo_inputs["mm_token_type_ids"] = build_mm_token_type_ids(batch["input_ids"], geo).long()
    adapter = adapter_of(model)
    lengths = response_rows(batch["response_mask"])
    black = black_values(processor.image_processor)
    start = batch["input_ids"].shape[1] - batch["response_mask"].shape[1]
    targets = torch.cat([batch["input_ids"][b, start : start + n] for b, n in enumerate(lengths)])

    def plain():
        # a trainer's old-log-prob pass, the least model work that gives log p of the response
        # tokens: the decoder, the LM head on the response tokens only (no pad positions), log p
        # of the taken tokens by a log-softmax in row blocks that stay in cache (BLOCK)
        with torch.no_grad():
            inputs = adapter.with_positions(model, geo_inputs)
            hidden = adapter.base_model(model)(**inputs, use_cache=False).last_hidden_state
            states = torch.cat(
                [hidden[b, start - 1 : start + n - 1] for b, n in enumerate(lengths)]
            )
            logits = adapter.output_embedding(model)(states)
            rows = max(1, BLOCK // logits.shape[-1])
            buf = torch.empty(rows, logits.shape[-1])
            for s in range(0, logits.shape[0], rows):
                block = logits[s : s + rows].float()
                lp = torch.log_softmax(block, -1, out=buf[: block.shape[0]])
                lp.gather(-1, targets[s : s + rows, None])

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


def sorted_entropy(logprobs, top_p: float):
    """The implementation the histogram search replaced: a partial top-1024 when a row's
    nucleus fits in it, else a full sort of the vocabulary."""
    import torch

    probs = logprobs.exp()

    def nucleus(sorted_p):
        before = sorted_p.cumsum(-1) - sorted_p
        kept = torch.where(before < top_p, sorted_p, 0.0)
        q = kept / kept.sum(-1, keepdim=True)
        return -(q * q.log()).nan_to_num_(0.0).sum(-1)

    out = torch.empty(probs.shape[0], dtype=probs.dtype)
    top = probs.topk(min(1024, probs.shape[-1]), dim=-1).values
    fits = top.sum(-1) >= top_p
    if fits.any():
        out[fits] = nucleus(top[fits])
    if not fits.all():
        out[~fits] = nucleus(probs[~fits].sort(dim=-1, descending=True).values)
    return out, float(fits.float().mean())


def image_logprobs(model, batch):
    """(positions, vocab) fp32 log-probabilities of every response position, image pass."""
    import torch

    from vlmcredit.models.families import ModelGeometry, adapter_of
    from vlmcredit.models.layout import prompt_mm_token_type_ids
    from vlmcredit.probes.response_attention import response_rows

    adapter, geo = adapter_of(model), ModelGeometry.from_config(model.config)
    start = batch["input_ids"].shape[1] - batch["response_mask"].shape[1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                    "image_grid_thw")}  # fmt: skip
    ids = batch["input_ids"]
    inputs["mm_token_type_ids"] = prompt_mm_token_type_ids(ids, geo, start).long()
    inputs = adapter.with_positions(model, inputs)
    with torch.no_grad():
        hidden = adapter.base_model(model)(**inputs, use_cache=False).last_hidden_state
        head = adapter.output_embedding(model)
        rows = [
            torch.log_softmax(head(hidden[b, start - 1 : start + n - 1]).float(), -1)
            for b, n in enumerate(response_rows(batch["response_mask"]))
        ]
    return torch.cat(rows)


def timed_rounds(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Warm-up of every mode, then `rounds` rounds in a shuffled (seeded) order."""
    for fn in runs.values():
        fn()
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], base: str) -> None:
    ref = statistics.median(times[base])
    print(f"{'mode':18} {'min s':>7} {'median s':>9} {'max s':>7} {'/ ' + base:>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:18} {min(ts):7.3f} {med:9.3f} {max(ts):7.3f} {med / ref:8.2f}")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("mid", "builtin"), default="mid")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="rows (mid 4, builtin 16)")
    parser.add_argument("--response", type=int, default=256, help="mid: response tokens")
    parser.add_argument("--image", type=int, default=448, help="mid: image side in pixels")
    parser.add_argument("--vocab", type=int, default=65536, help="mid: vocabulary")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vlmcredit.models.loading import load_checkpoint
    from vlmcredit.models.tiny import make_tiny
    from vlmcredit.probes.logprobs import entropy_from_logprobs

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "mid":
            ckpt = Path(tmp) / "tiny"
            make_tiny("qwen2.5-vl", ckpt, seed=0)
            ck = load_checkpoint(ckpt, dtype="fp32")
            model = mid_model(ckpt, args.vocab)
            samples = noise_samples(args.batch or 4, args.response, args.image)
            box = args.image // 2
        else:
            ck = load_checkpoint("builtin:tiny-qwen2.5-vl", dtype="fp32")
            model = ck.model
            samples = shape_samples(args.batch or 16)
            box = 140
        batch = trainer_batch(ck, samples, box)
        times = timed_rounds(modes(model, batch, ck.processor), args.rounds)
    rows, seq = batch["input_ids"].shape
    lengths = batch["response_mask"].sum(1).tolist()
    vocab = model.config.get_text_config().vocab_size
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads; model {args.model}; batch {rows} x {seq} tokens (responses "
        f"{min(lengths)}-{max(lengths)}, {sum(lengths)} in all), vocab {vocab}, "
        f"{args.rounds} rounds"
    )
    report(times, "plain")

    # the nucleus entropy alone, on this model's own next-token distributions
    lp = image_logprobs(model, batch)
    probs = lp.exp().sort(-1, descending=True).values
    size = ((probs.cumsum(-1) - probs) < 0.95).sum(-1).float()
    _, fits = sorted_entropy(lp, 0.95)
    del probs
    print(
        f"\nnucleus entropy (top_p 0.95) of {lp.shape[0]} positions x {lp.shape[1]}: nucleus "
        f"of {size.median():.0f} tokens (median; {size.min():.0f}-{size.max():.0f}), "
        f"{fits:.0%} of the rows fit in the old top-1024"
    )
    nucleus = {
        "histogram": lambda: entropy_from_logprobs(lp, 0.95),
        "top-1024/sort": lambda: sorted_entropy(lp, 0.95),
        "top_p=1": lambda: entropy_from_logprobs(lp, 1.0),
    }
    diff = (nucleus["histogram"]() - nucleus["top-1024/sort"]()[0]).abs().max()
    # both against the float64 sort of the same float32 log-probabilities (first 64 rows)
    truth, _ = sorted_entropy(lp[:64].double(), 0.95)
    errors = [
        (fn(lp[:64], 0.95) - truth).abs().max().item()
        for fn in (entropy_from_logprobs, lambda x, p: sorted_entropy(x, p)[0])
    ]
    print(
        f"max |histogram - sort| = {diff:.2e} nats; max error against a float64 sort (64 "
        f"rows): histogram {errors[0]:.1e}, sort {errors[1]:.1e}"
    )
    report(timed_rounds(nucleus, args.rounds), "histogram")


if __name__ == "__main__":
    main()
