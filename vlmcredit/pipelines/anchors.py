"""`vlmcredit anchors` as a library call: capture (or a capture run) -> graph -> Leiden -> anchors.

Per batch, the response x image attention is captured (or read from a finished capture run),
aggregated over the chosen layers and heads, and labelled by `vlmcredit.analysis.anchors`. Each
batch is committed as one shard holding everything per sample (the attention the graph was built
from, per-token results, cluster table, timing, image boxes and thumbnails), so a killed run
resumes at the first unfinished batch. The tables (anchors.parquet, anchors.json and the
trainer contract signals.parquet) are assembled from the shards at the end, so a resumed run
writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.analysis.anchors import AnchorConfig, AnchorResult, label_anchors
from vlmcredit.analysis.connectivity import aggregate_attention, debias_sinks
from vlmcredit.analysis.graphs import write_graphml
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import sample_file_stem
from vlmcredit.formats.run import Run
from vlmcredit.pipelines.anchors_source import (
    SourceItem,
    capture_batches,
    capture_run_batches,
    sample_tensors,
)
from vlmcredit.pipelines.anchors_tables import write_tables
from vlmcredit.pipelines.capture import CRASH_ENV


@dataclass
class AnchorsRunConfig:
    out: Path
    ckpt: str | None = None  # capture with this checkpoint (or: tokenizer for --from)
    data: Path | None = None
    from_run: Path | None = None  # reuse a finished capture run instead of capturing
    layers: str | None = None
    heads: str | None = None
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
        if self.data is not None and not Path(self.data).is_file():
            raise VlmCreditError(f"--data {self.data}: no such file")
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


# -- head selection -----------------------------------------------------------------------------
@dataclass
class HeadChoice:
    """Which attention to aggregate: capture options and the (layer, head) pairs to average."""

    layers: list[int]
    heads: list[int]
    reduce: str  # "mean" when every captured (layer, head) is averaged, else "heads"
    pairs: list[tuple[int, int]] | None  # absolute (layer, head); None = all captured
    source: str  # "all", "--layers/--heads" or the heads.json path


def choose_heads(cfg: AnchorsRunConfig, num_layers: int, num_heads: int) -> HeadChoice:
    from vlmcredit.models.selection import parse_indices

    layers = parse_indices(cfg.layers, num_layers, "--layers") or list(range(num_layers))
    if cfg.heads_json is None:
        heads = parse_indices(cfg.heads, num_heads, "--heads") or list(range(num_heads))
        source = "all" if cfg.layers in (None, "all") and cfg.heads in (None, "all") else "select"
        return HeadChoice(layers, heads, "mean", None, source)
    from vlmcredit.analysis.heads import read_heads

    critical = read_heads(Path(cfg.heads_json))["critical"]
    if not critical:
        raise VlmCreditError(
            f"--heads-json {cfg.heads_json}: lists no vision-critical heads (lower the "
            "probe-heads --threshold, or run anchors without --heads-json)"
        )
    pairs: list[tuple[int, int]] = []
    for entry in critical:
        head = int(entry["head"])
        if head >= num_heads:
            raise VlmCreditError(
                f"--heads-json {cfg.heads_json}: head {head} does not exist in a model with "
                f"{num_heads} heads (heads.json from another checkpoint?)"
            )
        if entry.get("layer") is None:
            pairs.extend((layer, head) for layer in layers)
        elif int(entry["layer"]) in layers:
            pairs.append((int(entry["layer"]), head))
    if not pairs:
        raise VlmCreditError(
            f"--heads-json {cfg.heads_json}: none of its critical heads lies in --layers"
        )
    used_layers = sorted({p[0] for p in pairs})
    used_heads = sorted({p[1] for p in pairs})
    if len(pairs) == len(used_layers) * len(used_heads):  # a full grid: let capture average it
        return HeadChoice(used_layers, used_heads, "mean", None, str(cfg.heads_json))
    return HeadChoice(used_layers, used_heads, "heads", sorted(pairs), str(cfg.heads_json))


def pair_indices(
    pairs: Sequence[tuple[int, int]] | None, layers: Sequence[int], heads: Sequence[int]
) -> list[tuple[int, int]] | None:
    """Absolute (layer, head) pairs -> indices into a captured (L, H, ...) block."""
    if pairs is None:
        return None
    lpos = {layer: i for i, layer in enumerate(layers)}
    hpos = {head: i for i, head in enumerate(heads)}
    missing = [p for p in pairs if p[0] not in lpos or p[1] not in hpos]
    if missing:
        raise VlmCreditError(
            f"the capture run lacks (layer, head) {missing[0]} that --heads-json asks for; "
            "capture those layers with --reduce heads, or run anchors with --ckpt"
        )
    return [(lpos[layer], hpos[head]) for layer, head in pairs]


# -- per-sample analysis ------------------------------------------------------------------------
def analyse(
    item: SourceItem, cfg: AnchorConfig, pairs: list[tuple[int, int]] | None
) -> tuple[AnchorResult, np.ndarray]:
    """Aggregate the captured block and label anchors; also returns the debiased (T, N)."""
    att = aggregate_attention(item.attention, pairs)
    if att.shape[1] == 0:
        raise VlmCreditError(
            f"sample {item.row['id']}: has no image tokens, so there is no connectivity to "
            "measure (drop text-only rows or pass --skip-bad)"
        )
    result = label_anchors(att, cfg)
    return result, debias_sinks(att, cfg.sink, cfg.sink_k)


# -- the run ------------------------------------------------------------------------------------
def run_anchors(
    cfg: AnchorsRunConfig,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Run:
    """Label anchor tokens for every sample into the run directory `cfg.out`."""
    from vlmcredit.formats.provenance import tokenizer_hash
    from vlmcredit.models.families import ModelGeometry
    from vlmcredit.probes.capture import CaptureSpec

    cfg.check()
    if (Path(cfg.out) / "manifest.json").exists() and not cfg.resume:
        raise VlmCreditError(
            f"--out {cfg.out}: already holds a run; pass --resume to continue it or choose a "
            "new folder"
        )
    total_start = time.perf_counter()
    bad_rows: list[dict[str, Any]] = []
    if cfg.from_run is None:
        from vlmcredit.data.rollouts import read_rollouts
        from vlmcredit.formats.provenance import weights_hash
        from vlmcredit.models.loading import load_checkpoint

        rollouts = read_rollouts(cfg.data, skip_bad=cfg.skip_bad, max_samples=cfg.max_samples)
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
            bad_rows.append(
                {"id": s.id, "row": s.meta.get("row"), "status": "bad", "error": problem}
            )
        if not samples:
            raise VlmCreditError(f"--data {cfg.data}: no usable samples")
        ck = load_checkpoint(cfg.ckpt, cfg.dtype, cfg.device, cfg.device_map, cfg.trust_remote_code)
        processor, geo = ck.processor, ck.geometry
        checkpoint = {
            "id": cfg.ckpt,
            "path": str(ck.path),
            "family": ck.adapter.cli_name,
            "weights_sha1": weights_hash(ck.path),
        }
        total = len(samples)
    else:
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
        processor = _processor_for(cfg.ckpt or checkpoint["path"], checkpoint, capture)
        geo = ModelGeometry(**capture.manifest["checkpoint"]["geometry"])
        done_rows = [r for r in capture.rows if r["status"] == "done"][: cfg.max_samples]
        total = len(done_rows)
        if not total:
            raise VlmCreditError(f"--from {cfg.from_run}: holds no captured samples")

    choice = choose_heads(cfg, geo.num_layers, geo.num_heads)
    if cfg.from_run is not None:
        cap = capture.manifest["capture"]
        if choice.pairs is None and (choice.layers, choice.heads) != (
            cap["layers"],
            cap["heads"],
        ):
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
        captured_layers, captured_heads = cap["layers"], cap["heads"]
        if cap["reduce"] != "heads":
            captured_heads = [-1]
    else:
        captured_layers = choice.layers
        captured_heads = choice.heads if choice.reduce == "heads" else [-1]
    pairs = pair_indices(choice.pairs, captured_layers, captured_heads)

    extra = {
        "checkpoint": {
            **checkpoint,
            "tokenizer_sha1": tokenizer_hash(processor),
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
    run = Run.open(Path(cfg.out), "anchors", cfg.parameters(), cfg.resume, extra)
    done = run.done_ids()
    if not run.rows and bad_rows:
        run.commit(bad_rows)
    if cfg.from_run is None:
        spec = CaptureSpec(layers=choice.layers, heads=choice.heads, reduce=choice.reduce)
        source = capture_batches(ck, spec, samples, cfg.batch_size, done)
    else:
        source = capture_run_batches(capture, cfg.batch_size, cfg.max_samples, done)
    ids = {s.id for s in samples} if cfg.from_run is None else {r["id"] for r in done_rows}
    finished = len(done & ids)
    log(f"{total} samples; {finished} already done")
    if progress:
        progress(finished, total)
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    committed = 0
    for items, capture_seconds in source:
        rows, tensors = [], {}
        for item in items:
            try:
                result, att = analyse(item, cfg.analysis, pairs)
            except VlmCreditError as exc:
                if not cfg.skip_bad:
                    raise
                rows.append({**item.row, "status": "bad", "error": str(exc)})
                continue
            share = capture_seconds / len(items)
            tensors.update(sample_tensors(item, result, att, share))
            if cfg.graphml and result.graph is not None:
                # before the commit: a resumed run rewrites the graphs of unfinished batches
                (run.path / "graphs").mkdir(exist_ok=True)
                stem = sample_file_stem(item.row["id"])
                write_graphml(result.graph, run.path / "graphs" / f"{stem}.graphml")
            rows.append({**item.row, "status": "done", "error": None})
        run.commit(rows, tensors)
        committed += 1
        finished += len(items)
        if progress:
            progress(finished, total)
        if crash_after and committed >= crash_after:
            os._exit(137)  # simulated kill -9 (tests)
    summary = write_tables(run, processor, cfg.analysis, time.perf_counter() - total_start)
    run.finish(anchors=summary)
    return run


def _processor_for(where: str, checkpoint: dict[str, Any], capture: Run) -> Any:
    """The tokenizer of a capture run's checkpoint (to decode tokens), hash-checked."""
    from vlmcredit.formats.provenance import tokenizer_hash
    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor, read_model_type, resolve_checkpoint

    try:
        folder = resolve_checkpoint(where)
    except VlmCreditError as exc:
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
