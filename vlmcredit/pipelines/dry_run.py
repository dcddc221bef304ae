"""`--dry-run` of capture, anchors, weights and probe-heads: each command's own option checks
and input reading, then `pipelines/estimate.py`'s rules; no weights loaded, nothing written.

The inputs are read exactly as the real run reads them (so a dry run also finds a bad row or a
bad option), and the per-item numbers come from what each command keeps (see the rules there).
"""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

from vlmcredit.data.rollout_files import check_data_option
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.selection import parse_indices
from vlmcredit.pipelines.estimate import (
    DTYPE_BYTES,
    Estimate,
    SampleSize,
    attention_bytes,
    device_type,
    image_tokens,
    model_facts,
    qk_bytes,
    refuse_existing_out,
    run_estimate,
    sample_sizes,
    weight_dtype,
)

THUMB_BYTES = 448 * 448 * 3  # an anchors run's stored thumbnail per image, at most
PREDICTION_BYTES = 100  # one probe-heads prediction row (parquet), rounded up


def _rollouts(cfg: Any, require_response: bool = True) -> list[Any]:
    from vlmcredit.data.rollouts import read_rollouts
    from vlmcredit.pipelines.rollout_checks import rollout_keys

    rollouts = read_rollouts(
        cfg.data,
        skip_bad=cfg.skip_bad,
        max_samples=cfg.max_samples,
        require_response=require_response,
        keys=rollout_keys(cfg),
    )
    if not rollouts.samples:
        raise VlmCreditError(f"--data {cfg.data}: no usable samples")
    return rollouts.samples


def dry_run_capture(cfg: Any) -> Estimate:
    """Estimate of `vlmcredit capture` for a `CaptureRunConfig`."""
    cfg.check()
    check_data_option(cfg.data)
    refuse_existing_out(cfg.out)
    facts, processor = model_facts(cfg.ckpt, cfg.trust_remote_code)
    g = facts.geometry
    samples = _rollouts(cfg, require_response=cfg.generate == 0)
    sizes = sample_sizes(processor, samples)
    notes = []
    if cfg.generate:  # responses not known yet: assume every one runs to --max-new-tokens
        n = cfg.generation.max_new_tokens
        sizes = [
            SampleSize(s.prompt, s.image, n, s.images) for s in sizes for _ in range(cfg.generate)
        ]
        notes.append(f"--generate {cfg.generate}: every response counted at {n} tokens")
    layers = len(parse_indices(cfg.layers, g.num_layers, "--layers") or range(g.num_layers))
    heads = len(parse_indices(cfg.heads, g.num_heads, "--heads") or range(g.num_heads))
    kept_heads = heads if cfg.reduce == "heads" else 1
    qk_layers = (
        len(parse_indices(cfg.qk_layers, g.num_layers, "--qk-layers") or range(g.num_layers))
        if cfg.qk
        else 0
    )
    dtype = weight_dtype(cfg.dtype, facts)
    element = DTYPE_BYTES[getattr(cfg, "store_dtype", "fp32")]
    return run_estimate(
        "capture",
        facts,
        sizes,
        dtype=dtype,
        device=device_type(cfg.device, cfg.device_map),
        batch_size=cfg.batch_size,
        forwards=2 if cfg.generate else 1,  # generation, then the teacher-forced capture
        kept=lambda s: attention_bytes(s, layers, kept_heads, element) + qk_bytes(s, qk_layers, g),
        kept_rule=f"attention {layers} x {kept_heads} x T x N x {element} B"
        + (f" + Q/K of {qk_layers} layer(s)" if qk_layers else ""),
        notes=notes,
    )


def dry_run_anchors(cfg: Any) -> Estimate:
    """Estimate of `vlmcredit anchors` (capturing now) for an `AnchorsRunConfig`."""
    from vlmcredit.pipelines.heads_choice import choose_heads

    cfg.check()
    if cfg.from_run is not None:
        raise VlmCreditError(
            "--dry-run with --from: nothing is captured (the run reads the capture run's "
            "tensors); a dry run estimates a run with --ckpt and --data"
        )
    refuse_existing_out(cfg.out)
    facts, processor = model_facts(cfg.ckpt, cfg.trust_remote_code)
    g = facts.geometry
    samples = _rollouts(cfg)
    no_image = [s.id for s in samples if not s.images]
    if no_image and not cfg.skip_bad:
        raise VlmCreditError(
            f"--data {cfg.data}: sample {no_image[0]} has no image, so no image connectivity "
            "(drop text-only rows or pass --skip-bad)"
        )
    samples = [s for s in samples if s.images]
    sizes = sample_sizes(processor, samples)
    choice = choose_heads(cfg.layers, cfg.heads, cfg.heads_json, g.num_layers, g.num_heads)
    kept_heads = len(choice.heads) if choice.reduce == "heads" else 1
    return run_estimate(
        "anchors",
        facts,
        sizes,
        dtype=weight_dtype(cfg.dtype, facts),
        device=device_type(cfg.device, cfg.device_map),
        batch_size=cfg.batch_size,
        kept=lambda s: attention_bytes(s, len(choice.layers), kept_heads),
        kept_rule=f"attention {len(choice.layers)} x {kept_heads} x T x N x 4 B",
        # the shard keeps the averaged T x N attention and a thumbnail per image
        written=lambda s: attention_bytes(s, 1, 1) + THUMB_BYTES * s.images,
    )


