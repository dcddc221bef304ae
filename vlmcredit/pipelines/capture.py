"""`vlmcredit capture` as a library call: rollouts -> run directory of captured tensors.

Runs on the shared skeleton (pipelines/skeleton.py): fixed batches, one shard each, resume at
the first uncommitted batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.data.rollout_files import check_data_option
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.provenance import file_sha1
from vlmcredit.formats.run import Run
from vlmcredit.models.selection import parse_indices
from vlmcredit.pipelines.distributed import rank_device
from vlmcredit.pipelines.skeleton import (
    batched,
    checkpoint_record,
    conclude,
    drive,
    marks_failure,
    open_run,
    refuse_taken,
)
from vlmcredit.probes.capture import REDUCTIONS, STORE_DTYPES, CaptureSpec
from vlmcredit.probes.response_attention import (
    CapturedSample,
    GenerationConfig,
    capture_samples,
    generate_responses,
)


@dataclass
class CaptureRunConfig:
    ckpt: str
    data: Path
    out: Path
    layers: str | None = "all"  # "all" / "0,3,5-7" / "-1"
    heads: str | None = "all"
    reduce: str = "mean"
    store_dtype: str = "fp32"  # dtype of the stored attention (part of the resume parameters)
    batch_size: int = 4
    max_samples: int | None = None
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    qk: bool = True
    qk_layers: str = "-1"
    generate: int = 0  # sample N responses per prompt instead of reading `response`
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    resume: bool = False
    skip_bad: bool = False
    trust_remote_code: bool = False
    prompt_key: str = "prompt"  # rollout columns (EasyR1: prompt_key "problem")
    image_key: str = "images"
    response_key: str = "response"

    def check(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise VlmCreditError(f"--reduce {self.reduce}: choose one of {', '.join(REDUCTIONS)}")
        if self.store_dtype not in STORE_DTYPES:
            raise VlmCreditError(
                f"--store-dtype {self.store_dtype}: choose one of {', '.join(STORE_DTYPES)}"
            )
        if self.batch_size < 1:
            raise VlmCreditError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise VlmCreditError(f"--max-samples {self.max_samples}: must be at least 1")
        if self.generate < 0:
            raise VlmCreditError(f"--generate {self.generate}: must be 0 or more")
        if not 0 < self.generation.top_p <= 1:
            raise VlmCreditError(f"--top-p {self.generation.top_p}: must be in (0, 1]")
        if self.generation.temperature < 0:
            raise VlmCreditError(f"--temperature {self.generation.temperature}: must be >= 0")

    def parameters(self) -> dict[str, Any]:
        """What must match for a resume to be valid (not the output folder or device)."""
        params = asdict(self)
        for key in ("out", "resume", "device", "device_map"):
            params.pop(key)
        params["data"] = str(Path(self.data).resolve())
        params["data_sha1"] = file_sha1(Path(self.data))
        return params


def expand_generations(samples: Sequence[Sample], n: int) -> list[Sample]:
    """n prompt-only copies of each sample, ids suffixed #g0..#g{n-1}: one group per prompt,
    sharing the prompt's id as `sample_id` (the signals key), completion_index k."""
    return [
        replace(
            s,
            response="",
            id=f"{s.id}#g{k}",
            meta={**s.meta, "generation": k},
            sample_id=s.trainer_id,
            completion_index=k,
        )
        for s in samples
        for k in range(n)
    ]


def sample_tensors(item: CapturedSample) -> dict[str, Any]:
    """Tensors stored for one sample; positions relative to the unpadded sequence start."""
    import torch

    layout = item.layout
    start = layout.prompt_span[0]
    sid = item.sample.id
    images = layout.images
    out: dict[str, Any] = {
        f"{sid}/response_ids": torch.tensor(item.response_ids, dtype=torch.long),
        f"{sid}/image_positions": torch.as_tensor(layout.image_positions - start),
        f"{sid}/image_owner": torch.as_tensor(layout.image_token_owner),
    }
    if images:
        out[f"{sid}/image_cells"] = torch.as_tensor(np.concatenate([im.cells for im in images]))
        out[f"{sid}/image_boxes"] = torch.as_tensor(
            np.concatenate([im.boxes for im in images]), dtype=torch.float32
        )
    cap = item.capture
    if cap.attention is not None:
        out[f"{sid}/attention"] = cap.attention
    for layer, q in cap.queries.items():
        out[f"{sid}/queries.{layer}"] = q
    for layer, k in cap.keys.items():
        out[f"{sid}/keys.{layer}"] = k
    return out


