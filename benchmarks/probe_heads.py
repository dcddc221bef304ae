"""probe-heads logit answering vs its compute ceiling and generate-and-parse, in one process.

For one model (default: a mid-size random Qwen2.5-VL with the tiny tokenizer, its lm_head rows for
yes/no rewritten as in tests/probes/test_mme_answer.py so that most answers start with a yes/no
token) and a synthetic MME set, one configuration (an ablation) is scored by each mode below on
the same question batches; every round runs every mode once, in a shuffled order, after one
untimed warm-up run of every mode (the generate reference included). Times are CPU seconds of
this process (1 thread: robust to other processes on a shared machine), min/median/max over the
rounds; ratios are of medians.

head-index configurations (head h ablated in every layer; h cycles over rounds):
  logits     `vlmcredit probe-heads` default: the system prompt's KV once per configuration,
             each image's prefix once for its questions, the questions' own tokens per question
  legacy     the path before it (issue 17): each image's prefix from token 0, left-padded
  full       one full forward per question (--no-share-prefix)
  gen16      the lmms-eval way: processor + vision tower per question, greedy decoding of 16
             tokens (these models never emit EOS), official parsing
  ceiling    only the forwards no scheme can skip: the system prompt once, each image's part
             once, each question's own tokens once, batched as `logits` batches them but with
             every row trimmed to its batch's shortest (no padding), inputs and caches built
             beforehand, no LM head; each batch's time scaled by (tokens needed / tokens run)
layer-head configurations (one head of layer L ablated):
  lh-skip    `logits` starting at layer L from the inputs recorded by layer L's first
             configuration (the default in --mode layer-head)
  lh-full    the same configuration through every layer (what the shortcut replaces)

    python benchmarks/probe_heads.py                          # CPU, mid model, 1 thread
    python benchmarks/probe_heads.py --device cuda --dtype bf16 --images-per-category 20
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def legacy_shared_prefix_logits(bank: Any, indices: list[int]) -> Any:
    """The shared-prefix path before issue 17 (HEAD 29b0641), kept here to measure against:
    each image's whole prefix (system prompt included) from token 0, left-padded, then the
    questions' own tokens on a repeated cache."""
    import torch

    from vlmcredit.models.layout import build_mm_token_type_ids
    from vlmcredit.probes.image_features import encoder_outputs
    from vlmcredit.probes.shared_prefix import cache_kwarg, pad_rows, returned_cache

    model = bank.ck.model
    inner = bank.ck.adapter.base_model(model)
    groups = bank.prefix_groups(indices)
    prefixes = [bank.encoded[g[0]].ids[:cut] for g, cut in groups]
    prefix_ids, prefix_mask = pad_rows(prefixes, bank._pad_id(), left=True)
    prefix_inputs = {
        "input_ids": prefix_ids,
        "attention_mask": prefix_mask,
        "mm_token_type_ids": build_mm_token_type_ids(prefix_ids, bank.ck.geometry).to(torch.long),
        "image_grid_thw": torch.tensor([bank.encoded[g[0]].grid for g, _ in groups]),
        "mm_encoder_outputs": encoder_outputs([bank.features(g[0]) for g, _ in groups]),
    }
    prefix_positions, deltas = bank.ck.adapter.rope_index(model, prefix_inputs)
    prefix_inputs["position_ids"] = prefix_positions
    deltas = deltas.reshape(-1).cpu()
    device = next(model.parameters()).device
    with torch.no_grad():
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prefix_inputs.items()}
        cache = returned_cache(inner(**moved, use_cache=True))
        owner = torch.tensor([k for k, (g, _) in enumerate(groups) for _ in g])
        cache.batch_select_indices(owner)
        order = [i for g, _ in groups for i in g]
        cuts = [cut for g, cut in groups for _ in g]
        suffixes = [bank.encoded[i].ids[cut:] for i, cut in zip(order, cuts, strict=True)]
        suffix_ids, suffix_mask = pad_rows(suffixes, bank._pad_id(), left=False)
        start = torch.tensor(cuts) + deltas[owner]
        positions = start[:, None] + torch.arange(suffix_ids.shape[1])[None, :]
        out = inner(
            input_ids=suffix_ids.to(device),
            attention_mask=torch.cat([prefix_mask[owner], suffix_mask], dim=1).to(device),
            position_ids=positions[None].expand(3, -1, -1).to(device),
            **{cache_kwarg(inner): cache},
            use_cache=True,
        )
        last = torch.tensor([s.numel() - 1 for s in suffixes], device=device)
        hidden = out.last_hidden_state[torch.arange(len(order), device=device), last]
        logits = bank.ck.adapter.output_embedding(model)(hidden)
    where = {i: k for k, i in enumerate(order)}
    return logits[[where[i] for i in indices]]


