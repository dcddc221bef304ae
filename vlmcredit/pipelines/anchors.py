"""`vlmcredit anchors` as a library call: capture (or a capture run) -> graph -> Leiden -> anchors.

Per batch, the response x image attention is captured (or read from a finished capture run),
aggregated over the chosen layers and heads, and labelled by the registered AT-RL method
(`vlmcredit.methods.anchors`) on the shared run skeleton (`pipelines/skeleton.py`). Each
batch is committed as one shard holding everything per sample (the attention the graph was built
from, per-token results, cluster table, timing, image boxes and thumbnails), so a killed run
resumes at the first unfinished batch. The tables (anchors.parquet, anchors.json and the
trainer contract signals.parquet) are assembled from the shards at the end, so a resumed run
writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.analysis.anchors import AnchorConfig, AnchorResult, label_anchors, select_batch
from vlmcredit.analysis.connectivity import debias_sinks
from vlmcredit.analysis.graphs import write_graphml
from vlmcredit.data.rollout_files import check_data_option
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import sample_file_stem
from vlmcredit.formats.run import Run
from vlmcredit.methods.anchors import ANCHORS, aggregated_attention
from vlmcredit.methods.registry import SamplePasses
from vlmcredit.models.families import ModelGeometry
from vlmcredit.pipelines.anchors_source import (
    SourceItem,
    capture_items,
    capture_run_items,
    images_of_capture_run,
    sample_tensors,
)
from vlmcredit.pipelines.anchors_tables import write_tables
from vlmcredit.pipelines.distributed import rank_device
from vlmcredit.pipelines.heads_choice import HeadChoice, choose_heads, pair_indices
from vlmcredit.pipelines.skeleton import (
    batched,
    conclude,
    drive,
    marks_failure,
    open_run,
    refuse_taken,
)


@dataclass
class AnchorsRunConfig:
    out: Path
    ckpt: str | None = None  # capture with this checkpoint (or: tokenizer for --from)
    data: Path | None = None
    from_run: Path | None = None  # reuse a finished capture run instead of capturing
    layers: str | None = "all"
    heads: str | None = "all"
    heads_json: Path | None = None  # vision-critical heads from probe-heads
    analysis: AnchorConfig = field(default_factory=AnchorConfig)
    batch_size: int = 4
    max_samples: int | None = None
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    resume: bool = False
    skip_bad: bool = False
    trust_remote_code: bool = False
    graphml: bool = False  # also write each sample's clustered graph to graphs/<id>.graphml
    prompt_key: str = "prompt"  # rollout columns (EasyR1: prompt_key "problem")
    image_key: str = "images"
    response_key: str = "response"

    def check(self) -> None:
        if self.from_run is None and (self.ckpt is None or self.data is None):
            raise VlmCreditError(
                "anchors: pass --ckpt and --data (capture now) or --from RUN (a capture run)"
            )
        if self.from_run is not None and self.data is not None:
            raise VlmCreditError("--data and --from: the capture run already names its data")
        if self.heads_json is not None and self.heads not in (None, "", "all"):
            raise VlmCreditError("--heads and --heads-json: choose one way to pick heads")
        if self.batch_size < 1:
            raise VlmCreditError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise VlmCreditError(f"--max-samples {self.max_samples}: must be at least 1")
        if self.data is not None:
            check_data_option(self.data)
        if self.from_run is not None and not (Path(self.from_run) / "manifest.json").is_file():
            raise VlmCreditError(f"--from {self.from_run}: not a run folder (no manifest.json)")
        if self.heads_json is not None and not Path(self.heads_json).exists():
            raise VlmCreditError(f"--heads-json {self.heads_json}: no such file or run folder")
        self.analysis.check()

    def parameters(self) -> dict[str, Any]:
        from vlmcredit.formats.provenance import file_sha1

        params = asdict(self)
        for key in ("out", "resume", "device", "device_map"):
            params.pop(key)
        params["analysis"] = self.analysis.to_dict()
        if self.data is not None:
            params["data"] = str(Path(self.data).resolve())
            params["data_sha1"] = file_sha1(Path(self.data))
        if self.from_run is not None:
            params["from_run"] = str(Path(self.from_run).resolve())
        if self.heads_json is not None:
            params["heads_json"] = str(Path(self.heads_json).resolve())
        return params


# -- per-sample analysis ------------------------------------------------------------------------
def analyse(
    item: SourceItem, cfg: AnchorConfig, pairs: list[tuple[int, int]] | None
) -> tuple[AnchorResult, np.ndarray]:
    """Label anchors through the registered method; also returns the debiased (T, N)."""
    sample = SamplePasses(
        sample_id=str(item.row["id"]),
        token_ids=np.asarray(item.response_ids, dtype=np.int64),
        attention=item.attention,
        pairs=pairs,
    )
    att = aggregated_attention(sample)
    result = label_anchors(att, cfg)
    return result, debias_sinks(att, cfg.sink, cfg.sink_k)


@dataclass
class _Source:
    """Where the attention comes from: a checkpoint now, or a finished capture run."""

    processor: Any
    geometry: ModelGeometry
    checkpoint: dict[str, Any]
    units: list[Any]  # samples (capture now) or samples.parquet rows (--from)
    bad_rows: list[dict[str, Any]]
    ck: Any = None
    capture: Run | None = None


def _capture_now(cfg: AnchorsRunConfig) -> _Source:
    from vlmcredit.data.rollouts import read_rollouts
    from vlmcredit.formats.provenance import weights_hash
    from vlmcredit.pipelines.rollout_checks import load_and_screen, rollout_keys

    rollouts = read_rollouts(
        cfg.data, skip_bad=cfg.skip_bad, max_samples=cfg.max_samples, keys=rollout_keys(cfg)
    )
    bad_rows = [b.record() for b in rollouts.bad_rows]
    # Text-only rows have no connectivity to measure: refuse them before any work is done
    # (or record them as bad with --skip-bad), not half-way through the run.
    samples = []
    for s in rollouts.samples:
        if s.images:
            samples.append(s)
            continue
        problem = f"--data {cfg.data}: sample {s.id} has no image, so no image connectivity"
        if not cfg.skip_bad:
            raise VlmCreditError(f"{problem} (drop text-only rows or pass --skip-bad)")
        bad_rows.append({"id": s.id, "row": s.meta.get("row"), "status": "bad", "error": problem})
    ck, samples, screened_out = load_and_screen(cfg, samples)
    bad_rows.extend(screened_out)
    checkpoint = {
        "id": cfg.ckpt,
        "path": str(ck.path),
        "family": ck.adapter.cli_name,
        "weights_sha1": weights_hash(ck.path),
    }
    return _Source(ck.processor, ck.geometry, checkpoint, samples, bad_rows, ck=ck)


def _from_capture_run(cfg: AnchorsRunConfig) -> _Source:
    capture = Run.load(Path(cfg.from_run))
    if capture.manifest.get("command") != "capture":
        raise VlmCreditError(
            f"--from {cfg.from_run}: is a '{capture.manifest.get('command')}' run, not a "
            "capture run"
        )
    if capture.manifest.get("status") != "finished":
        raise VlmCreditError(
            f"--from {cfg.from_run}: the capture run did not finish; resume it first "
            "(vlmcredit capture ... --resume)"
        )
    checkpoint = {
        k: capture.manifest["checkpoint"][k] for k in ("id", "path", "family", "weights_sha1")
    }
    processor = _processor_for(cfg.ckpt, checkpoint, capture)
    geo = ModelGeometry(**capture.manifest["checkpoint"]["geometry"])
    rows = [r for r in capture.rows if r["status"] == "done"][: cfg.max_samples]
    if not rows:
        raise VlmCreditError(f"--from {cfg.from_run}: holds no captured samples")
    return _Source(processor, geo, checkpoint, rows, [], capture=capture)


def _captured_blocks(
    cfg: AnchorsRunConfig, choice: HeadChoice, capture: Run | None
) -> tuple[list[int], list[int]]:
    """The (layers, heads) axes of the attention blocks the analysis will read (-1 = averaged);
    with --from, reconciles the heads asked for with what the capture run holds."""
    if capture is None:
        return choice.layers, choice.heads if choice.reduce == "heads" else [-1]
    cap = capture.manifest["capture"]
    if choice.pairs is None and (choice.layers, choice.heads) != (cap["layers"], cap["heads"]):
        if cap["reduce"] != "heads" or not (
            set(choice.layers) <= set(cap["layers"]) and set(choice.heads) <= set(cap["heads"])
        ):
            raise VlmCreditError(
                f"--from {cfg.from_run}: captured layers {cap['layers']} x heads "
                f"{cap['heads']} (reduce {cap['reduce']}); the heads asked for need a "
                "capture with --reduce heads over them, or run anchors with --ckpt"
            )
        choice.pairs = [(la, h) for la in choice.layers for h in choice.heads]
    elif choice.pairs is not None and cap["reduce"] != "heads":
        raise VlmCreditError(
            f"--from {cfg.from_run}: the capture averaged its heads (--reduce "
            f"{cap['reduce']}); --heads-json needs a capture with --reduce heads, or run "
            "anchors with --ckpt"
        )
    return cap["layers"], cap["heads"] if cap["reduce"] == "heads" else [-1]


# -- the run ------------------------------------------------------------------------------------
@marks_failure
def run_anchors(
    cfg: AnchorsRunConfig,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Run:
    """Label anchor tokens for every sample into the run directory `cfg.out`."""
    from vlmcredit.formats.provenance import tokenizer_hash
    from vlmcredit.probes.capture import CaptureSpec

    cfg.check()
    refuse_taken(cfg.out, cfg.resume, parallel=True)
    cfg = replace(cfg, device=rank_device(cfg.device, cfg.device_map))
    total_start = time.perf_counter()
    src = _capture_now(cfg) if cfg.from_run is None else _from_capture_run(cfg)
    geo = src.geometry
    choice = choose_heads(cfg.layers, cfg.heads, cfg.heads_json, geo.num_layers, geo.num_heads)
    captured_layers, captured_heads = _captured_blocks(cfg, choice, src.capture)
    pairs = pair_indices(choice.pairs, captured_layers, captured_heads)
    extra = {
        "checkpoint": {
            **src.checkpoint,
            "tokenizer_sha1": tokenizer_hash(src.processor),
            "geometry": asdict(geo),
        },
        "attention": {
            "layers": choice.layers,
            "heads": choice.heads,
            "pairs": choice.pairs,
            "heads_source": choice.source,
            "aggregate": "mean over the chosen (layer, head) attention blocks",
            "normalisation": "softmax over all keys of the row; image columns kept",
        },
    }
    run = open_run(Path(cfg.out), "anchors", cfg.parameters(), cfg.resume, extra, src.bad_rows)
    if src.capture is None:
        spec = CaptureSpec(layers=choice.layers, heads=choice.heads, reduce=choice.reduce)

        def items_of(batch: Sequence[Any]) -> tuple[list[SourceItem], float]:
            return capture_items(src.ck, spec, batch)

        def key(sample: Any) -> str:
            return sample.id
    else:
        capture = src.capture
        images = images_of_capture_run(capture)

        def items_of(batch: Sequence[Any]) -> tuple[list[SourceItem], float]:
            return capture_run_items(capture, batch, images), 0.0

        def key(row: Any) -> str:
            return row["id"]

    # Wall time is booked batch by batch into the shards (each batch gets the time since the
    # previous one, model loading included in the first), so `timing.total` of a resumed run
    # sums every invocation up to its last commit, not only the last invocation.
    clock = [total_start]

    def work(batch: Sequence[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        items, capture_seconds = items_of(batch)
        rows, tensors = [], {}
        outcomes: list[tuple[AnchorResult, np.ndarray] | str] = []  # result, or the error
        for item in items:
            try:
                outcomes.append(analyse(item, cfg.analysis, pairs))
            except VlmCreditError as exc:
                if not cfg.skip_bad:
                    raise
                outcomes.append(str(exc))
        # --ratio-scope batch: the ratio holds over this batch's responses (no-op per response)
        select_batch([o[0] for o in outcomes if not isinstance(o, str)], cfg.analysis)
        now = time.perf_counter()
        done = sum(not isinstance(o, str) for o in outcomes)  # bad rows keep no shard
        wall, clock[0] = (now - clock[0]) / max(done, 1), now
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, str):
                rows.append({**item.row, "status": "bad", "error": outcome})
                continue
            result, att = outcome
            tensors.update(sample_tensors(item, result, att, capture_seconds / len(items), wall))
            if cfg.graphml and result.graph is not None:
                # before the commit: a resumed run rewrites the graphs of unfinished batches
                (run.path / "graphs").mkdir(exist_ok=True)
                stem = sample_file_stem(item.row["id"])
                write_graphml(result.graph, run.path / "graphs" / f"{stem}.graphml")
            rows.append({**item.row, "status": "done", "error": None})
        return rows, tensors

    drive(run, batched(src.units, cfg.batch_size), key, work, progress, log)

    def finish() -> None:
        since_last_batch = time.perf_counter() - clock[0]  # the shards hold the time before
        run.finish(
            anchors=write_tables(run, src.processor, cfg.analysis, since_last_batch, ANCHORS)
        )

    return conclude(run, finish)


def _processor_for(given: str | None, checkpoint: dict[str, Any], capture: Run) -> Any:
    """The tokenizer of a capture run's checkpoint (to decode tokens), hash-checked: from
    --ckpt when `given`, else from the path the capture run recorded."""
    from vlmcredit.formats.provenance import tokenizer_hash
    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor, read_model_type, resolve_checkpoint

    where = given or checkpoint["path"]
    try:
        folder = resolve_checkpoint(where)
    except VlmCreditError as exc:
        if given is None and not Path(where).is_absolute():
            # runs made before paths were recorded absolute: relative to where capture ran
            raise VlmCreditError(
                f"--from {capture.path}: the capture run recorded its checkpoint as the "
                f"relative path {where!r} (relative to the folder capture ran in), which is "
                "not a folder from here; pass --ckpt with that checkpoint for its tokenizer"
            ) from None
        raise VlmCreditError(
            f"{exc} (the capture run's checkpoint is needed for its tokenizer: pass --ckpt "
            "with its new location)"
        ) from None
    adapter = adapter_for(read_model_type(folder, where))
    processor = load_processor(folder, adapter)
    expected = capture.manifest["checkpoint"].get("tokenizer_sha1")
    if expected and tokenizer_hash(processor) != expected:
        raise VlmCreditError(
            f"--ckpt {where}: its tokenizer differs from the one the capture run {capture.path} "
            "used; pass the checkpoint the capture was made with"
        )
    return processor