def dry_run_weights(cfg: Any) -> Estimate:
    """Estimate of `vlmcredit weights` for a `WeightsRunConfig`."""
    from vlmcredit.methods.registry import parse_methods
    from vlmcredit.pipelines.heads_choice import choose_heads
    from vlmcredit.pipelines.weights import combined_needs, method_configs

    cfg.check()
    methods = parse_methods(cfg.method)
    needs = combined_needs(methods, method_configs(methods, cfg.params))
    refuse_existing_out(cfg.out)
    facts, processor = model_facts(cfg.ckpt, cfg.trust_remote_code)
    g = facts.geometry
    sizes = sample_sizes(processor, _rollouts(cfg))
    choice = choose_heads(cfg.layers, cfg.heads, cfg.heads_json, g.num_layers, g.num_heads)
    layers = len(choice.layers) if needs.attention else 0
    kept_heads = len(choice.heads) if choice.reduce == "heads" else 1
    qk_layers = len({layer % g.num_layers for layer in needs.qk_layers})
    capture = needs.attention or bool(qk_layers)
    forwards = int(capture) + len(needs.logprobs)
    if capture and "image" in needs.logprobs and not needs.qk_states:
        forwards -= 1  # the capture forward also scores the real image (passes.run_passes)
    return run_estimate(
        "weights",
        facts,
        sizes,
        dtype=weight_dtype(cfg.dtype, facts),
        device=device_type(cfg.device, cfg.device_map),
        batch_size=cfg.batch_size,
        forwards=max(forwards, 1),
        kept=lambda s: attention_bytes(s, layers, kept_heads) + qk_bytes(s, qk_layers, g),
        kept_rule=f"passes {', '.join(needs.names()) or 'none'}: attention {layers} x "
        f"{kept_heads} x T x N x 4 B" + (f" + Q/K of {qk_layers} layer(s)" if qk_layers else ""),
        logits=bool(needs.logprobs),
        written=lambda s: 0,  # shards hold per-token weights only (INDEX_BYTES per token)
    )


def dry_run_probe_heads(cfg: Any) -> Estimate:
    """Estimate of `vlmcredit probe-heads` for a `ProbeHeadsConfig`: every configuration
    (baseline, gray-image control, each ablation) scores every question once."""
    from vlmcredit.data.mme import canonical_categories, read_mme
    from vlmcredit.models.inputs import prompt_text
    from vlmcredit.pipelines.probe_heads import ablation_plan, select_questions
    from vlmcredit.probes.mme_answer import GENERATE_TOKENS

    cfg.check()
    refuse_existing_out(cfg.out)
    wanted = (
        canonical_categories([c for c in cfg.categories.split(",") if c.strip()])
        if cfg.categories
        else None
    )
    try:
        mme = read_mme(cfg.mme, wanted, skip_bad=cfg.skip_bad, check_images=False)
    except VlmCreditError as exc:
        raise VlmCreditError(f"--mme {exc}") from None
    questions = select_questions(mme.questions, cfg.max_questions)
    if not questions:
        raise VlmCreditError(f"--mme {cfg.mme}: no questions to score")
    facts, processor = model_facts(cfg.ckpt, cfg.trust_remote_code)
    g = facts.geometry
    plan = ablation_plan(cfg.mode, g.num_layers, g.num_heads, cfg.layers, cfg.heads)
    configurations = len(plan) + 1 + (cfg.ablation == "mean")  # + gray control (+ means pass)
    answer = GENERATE_TOKENS if cfg.generate else 1
    tok = processor.tokenizer
    sizes = []
    for q in questions:
        n_image = image_tokens(processor, *_mme_image_size(q))
        text = prompt_text(processor, SimpleNamespace(prompt=q.question, images=[None]))
        prompt = len(tok(text, add_special_tokens=False)["input_ids"]) - 1 + n_image
        sizes.append(SampleSize(prompt, n_image, answer))
    return run_estimate(
        "probe-heads",
        facts,
        sizes,
        dtype=weight_dtype(cfg.dtype, facts),
        device=device_type(cfg.device, cfg.device_map),
        batch_size=cfg.batch_size,
        unit="questions",
        forwards=configurations,
        kept=lambda s: 0,
        kept_rule=f"answers only; the image-feature cache adds up to {cfg.feature_cache_mb:g} MB",
        written=lambda s: 0,
        extra_disk=configurations * len(questions) * PREDICTION_BYTES,
        index_bytes=0,
        notes=[
            f"{configurations} configurations ({len(plan) - 1} ablations, baseline, gray-image "
            "control" + (", means pass" if cfg.ablation == "mean" else "") + ") x "
            f"{len(questions)} questions"
        ],
    )


def _mme_image_size(q: Any) -> tuple[int, int]:
    """(height, width) of an MME question's image from its header, without decoding it."""
    from PIL import Image

    from vlmcredit.data.images import size_problem

    ref = q.image_ref
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
            width, height = img.size
    except Exception as exc:  # PIL reports unreadable data through many types
        raise VlmCreditError(f"--mme {q.image_id}: unreadable image ({exc})") from None
    refused = size_problem(width, height)
    if refused is not None:
        raise VlmCreditError(f"--mme {q.image_id}: image {refused}")
    return height, width