def ceiling_plan(bank: Any, batches: list[list[int]]) -> list[tuple[Any, ...]]:
    """Per batch: inputs of its image parts and its questions' own tokens, every row trimmed
    to the batch's shortest (no padding), and the share of needed tokens that this runs."""
    import torch

    from vlmcredit.models.layout import build_mm_token_type_ids
    from vlmcredit.probes.image_features import encoder_outputs

    k = bank.system_length()
    plan = []
    for batch in batches:
        groups = bank.prefix_groups(batch)
        cuts = [cut for _, cut in groups]
        short = min(cuts) - k
        image = [bank.encoded[g[0]].ids for g, _ in groups]
        if any(int((ids[k + short :] == bank.ck.geometry.image_token_id).sum()) for ids in image):
            raise SystemExit("ceiling: trimming would cut image tokens; use equal-size images")
        ids = torch.stack([r[k : k + short] for r in image])
        pos = torch.stack([bank.prefix_positions(g[0], cut)[0][:, k : k + short]
                           for g, cut in groups], dim=1)  # fmt: skip
        part = {
            "input_ids": ids,
            "attention_mask": torch.ones((len(groups), k + short), dtype=torch.long),
            "position_ids": pos,
            "mm_token_type_ids": build_mm_token_type_ids(ids, bank.ck.geometry).to(torch.long),
            "image_grid_thw": torch.tensor([bank.encoded[g[0]].grid for g, _ in groups]),
            "mm_encoder_outputs": encoder_outputs([bank.features(g[0]) for g, _ in groups]),
        }
        owner = torch.tensor([j for j, (g, _) in enumerate(groups) for _ in g])
        own = [bank.encoded[i].ids[cut:] for g, cut in groups for i in g]
        n = min(r.numel() for r in own)
        first = torch.tensor([cut + bank.prefix_positions(g[0], cut)[1]
                              for g, cut in groups for _ in g])  # fmt: skip
        suffix = {
            "input_ids": torch.stack([r[:n] for r in own]),
            "attention_mask": torch.ones((len(own), k + short + n), dtype=torch.long),
            "position_ids": (first[:, None] + torch.arange(n))[None].expand(3, -1, -1),
        }
        need_part = sum(c - k for c in cuts)
        need_own = sum(r.numel() for r in own)
        plan.append(
            (part, owner, suffix, need_part / (short * len(groups)), need_own / (n * len(own)))
        )
    return plan


def run_ceiling(bank: Any, plan: list[tuple[Any, ...]]) -> float:
    """CPU seconds of the unavoidable forwards of one configuration (see the module doc)."""
    import torch

    from vlmcredit.probes.shared_prefix import _system_cache, cache_kwarg

    inner = bank.ck.adapter.base_model(bank.ck.model)
    name = cache_kwarg(inner)
    t0 = time.process_time()
    system = _system_cache(bank, bank.system_length(), torch.device("cpu"))
    total = time.process_time() - t0
    with torch.no_grad():
        for part, owner, suffix, scale_part, scale_own in plan:
            cache = copy.deepcopy(system)  # cache copies and row selection are not counted
            cache.batch_repeat_interleave(part["input_ids"].shape[0])
            t0 = time.process_time()
            inner(**part, use_cache=True, **{name: cache})
            total += (time.process_time() - t0) * scale_part
            cache.batch_select_indices(owner)
            t0 = time.process_time()
            inner(**suffix, use_cache=True, **{name: cache})
            total += (time.process_time() - t0) * scale_own
    return total


