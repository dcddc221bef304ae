"""`--dry-run`: what a run would need (peak memory, disk, time), from the checkpoint's config and
safetensors headers and the input data, without loading any weights or writing anything.

Every number follows a stated rule (printed with it), so the user can redo it by hand:

* weights: parameters (from the safetensors headers) x bytes of the --dtype (auto: as stored);
* activations: the largest batch, batch x longest sequence x (4 x hidden + 3 x intermediate) x
  dtype bytes (residual stream, attention input/output and the MLP's widest tensors, kept once:
  inference frees each layer's activations before the next), plus the log-prob pass's fp32
  logits (batch x longest response x vocabulary x 4) when a method needs them;
* kept: what the command holds for a batch until its commit, and writes: captured attention
  as fp32 (layers x heads' x T x N x 4, heads' = 1 when averaged), Q/K states (layers x heads x
  (T + N) x head_dim x 4), the per-token tables (INDEX_BYTES per response token and image token);
* time: FLOPs = forwards x (2 x parameters x tokens + 4 x layers x tokens^2 x hidden) at an
  assumed throughput per device type (THROUGHPUT), an order of magnitude, not a promise.

Image tokens per image come from the processor geometry (Qwen's smart_resize to a multiple of
patch x merge within min/max pixels, then (h / patch) x (w / patch) / merge^2), prompt tokens
from the chat template with one placeholder per image, response tokens from the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.families import ModelGeometry

# Assumed sustained FLOP/s of a model forward, by device type (an estimate's stated basis).
THROUGHPUT = {"cpu": 5e10, "cuda": 1e14, "mps": 5e12, "xpu": 5e13}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "fp8": 1}
INDEX_BYTES = 64  # per-token tables and index tensors (ids, spans, boxes, weights), rounded up
MB = 1e6


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs of a checkpoint, read without its weights."""

    source: str
    family: str
    params: int
    stored_dtype: str
    geometry: ModelGeometry
    intermediate_size: int


@dataclass(frozen=True)
class SampleSize:
    """Token counts of one forward: prompt (image tokens included) and response."""

    prompt: int
    image: int
    response: int
    images: int = 1  # how many images the image tokens belong to

    @property
    def total(self) -> int:
        return self.prompt + self.response


@dataclass
class Estimate:
    """A dry run's answer; `lines()` is what the commands print."""

    command: str
    model: ModelFacts
    dtype: str
    device: str
    unit: str  # "samples" / "questions"
    sizes: list[SampleSize]
    batch_size: int
    forwards: int  # forwards per item (passes, or MME configurations)
    weight_bytes: int
    activation_bytes: int
    kept_batch_bytes: int
    disk_bytes: int
    flops: float
    kept_rule: str
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.kept_batch_bytes

    @property
    def seconds(self) -> float:
        return self.flops / THROUGHPUT[self.device]

    def lines(self) -> list[str]:
        m, g = self.model, self.model.geometry
        longest = max((s.total for s in self.sizes), default=0)
        return [
            f"dry run of {self.command}: {len(self.sizes)} {self.unit} "
            f"({sum(s.image for s in self.sizes)} image tokens, "
            f"{sum(s.response for s in self.sizes)} response tokens, longest sequence {longest}"
            f" tokens) on {m.source} ({m.family}, {m.params / 1e6:.1f}M parameters, "
            f"{g.num_layers} layers x {g.num_heads} heads, {self.dtype})",
            f"peak memory ~ {_size(self.peak_bytes)}: weights {_size(self.weight_bytes)} "
            f"(parameters x {DTYPE_BYTES[self.dtype]} B) + activations "
            f"{_size(self.activation_bytes)} (batch {self.batch_size} x {longest} tokens) + kept "
            f"per batch {_size(self.kept_batch_bytes)} ({self.kept_rule})",
            f"disk ~ {_size(self.disk_bytes)} written to --out",
            f"time ~ {_duration(self.seconds)}: {self.forwards} forward(s) per "
            f"{self.unit[:-1]}, {self.flops:.2g} FLOPs (2 x parameters x tokens + 4 x layers x "
            f"tokens^2 x hidden) at an assumed {THROUGHPUT[self.device]:.0e} FLOP/s on "
            f"{self.device}; an estimate: time a small run to calibrate it for this machine",
            *self.notes,
        ]


# -- the checkpoint ---------------------------------------------------------------------------
def model_facts(ckpt: str, trust_remote_code: bool = False) -> tuple[ModelFacts, Any]:
    """(facts, processor) of a checkpoint from config.json, the safetensors headers and the
    tokenizer / image processor files; no weights are read."""
    from transformers import AutoConfig

    from vlmcredit.models.describe import safetensors_summary
    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import (
        check_checkpoint_files,
        load_processor,
        read_model_type,
        resolve_checkpoint,
    )

    folder = resolve_checkpoint(ckpt)
    adapter = adapter_for(read_model_type(folder, ckpt), f"--ckpt {ckpt}")
    check_checkpoint_files(folder, ckpt)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    geo = ModelGeometry.from_config(config, f"--ckpt {ckpt}")
    params, dtype = safetensors_summary(folder)
    text = getattr(config, "text_config", config)
    inter = int(
        getattr(text, "moe_intermediate_size", None)
        or getattr(text, "intermediate_size", 0)
        or 4 * geo.hidden_size
    )
    processor = load_processor(folder, adapter, trust_remote_code)
    facts = ModelFacts(str(ckpt), adapter.cli_name, params, dtype, geo, inter)
    return facts, processor


