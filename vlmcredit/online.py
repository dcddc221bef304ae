"""Credit signals inside a training loop: weights for a batch as the trainer holds it, no disk.

    from vlmcredit import online
    w = online.weights(model, batch, method="anchors")       # (B, T) float, on the batch device

`batch` is what TRL and VERL both hold after a rollout:
    input_ids       (B, P + T)  prompt block (left padded) followed by the response block
    attention_mask  (B, P + T)
    response_mask   (B, T)      1 on response tokens; the response block is right padded
    pixel_values, image_grid_thw, and optionally mm_token_type_ids (built when missing)
Column t of the result belongs to response token t; padding gets weight 1.0 (the trainer's own
mask removes it). For a method that reads image attention, a row without image tokens (a
text-only prompt in a mixed dataset) gets weight 1.0 on every token, i.e. plain GRPO for that
row; `compute` returns those rows in `OnlineWeights.text_only_rows` and `weights` logs their
count. Any method of `vlmcredit.methods` works here: this module runs the model
passes the method declares on the batch and hands the arrays to the method, exactly as
`vlmcredit weights` does for a rollout file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.methods import registry
from vlmcredit.methods.logprob_options import collect as collect_pass_options

log = logging.getLogger(__name__)


@dataclass
class OnlineWeights:
    """`compute`'s result: the (B, T) weights and the rows that kept weight 1 for having no
    image tokens (only for methods that read image attention)."""

    weights: torch.Tensor
    text_only_rows: list[int] = field(default_factory=list)
    # Per batch row, the method's own output (e.g. connectivity and the anchor mask), or None
    # for a text-only row of an attention method.
    outputs: list[Any] = field(default_factory=list)


def methods() -> list[str]:
    """The names `weights(..., method=...)` accepts."""
    return registry.available()


def weights(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    method: str = "anchors",
    config: Any = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    processor: Any = None,
    **params: Any,
) -> torch.Tensor:
    """(B, T) per-token weights for the response block of `batch` by `method`.

    `config` is the method's config object (e.g. `AnchorConfig`); or pass its parameters as
    keyword arguments (`ratio=0.2`). `layers`/`heads` restrict the attention the method reads
    (default all); for Q/K methods (KAWHI) `heads` are the critical heads, in every layer.
    `processor` (the checkpoint's processor) is needed by methods that read the response text
    or the images (KAWHI): its tokenizer gives the text, its mean/std rebuild the images from
    `pixel_values`. Text-only rows get weight 1 (see `compute` for their count).
    """
    return _said(compute(model, batch, method, config, layers, heads, processor, **params))


def _said(result: OnlineWeights) -> torch.Tensor:
    """The weights, after logging how many rows kept weight 1 for having no image."""
    if result.text_only_rows:
        log.info(
            "vlmcredit.online: %d of %d batch rows have no image tokens and keep weight 1",
            len(result.text_only_rows),
            result.weights.shape[0],
        )
    return result.weights


def compute(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    method: str = "anchors",
    config: Any = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    processor: Any = None,
    attention: Sequence[torch.Tensor | None] | None = None,
    **params: Any,
) -> OnlineWeights:
    """`weights`, with the rows that kept weight 1 for having no image tokens and each row's
    method output. `attention`: per row the (L, 1, T, N) head-mean attention already captured
    in a forward over this batch (see `weights_fn(...).piggyback`); then no forward runs for it."""
    m = registry.get(method)
    for name, value in (("heads", heads), ("layers", layers)):
        if isinstance(value, str):
            raise VlmCreditError(
                f"online: {name}={value!r}: {name} takes a list of indices; method options go "
                "in config= (e.g. config=KawhiConfig(heads='all'))"
            )
    for key in ("input_ids", "attention_mask", "response_mask"):
        if key not in batch:
            raise VlmCreditError(f"batch: missing {key!r} (see vlmcredit.online for the layout)")
    if batch["response_mask"].shape[1] > batch["input_ids"].shape[1]:
        raise VlmCreditError("batch: response_mask is wider than input_ids")
    config = _method_config(m, config, params)
    needs = m.needs(config)
    options = {"logprobs": collect_pass_options([config])}
    passes = batch_passes(model, batch, needs, layers, heads, processor, options, attention)
    mask = batch["response_mask"]
    out = torch.ones(mask.shape, dtype=torch.float32)
    # A row with no image has no connectivity to measure: it keeps weight 1 (plain GRPO).
    text_only = [b for b, p in enumerate(passes) if needs.attention and p.attention is None]
    rows = [b for b in range(len(passes)) if b not in set(text_only)]
    results = m.run([passes[b] for b in rows], config) if rows else []
    outputs: list[Any] = [None] * len(passes)
    for b, result in zip(rows, results, strict=True):
        outputs[b] = result
        n = len(passes[b].token_ids)
        if n == 0:
            continue
        w = result.weight
        if result.sample_weight is not None:
            w = w * np.float32(result.sample_weight)
        out[b, :n] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return OnlineWeights(out.to(mask.device), text_only, outputs)


def _method_config(m: registry.Method, config: Any, params: Mapping[str, Any]) -> Any:
    """The method's config: the one given (checked), or built from keyword parameters."""
    if config is None:
        return m.make_config(dict(params))
    if params:
        raise VlmCreditError(f"method {m.name}: pass either config= or parameters, not both")
    if hasattr(config, "check"):
        config.check()
    return config


def batch_passes(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    needs: registry.Needs,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    processor: Any = None,
    options: Mapping[str, Any] | None = None,
    attention: Sequence[torch.Tensor | None] | None = None,
) -> list[registry.SamplePasses]:
    """Run the passes `needs` names on a trainer batch (attention: one forward, unless
    `attention` was captured already; Q/K: one; logprobs: one per input variant).
    `options["logprobs"]` as `logprob_options.collect`."""
    from vlmcredit.probes.response_attention import capture_batch_attention, response_rows

    unsupported = [
        n
        for n in needs.names()
        if n not in ("attention", "qk", "qk_states", "images", "text", "logprobs")
    ]
    if unsupported:
        raise VlmCreditError(
            f"online: pass(es) {', '.join(unsupported)} are not available in a trainer batch yet"
        )
    if (needs.images or needs.text) and processor is None:
        raise VlmCreditError(
            "online: this method reads the response text / images: pass processor=<the "
            "checkpoint's processor> to online.weights"
        )
    input_ids = batch["input_ids"]
    start = input_ids.shape[1] - batch["response_mask"].shape[1]
    lengths = response_rows(batch["response_mask"])
    if attention is not None and len(attention) != input_ids.shape[0]:
        raise VlmCreditError(
            f"online: {len(attention)} captured attention rows for a batch of {input_ids.shape[0]}"
        )
    scored: dict[str, Any] = {}
    if needs.attention and attention is None and "image" in needs.logprobs:
        # one forward for the capture and the real-image scores (SAYO; anchors beside ToR...)
        from vlmcredit.methods.logprob_options import DEFAULT_SCORE
        from vlmcredit.probes.response_attention import capture_batch_attention_and_scores

        opts = dict((options or {}).get("logprobs") or {})
        scores = [tuple(x) for x in opts.get("scores") or [DEFAULT_SCORE]]
        wanted = opts.get("entropy_variants")
        attention, scored["image"] = capture_batch_attention_and_scores(
            model, batch, layers, heads, scores, wanted is None or "image" in wanted
        )
    elif needs.attention and attention is None:
        attention = capture_batch_attention(model, batch, layers, heads)
    passes = []
    for b, n in enumerate(lengths):
        ids = input_ids[b, start : start + n].detach().cpu().numpy().astype(np.int64)
        row_attention = None if attention is None else attention[b]
        passes.append(
            registry.SamplePasses(
                sample_id=str(b),
                token_ids=ids,
                attention=None if row_attention is None else row_attention.numpy(),
            )
        )
    if needs.qk_layers or needs.qk_states or needs.images or needs.text:
        _fill_qk_image_text(model, batch, needs, passes, lengths, layers, heads, processor)
    if needs.logprobs or needs.attention:
        _fill_logprobs_layers(
            model, batch, needs, passes, lengths, layers, processor, options, scored
        )
    return passes


def _fill_logprobs_layers(
    model: Any,
    batch: Mapping[str, Any],
    needs: registry.Needs,
    passes: list[registry.SamplePasses],
    lengths: list[int],
    layers: Sequence[int] | None,
    processor: Any,
    options: Mapping[str, Any] | None,
    scored: Mapping[str, Any] | None = None,
) -> None:
    """Log p / entropy per variant (`scored`: those the capture forward scored already), the
    attention's layer indices, and (SAYO) the image-token
    boxes plus the batch's optional `boxes` (one list per row, in pixels of the image the
    processor resized: a trainer batch holds no original image sizes)."""
    from vlmcredit.methods.logprob_options import DEFAULT_SCORE, score_key
    from vlmcredit.models.families import ModelGeometry, adapter_of
    from vlmcredit.models.layout import build_layouts, prompt_vision_ids
    from vlmcredit.probes.logprobs import black_values, score_trainer_batch

    geo = ModelGeometry.from_config(model.config)
    if needs.attention:
        with_attn = [la.index for la in adapter_of(model).attention_layers(model)]
        captured = sorted(set(with_attn if layers is None else layers))
        start = batch["input_ids"].shape[1] - batch["response_mask"].shape[1]
        spans = [(start, start + n) for n in lengths]
        layouts = build_layouts(
            prompt_vision_ids(batch["input_ids"], geo, start),
            batch.get("attention_mask"),
            batch.get("image_grid_thw"),
            geo,
            spans,
        )
        for b, p in enumerate(passes):
            p.attention_layers, p.num_layers = captured, geo.num_layers
            images = layouts[b].images
            p.image_boxes = np.concatenate([im.boxes for im in images]) if images else None
            p.image_owner = np.asarray(layouts[b].image_token_owner)
            if "boxes" in batch:
                p.meta["boxes"] = batch["boxes"][b]
    if not needs.logprobs:
        return
    opts = dict((options or {}).get("logprobs") or {})
    scores = [tuple(s) for s in opts.get("scores") or [DEFAULT_SCORE]]
    perturbed = "perturbed" in needs.logprobs and batch.get("pixel_values") is not None
    black = black_values(processor.image_processor) if perturbed and processor else None
    variants = score_trainer_batch(
        model,
        batch,
        lengths,
        needs.logprobs,
        scores,
        opts.get("perturb"),
        black,
        opts.get("entropy_variants"),
        scored,
    )
    for variant, rows in variants.items():
        for p, row in zip(passes, rows, strict=True):
            for (temperature, top_p), (logp, entropy) in row.items():
                key = score_key(variant, temperature, top_p)
                p.logprobs[key] = logp
                if entropy is not None:
                    p.entropy[key] = entropy


def _fill_qk_image_text(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    needs: registry.Needs,
    passes: list[registry.SamplePasses],
    lengths: list[int],
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    processor: Any,
) -> None:
    """Q/K, images, cells and response text of a trainer batch, as `vlmcredit weights` fills
    them for a rollout file (the images are rebuilt from `pixel_values`: the exact pixels the
    processor resized, so the regions match the file-based run)."""
    from vlmcredit.models.families import ModelGeometry
    from vlmcredit.models.layout import build_layouts, prompt_vision_ids
    from vlmcredit.models.pixels import images_from_pixel_values
    from vlmcredit.models.response_text import response_text_spans
    from vlmcredit.probes.batch_qk import capture_batch_qk

    geo = ModelGeometry.from_config(model.config)
    input_ids = batch["input_ids"]
    start = input_ids.shape[1] - batch["response_mask"].shape[1]
    spans = [(start, start + n) for n in lengths]
    layouts = build_layouts(
        prompt_vision_ids(input_ids, geo, start),
        batch.get("attention_mask"),
        batch.get("image_grid_thw"),
        geo,
        spans,
    )
    captures = capture_batch_qk(model, batch, needs.qk_layers, lengths) if needs.qk_layers else []
    states = []
    if needs.qk_states:  # KAWHI's alignment ablations (probes.qk_states)
        from vlmcredit.probes.qk_states import batch_states

        states = batch_states(model, batch, needs.qk_states, lengths)
    images: list[Any] = []
    if needs.images and batch.get("pixel_values") is not None:
        ip = processor.image_processor
        images = images_from_pixel_values(
            batch["pixel_values"], batch["image_grid_thw"], geo, ip.image_mean, ip.image_std
        )
    all_layers = range(geo.num_layers) if layers is None else layers
    choice = None if heads is None else [(la, h) for la in all_layers for h in heads]
    next_image = 0
    for b, p in enumerate(passes):
        layout = layouts[b]
        p.head_choice = choice
        p.cell_pixels = geo.cell_pixels
        p.image_owner = np.asarray(layout.image_token_owner)
        p.image_cells = (
            np.concatenate([im.cells for im in layout.images])
            if layout.images
            else np.zeros((0, 3), np.int64)
        )
        if images:
            p.images = images[next_image : next_image + len(layout.images)]
        next_image += len(layout.images)
        if captures:
            p.queries = {k: v.numpy() for k, v in captures[b].queries.items()}
            p.keys = {k: v.numpy() for k, v in captures[b].keys.items()}
        if states:
            p.qk_states = {key: (q.numpy(), k.numpy()) for key, (q, k) in states[b].items()}
        if needs.text:
            p.response_text, p.token_spans = response_text_spans(processor.tokenizer, p.token_ids)


class OnlineWeightsFn:
    """A trainer's `weights_fn` for one method, able to capture inside the trainer's forward.

        fn = online.weights_fn("anchors")            # or ("kawhi", config=..., processor=...)
        VlmCreditGRPOTrainer(..., weights_fn=fn)

    Called as `fn(model, batch)` it is `online.weights` (one extra no-grad forward). When the
    method reads only the head-mean attention (`can_piggyback`; AT-RL anchors) a trainer that
    already runs a no-grad forward over prompt + completion (TRL's old log-probs when
    `num_iterations > 1`) arms `fn.piggyback(model, width)` around that forward and then calls
    `fn.from_capture(model, batch, capture)`: the same weights, without the extra forward.
    """

    def __init__(
        self,
        method: str = "anchors",
        config: Any = None,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        processor: Any = None,
        **params: Any,
    ) -> None:
        m = registry.get(method)
        config = _method_config(m, config, params)
        self.method, self.config = method, config
        self.layers, self.heads, self.processor = layers, heads, processor
        self.needs = m.needs(config)
        self.loss_denominator = m.denominator_for(config)
        self.last: OnlineWeights | None = None

    @property
    def can_piggyback(self) -> bool:
        """True when the attention of the trainer's own forward is all the method reads."""
        return set(self.needs.names()) == {"attention"}

    def __call__(self, model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._finish(
            compute(model, batch, self.method, self.config, self.layers, self.heads, self.processor)
        )

    def piggyback(self, model: Any, response_width: int) -> Any:
        """Context manager: capture in the forwards `model` runs inside it (a trainer's own)."""
        from vlmcredit.probes.piggyback import forward_capture

        if not self.can_piggyback:
            raise VlmCreditError(
                f"method {self.method} reads {', '.join(self.needs.names())}: only a method that "
                "reads the attention alone can capture in the trainer's forward"
            )
        return forward_capture(model, response_width, self.layers, self.heads)

    def from_capture(
        self, model: Any, batch: Mapping[str, torch.Tensor], capture: Any
    ) -> torch.Tensor:
        """The weights from the rows a `piggyback` block captured over this same batch."""
        rows = capture.rows
        if len(rows) != batch["input_ids"].shape[0]:
            raise VlmCreditError(
                f"piggyback capture: {len(rows)} rows captured in {capture.forwards} forward(s) "
                f"for a batch of {batch['input_ids'].shape[0]}; the trainer's forward did not "
                "cover the batch"
            )
        result = compute(
            model, batch, self.method, self.config, self.layers, self.heads, self.processor, rows
        )
        return self._finish(result)

    def _finish(self, result: OnlineWeights) -> torch.Tensor:
        self.last = result
        return _said(result)


def weights_fn(
    method: str = "anchors",
    config: Any = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    processor: Any = None,
    **params: Any,
) -> OnlineWeightsFn:
    """A `weights_fn` for `VlmCreditGRPOTrainer` (see `OnlineWeightsFn`)."""
    return OnlineWeightsFn(method, config, layers, heads, processor, **params)