def run_model(ckpt: Path, mme_dir: Path, args: argparse.Namespace) -> None:
    import torch

    from vlmcredit.data.mme import read_mme
    from vlmcredit.data.sample import Sample
    from vlmcredit.models.loading import load_checkpoint
    from vlmcredit.probes.ablation import ablate_heads
    from vlmcredit.probes.mme_answer import (
        ImageFeatureCache,
        MMEInputs,
        answer_questions,
        yes_no_answers,
        yes_no_tokens,
    )
    from vlmcredit.probes.response_attention import GenerationConfig, generate_responses

    ck = load_checkpoint(ckpt, dtype=args.dtype, device=args.device)
    geo = ck.geometry
    questions = read_mme(mme_dir).questions
    n = len(questions)
    tokens = yes_no_tokens(ck.tokenizer)
    cuda = args.device.startswith("cuda")
    bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 34))
    t0 = time.perf_counter()
    bank.prepare()
    prepare = time.perf_counter() - t0
    batches = bank.batches(args.batch_size)
    plan = ceiling_plan(bank, batches) if not cuda else None
    layer = geo.num_layers // 2

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def logits(spec: list[Any], start: int = 0, share: bool = True) -> list[str]:
        with ablate_heads(ck, spec):
            answers = answer_questions(bank, batches, "logits", tokens, share_prefix=share,
                                       start_layer=start)  # fmt: skip
        return [answers[i].prediction for i in range(n)]

    def legacy(spec: list[Any]) -> list[str]:
        out: dict[int, str] = {}
        with ablate_heads(ck, spec):
            for batch in batches:
                answers = yes_no_answers(legacy_shared_prefix_logits(bank, batch), tokens)
                out.update((i, a.prediction) for i, a in zip(batch, answers, strict=True))
        return [out[i] for i in range(n)]

    def gen16(spec: list[Any]) -> list[str]:
        firsts: list[str] = [""] * n
        with ablate_heads(ck, spec):
            for batch in batches:
                samples = [Sample([questions[i].load_image()], questions[i].question)
                           for i in batch]  # fmt: skip
                ids, _ = generate_responses(ck, samples, GenerationConfig(16, temperature=0.0))
                for i, row in zip(batch, ids, strict=True):
                    firsts[i] = tokens.first_token_label(row[0]) if row else "other"
        return firsts

    def ceiling(spec: list[Any]) -> float:
        with ablate_heads(ck, spec):
            return run_ceiling(bank, plan)

    modes = {
        "logits": lambda h: logits([(None, h)]),
        "legacy": lambda h: legacy([(None, h)]),
        "full": lambda h: logits([(None, h)], share=False),
        "gen16": lambda h: gen16([(None, h)]),
        "lh-skip": lambda h: logits([(layer, h)], start=layer),
        "lh-full": lambda h: logits([(layer, h)], start=0),
    }
    if plan is not None:
        modes["ceiling"] = lambda h: ceiling([(None, h)])
    times: dict[str, list[float]] = {m: [] for m in modes}
    answers: dict[str, list[list[str]]] = {m: [] for m in modes}
    for fn in modes.values():  # warm-up: every mode once, untimed
        fn(0)
    rng = random.Random(0)
    for r in range(args.rounds):
        head = r % geo.num_heads
        order = list(modes)
        rng.shuffle(order)
        for name in order:
            t0 = clock()
            out = modes[name](head)
            elapsed = clock() - t0
            if name == "ceiling":
                elapsed = out  # only the forwards themselves
            else:
                answers[name].append(out)
            times[name].append(elapsed)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"\nmodel layers={geo.num_layers} heads={geo.num_heads} hidden={geo.hidden_size} "
          f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"questions={n} batch={args.batch_size} rounds={args.rounds} "
          f"tokens/question~{bank.encoded[0].ids.numel()} system prompt={bank.system_length()} "
          f"layer-head layer={layer}")  # fmt: skip
    unit = "s GPU wall" if cuda else "s CPU"
    print(f"{'mode':<8} {'min ' + unit:>12} {'median':>8} {'max':>8} {'q/s':>8} "
          f"{'x gen16':>8} {'/ceiling':>9}")  # fmt: skip
    for m, t in times.items():
        ceil = f"{med['ceiling'] / med[m]:>9.2f}" if "ceiling" in med else f"{'-':>9}"
        print(f"{m:<8} {min(t):>12.3f} {med[m]:>8.3f} {max(t):>8.3f} {n / med[m]:>8.1f} "
              f"{med['gen16'] / med[m]:>8.2f} {ceil}")  # fmt: skip
    print(
        f"lh-skip vs lh-full: {med['lh-full'] / med['lh-skip']:.2f}x (layer {layer} of "
        f"{geo.num_layers}; layer inputs store: {bank.layer_store.stats()})"
    )
    same = all(a == b for a, b in zip(answers["logits"], answers["full"], strict=True))
    same_legacy = all(a == b for a, b in zip(answers["logits"], answers["legacy"], strict=True))
    same_lh = all(a == b for a, b in zip(answers["lh-skip"], answers["lh-full"], strict=True))
    agree = sum(x.lower() == y for a, b in zip(answers["logits"], answers["gen16"], strict=True)
                for x, y in zip(a, b, strict=True))  # fmt: skip
    print(
        f"answers: logits = full: {same}; logits = legacy: {same_legacy}; lh-skip = lh-full: "
        f"{same_lh}; logits = label of gen16's first token: {agree}/{n * args.rounds}"
    )
    print(f"one-time preparation (processor + vision tower, {n} questions): {prepare:.2f} s wall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--images-per-category", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1)
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
        name = args.model
        raw = make_tiny("qwen2.5-vl", tmp / name) if name == "tiny" else build_mid(tmp / name)
        ckpt = yes_no_checkpoint(raw, tmp / f"{name}-yes-no", mme_dir)
        run_model(ckpt, mme_dir, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