def image_tokens(processor: Any, height: int, width: int) -> int:
    """Image tokens of one image as the processor resizes it (smart_resize, then patches)."""
    # the PIL backend's copy: the torchvision one needs torchvision installed
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = processor.image_processor
    patch, merge = int(ip.patch_size), int(ip.merge_size)
    size = getattr(ip, "size", None) or {}
    lo = size.get("shortest_edge") or getattr(ip, "min_pixels", None) or 56 * 56
    hi = size.get("longest_edge") or getattr(ip, "max_pixels", None) or 28 * 28 * 1280
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    return (h // patch) * (w // patch) // (merge * merge)


def sample_sizes(processor: Any, samples: Sequence[Any]) -> list[SampleSize]:
    """Token counts of rollout samples, from image sizes and the tokenizer."""
    from vlmcredit.models.inputs import prompt_text

    tok = processor.tokenizer
    sizes = []
    for s in samples:
        n_image = sum(image_tokens(processor, im.height, im.width) for im in s.images)
        if s.prompt_ids is not None:
            prompt = len(s.prompt_ids)  # already holds the image tokens
        else:
            # one placeholder token per image in the template, expanded to its image tokens
            text = len(tok(prompt_text(processor, s), add_special_tokens=False)["input_ids"])
            prompt = text - len(s.images) + n_image
        if isinstance(s.response, str):
            response = len(tok(s.response, add_special_tokens=False)["input_ids"])
        else:
            response = len(s.response)
        sizes.append(SampleSize(prompt, n_image, response, len(s.images)))
    return sizes


def weight_dtype(dtype: str, facts: ModelFacts) -> str:
    if dtype == "auto":
        return facts.stored_dtype if facts.stored_dtype in DTYPE_BYTES else "fp32"
    if dtype not in DTYPE_BYTES:
        raise VlmCreditError(f"--dtype {dtype}: choose one of auto, bf16, fp16, fp32")
    return dtype


def device_type(device: str | None, device_map: str | None) -> str:
    if device_map:
        return "cuda"
    kind = (device or "cpu").split(":")[0]
    return kind if kind in THROUGHPUT else "cpu"


# -- the arithmetic ---------------------------------------------------------------------------
def forward_flops(facts: ModelFacts, tokens: int) -> float:
    g = facts.geometry
    return 2.0 * facts.params * tokens + 4.0 * g.num_layers * tokens**2 * g.hidden_size


def activation_bytes(
    facts: ModelFacts, sizes: Sequence[SampleSize], batch: int, dtype: str, logits: bool
) -> int:
    """The largest batch's activations (module docstring), in batch order."""
    worst = 0
    for i in range(0, len(sizes), batch):
        chunk = sizes[i : i + batch]
        seq = max(s.total for s in chunk)
        width = 4 * facts.geometry.hidden_size + 3 * facts.intermediate_size
        act = len(chunk) * seq * width * DTYPE_BYTES[dtype]
        if logits:
            act += len(chunk) * max(s.response for s in chunk) * facts.geometry.vocab_size * 4
        worst = max(worst, act)
    return worst


def attention_bytes(s: SampleSize, layers: int, heads: int, element: int = 4) -> int:
    """Response x image attention of one sample: layers x heads x T x N x element bytes (4:
    fp32; capture's --store-dtype bf16/fp16 stores 2)."""
    return layers * heads * s.response * s.image * element


def qk_bytes(s: SampleSize, qk_layers: int, g: ModelGeometry) -> int:
    """fp32 post-RoPE Q of response tokens and K of image tokens (heads expanded)."""
    return qk_layers * g.num_heads * (s.response + s.image) * g.head_dim * 4


def run_estimate(
    command: str,
    facts: ModelFacts,
    sizes: list[SampleSize],
    *,
    dtype: str,
    device: str,
    batch_size: int,
    unit: str = "samples",
    forwards: int = 1,
    kept: Any,
    kept_rule: str,
    written: Any = None,
    logits: bool = False,
    extra_disk: int = 0,
    index_bytes: int = INDEX_BYTES,
    notes: Sequence[str] = (),
) -> Estimate:
    """The estimate of a run over `sizes`: `kept(size)` is what one item holds until its
    batch is committed, `written(size)` what it writes (default: what it keeps)."""
    if not sizes:
        raise VlmCreditError(f"dry run of {command}: the input holds nothing to run on")
    kept_each = [int(kept(s)) + index_bytes * (s.response + s.image) for s in sizes]
    written_each = (
        kept_each
        if written is None
        else [int(written(s)) + index_bytes * (s.response + s.image) for s in sizes]
    )
    kept_batch = max(sum(kept_each[i : i + batch_size]) for i in range(0, len(sizes), batch_size))
    return Estimate(
        command=command,
        model=facts,
        dtype=dtype,
        device=device,
        unit=unit,
        sizes=sizes,
        batch_size=batch_size,
        forwards=forwards,
        weight_bytes=facts.params * DTYPE_BYTES[dtype],
        activation_bytes=activation_bytes(facts, sizes, batch_size, dtype, logits),
        kept_batch_bytes=kept_batch,
        disk_bytes=sum(written_each) + extra_disk,
        flops=forwards * sum(forward_flops(facts, s.total) for s in sizes),
        kept_rule=kept_rule,
        notes=list(notes),
    )


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", MB), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 10 else f"{math.ceil(seconds)} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def refuse_existing_out(out: Path | None) -> None:
    """A dry run writes nothing; it still says now what the real run would refuse."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise VlmCreditError(f"--out {out}: is a file; choose a folder for the run")