def sample_row(item: CapturedSample) -> dict[str, Any]:
    layout = item.layout
    start = layout.prompt_span[0]
    return {
        "id": item.sample.id,
        "sample_id": item.sample.trainer_id,
        "completion_index": item.sample.completion_index,
        "row": item.sample.meta.get("row"),
        "status": "done",
        "error": None,
        "image_refs": [str(r) for r in item.sample.meta.get("image_refs", [])],
        "prompt_span": [0, layout.prompt_span[1] - start],
        "response_span": [layout.response_span[0] - start, layout.response_span[1] - start],
        "num_response_tokens": layout.num_response_tokens,
        "num_image_tokens": int(layout.image_positions.size),
    }


@marks_failure
def run_capture(
    cfg: CaptureRunConfig,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Run:
    """Capture every sample of `cfg.data` into the run directory `cfg.out`."""
    from vlmcredit.data.rollouts import read_rollouts
    from vlmcredit.pipelines.rollout_checks import load_and_screen, rollout_keys

    cfg.check()
    check_data_option(cfg.data)
    refuse_taken(cfg.out, cfg.resume, parallel=True)
    cfg = replace(cfg, device=rank_device(cfg.device, cfg.device_map))
    rollouts = read_rollouts(
        cfg.data,
        skip_bad=cfg.skip_bad,
        max_samples=cfg.max_samples,
        require_response=cfg.generate == 0,
        keys=rollout_keys(cfg),
    )
    samples = rollouts.samples
    if cfg.generate:
        samples = expand_generations(samples, cfg.generate)
    ck, samples, screened_out = load_and_screen(cfg, samples)
    geo = ck.geometry
    spec = CaptureSpec(
        layers=parse_indices(cfg.layers, geo.num_layers, "--layers"),
        heads=parse_indices(cfg.heads, geo.num_heads, "--heads"),
        reduce=cfg.reduce,  # type: ignore[arg-type]
        store_dtype=cfg.store_dtype,  # type: ignore[arg-type]
        qk_layers=(
            parse_indices(cfg.qk_layers, geo.num_layers, "--qk-layers")
            or list(range(geo.num_layers))
        )
        if cfg.qk
        else (),
    )
    extra = {
        "checkpoint": checkpoint_record(ck, cfg.ckpt),
        "data_format": rollouts.format,
        "capture": {
            "layers": spec.layers or list(range(geo.num_layers)),
            "heads": spec.heads or list(range(geo.num_heads)),
            "reduce": spec.reduce,
            "qk_layers": list(spec.qk_layers),
            "attention_dtype": str(STORE_DTYPES[cfg.store_dtype]).removeprefix("torch."),
            "normalisation": "softmax over all keys of the row; image columns kept",
        },
    }
    bad = [*(b.record() for b in rollouts.bad_rows), *screened_out]
    run = open_run(Path(cfg.out), "capture", cfg.parameters(), cfg.resume, extra, bad)

    def work(batch: Sequence[Sample]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if cfg.generate:
            responses, _ = generate_responses(ck, batch, cfg.generation)
            batch = [replace(s, response=r) for s, r in zip(batch, responses, strict=True)]
        items = capture_samples(ck, batch, spec)
        tensors: dict[str, Any] = {}
        for item in items:
            tensors.update(sample_tensors(item))
        return [sample_row(item) for item in items], tensors

    drive(run, batched(samples, cfg.batch_size), lambda s: s.id, work, progress, log)
    return conclude(
        run,
        lambda: run.finish(
            samples_done=sum(r["status"] == "done" for r in run.rows),
            samples_bad=sum(r["status"] == "bad" for r in run.rows),
        ),
    )
