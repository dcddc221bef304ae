"""Head-ablation MME scoring: logit answering + feature cache vs generate-and-parse, side by side.

For each model (the tiny test checkpoint and a mid-size random Qwen2.5-VL, both with their
lm_head rows for yes/no rewritten as in tests/probes/test_mme_answer.py so that most answers
start with a yes/no token) and a synthetic MME set, every configuration (baseline + ablations of
one head index in every layer) is scored two ways on the same question batches:

  fast       questions encoded once, image features from the cache, each image's shared prompt
             prefix run once for its two questions, best yes-variant logit vs best no-variant
             logit (vlmcredit probe-heads, the default)
  full       the same with one full forward per question (--no-share-prefix)
  generate   the lmms-eval way: processor + vision tower on every question, greedy decoding of
             up to 16 tokens, official parsing (`generate_responses`, pixel values)
  generate2  the same with 2 new tokens: roughly what an instruct model costs when it stops
             right after "Yes" (our rewritten models never emit EOS, so `generate` always
             decodes all 16)

Prints questions/second per configuration, the ratios, the fast path's one-time preparation
(processor + vision tower) amortised over the model's full protocol (1 + heads
configurations), and whether the answers agree where the decoded text starts with a yes/no
token, plus both MME totals.

    python benchmarks/probe_heads.py                    # CPU: tiny + mid, 5 images/category
    python benchmarks/probe_heads.py --models mid --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.probes helpers

MID = {  # as benchmarks/capture.py "mid": hidden 512, 8 layers, 8 heads / 2 kv heads
    "text": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2),
    "vision": dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                   out_hidden_size=512),
    "mrope": [8, 12, 12],
}  # fmt: skip


def build_mid(out: Path) -> Path:
    """A mid-size random Qwen2.5-VL checkpoint folder with the tiny tokenizer and processor."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmcredit.models.tiny import (
        QWEN_VL_CHAT_TEMPLATE,
        SPECIAL_TOKENS,
        build_image_processor,
        build_tokenizer,
    )

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config={**MID["text"], "vocab_size": len(tok), "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": MID["mrope"]},
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     "tie_word_embeddings": False},
        vision_config={**MID["vision"], "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [MID["vision"]["depth"] - 1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    build_image_processor("qwen2_5_vl").save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
    return out


def run_model(name: str, ckpt: Path, mme_dir: Path, args: argparse.Namespace) -> None:
    import torch

    from vlmcredit.data.mme import read_mme
    from vlmcredit.data.mme_score import MMEPrediction, parse_answer, score_predictions
    from vlmcredit.data.sample import Sample
    from vlmcredit.models.loading import load_checkpoint
    from vlmcredit.probes.ablation import ablate_heads
    from vlmcredit.probes.mme_answer import (
        ImageFeatureCache,
        MMEInputs,
        answer_questions,
        yes_no_tokens,
    )
    from vlmcredit.probes.response_attention import GenerationConfig, generate_responses

    ck = load_checkpoint(ckpt, dtype=args.dtype, device=args.device)
    questions = read_mme(mme_dir).questions
    n = len(questions)
    tokens = yes_no_tokens(ck.tokenizer)
    variants = set(tokens.yes) | set(tokens.no)
    eos = {ck.tokenizer.convert_tokens_to_ids("<|im_end|>")}

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 34))
    bank.prepare()
    sync()
    prepare = time.perf_counter() - t0
    batches = bank.batches(args.batch_size)
    answer_questions(bank, batches[:1], "logits", tokens)  # warm-up (first-call overheads)

    def reference(max_new: int) -> tuple[list[str], list[int]]:
        """Processor + pixel values + greedy decoding per question; text and first token."""
        texts: list[str] = [""] * n
        firsts: list[int] = [-1] * n
        for batch in batches:
            samples = [Sample([questions[i].load_image()], questions[i].question) for i in batch]
            ids, _ = generate_responses(ck, samples, GenerationConfig(max_new, temperature=0.0))
            for i, row in zip(batch, ids, strict=True):
                texts[i] = ck.tokenizer.decode([t for t in row if t not in eos],
                                               skip_special_tokens=True)  # fmt: skip
                firsts[i] = row[0] if row else -1
        return texts, firsts

    def score(preds: list[str]) -> float:
        return score_predictions(
            MMEPrediction(q.image_id, q.category, q.question, q.answer, p)
            for q, p in zip(questions, preds, strict=True)
        ).total

    configs = [None, *range(min(args.configs - 1, ck.geometry.num_heads))]
    rows = []
    agree = compared = same_full = 0
    for head in configs:
        spec = [] if head is None else [(None, head)]
        with ablate_heads(ck, spec):
            t0 = time.perf_counter()
            answers = answer_questions(bank, batches, "logits", tokens)
            fast = [answers[i] for i in range(n)]
            sync()
            t_fast = time.perf_counter() - t0
            t0 = time.perf_counter()
            unshared = answer_questions(bank, batches, "logits", tokens, share_prefix=False)
            sync()
            t_full = time.perf_counter() - t0
            same_full += sum(unshared[i].prediction == fast[i].prediction for i in range(n))
            t0 = time.perf_counter()
            ref, firsts = reference(16)
            sync()
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            reference(2)
            sync()
            t_ref2 = time.perf_counter() - t0
        starts = [first in variants for first in firsts]
        for a, text, s in zip(fast, ref, starts, strict=True):
            if s:
                compared += 1
                agree += parse_answer(text) == a.prediction.lower()
        rows.append((head, t_fast, t_full, t_ref, t_ref2, score([a.prediction for a in fast]),
                     score(ref), sum(starts) / n))  # fmt: skip
    heads = ck.geometry.num_heads
    print(f"\nmodel={name} layers={ck.geometry.num_layers} heads={heads} "
          f"hidden={ck.geometry.hidden_size} device={args.device} dtype={args.dtype} "
          f"questions={n} batch={args.batch_size} "
          f"tokens/question~{bank.encoded[0].ids.numel()}")  # fmt: skip
    print(f"{'config':<9} {'fast q/s':>9} {'full q/s':>9} {'gen16 q/s':>10} {'gen2 q/s':>9} "
          f"{'x gen16':>8} {'x gen2':>7} {'fast total':>11} {'gen16 total':>12} "
          f"{'yes/no first':>13}")  # fmt: skip
    for head, tf, tfull, tr, tr2, sf, sr, share in rows:
        label = "baseline" if head is None else f"head-{head}"
        print(f"{label:<9} {n / tf:>9.1f} {n / tfull:>9.1f} {n / tr:>10.1f} {n / tr2:>9.1f} "
              f"{tr / tf:>8.1f} {tr2 / tf:>7.1f} {sf:>11.1f} {sr:>12.1f} "
              f"{share:>13.0%}")  # fmt: skip
    mean_fast = sum(r[1] for r in rows) / len(rows)
    mean_ref = sum(r[3] for r in rows) / len(rows)
    mean_ref2 = sum(r[4] for r in rows) / len(rows)
    protocol = 1 + heads
    amortised = (prepare + protocol * mean_fast) / protocol
    print(f"fast path one-time preparation (processor + vision, {n} questions): {prepare:.2f} s; "
          f"amortised over the full protocol ({protocol} configurations): "
          f"{n / amortised:.1f} q/s = {mean_ref / amortised:.1f}x gen16, "
          f"{mean_ref2 / amortised:.1f}x gen2")  # fmt: skip
    print(f"answers where the decoded text starts with a yes/no token: {agree}/{compared} agree; "
          f"shared prefix vs full forward: {same_full}/{n * len(rows)} answers equal")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--images-per-category", type=int, default=5)
    parser.add_argument("--configs", type=int, default=3, help="baseline + this many - 1 heads")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch

    from vlmcredit.data.mme_synth import write_synthetic_mme
    from vlmcredit.models.tiny import make_tiny
    from vlmcredit.probes.tiny_answerer import yes_no_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="vlmcredit-bench-"))
    try:
        mme_dir = tmp / "mme"
        write_synthetic_mme(mme_dir, args.images_per_category, seed=0)
        for name in args.models:
            raw = make_tiny("qwen2.5-vl", tmp / name) if name == "tiny" else build_mid(tmp / name)
            ckpt = yes_no_checkpoint(raw, tmp / f"{name}-yes-no", mme_dir)
            run_model(name, ckpt, mme_dir, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
