"""`vlmcredit weights --method NAME[,NAME...]` as a library call: rollouts -> signals per method.

Every method comes from the registry (`vlmcredit.methods`). The pipeline takes the union of the
model passes the chosen methods need, runs each pass once per batch for all of them (one
capture forward serves attention and Q/K), hands the arrays to every method and commits one
shard per batch on the shared run skeleton, so a killed run resumes at the first unfinished
batch. The signals tables are assembled from the shards at the end: with one method
`RUN/signals.parquet` (the run folder is then what `vlmcredit export` and the trainers read),
with several `RUN/<method>/signals.parquet`, each with its manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.data.rollout_files import check_data_option
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.run import Run, row_sample_id
from vlmcredit.methods.logprob_options import collect as collect_pass_options
from vlmcredit.methods.registry import (
    Method,
    MethodOutput,
    Needs,
    config_dict,
    parse_methods,
)
from vlmcredit.pipelines.distributed import rank_device
from vlmcredit.pipelines.heads_choice import choose_heads, chosen_pairs, pair_indices
from vlmcredit.pipelines.method_signals import signal_row, write_method_signals
from vlmcredit.pipelines.passes import run_passes
from vlmcredit.pipelines.regions import write_paragraph_tables
from vlmcredit.pipelines.skeleton import (
    batched,
    checkpoint_record,
    conclude,
    drive,
    marks_failure,
    open_run,
    refuse_taken,
)


@dataclass
class WeightsRunConfig:
    out: Path
    ckpt: str
    data: Path
    method: str = "anchors"  # one name or several, comma-separated
    params: dict[str, Any] = field(default_factory=dict)  # NAME=VALUE, or METHOD.NAME=VALUE
    layers: str | None = "all"
    heads: str | None = "all"
    heads_json: Path | None = None
    batch_size: int = 4
    max_samples: int | None = None
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    resume: bool = False
    skip_bad: bool = False
    trust_remote_code: bool = False
    prompt_key: str = "prompt"  # rollout columns (EasyR1: prompt_key "problem")
    image_key: str = "images"
    response_key: str = "response"

    def check(self) -> None:
        if self.batch_size < 1:
            raise VlmCreditError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise VlmCreditError(f"--max-samples {self.max_samples}: must be at least 1")
        check_data_option(self.data)
        if self.heads_json is not None and not Path(self.heads_json).exists():
            raise VlmCreditError(f"--heads-json {self.heads_json}: no such file or run folder")
        if self.heads_json is not None and self.heads not in (None, "", "all"):
            raise VlmCreditError("--heads and --heads-json: choose one way to pick heads")

    def parameters(self, configs: Mapping[str, Any]) -> dict[str, Any]:
        from vlmcredit.formats.provenance import file_sha1

        params = asdict(self)
        for key in ("out", "resume", "device", "device_map", "params"):
            params.pop(key)
        params["method"] = list(configs)
        params["configs"] = {name: config_dict(cfg) for name, cfg in configs.items()}
        params["data"] = str(Path(self.data).resolve())
        params["data_sha1"] = file_sha1(Path(self.data))
        if self.heads_json is not None:
            params["heads_json"] = str(Path(self.heads_json).resolve())
        return params


def method_configs(methods: Sequence[Method], params: Mapping[str, Any]) -> dict[str, Any]:
    """Each method's config with its share of `params` applied.

    With one method a key is that method's parameter; with several, prefix it with the method
    name (`anchors.ratio=0.2`).
    """
    names = {m.name for m in methods}
    own: dict[str, dict[str, Any]] = {m.name: {} for m in methods}
    for key, value in params.items():
        head, _, rest = key.partition(".")
        if head in names and rest:
            own[head][rest] = value
        elif len(methods) == 1:
            own[methods[0].name][key] = value
        else:
            raise VlmCreditError(
                f"--param {key}: with several methods, prefix the parameter with the method "
                f"name ({', '.join(sorted(names))}), e.g. {methods[0].name}.{key}"
            )
    return {m.name: m.make_config(own[m.name]) for m in methods}


def combined_needs(methods: Sequence[Method], configs: Mapping[str, Any]) -> Needs:
    """The union of the passes the methods need: each pass runs once for all of them."""
    needs = Needs()
    for m in methods:
        needs = needs.union(m.needs(configs[m.name]))
    return needs


# Per sample: its share of its batch's wall seconds (no method is named so: methods' tensors
# are "<id>/<method>.<name>").
WALL = "wall_seconds"


def _tensors(sid: str, name: str, out: MethodOutput) -> dict[str, Any]:
    import torch

    prefix = f"{sid}/{name}."
    tensors = {prefix + "weight": torch.from_numpy(np.asarray(out.weight, dtype=np.float32))}
    if out.mask is not None:
        tensors[prefix + "mask"] = torch.from_numpy(np.asarray(out.mask, dtype=np.uint8))
    for column, values in out.columns.items():
        tensors[prefix + "col." + column] = torch.from_numpy(np.ascontiguousarray(values))
    if out.sample_weight is not None:
        tensors[prefix + "sample_weight"] = torch.tensor([float(out.sample_weight)])
    return tensors


def _output(t: Mapping[str, Any], name: str, method: Method) -> MethodOutput:
    prefix = f"{name}."
    columns = {
        key[len(prefix) + 4 :]: value.numpy()
        for key, value in t.items()
        if key.startswith(prefix + "col.")
    }
    return MethodOutput(
        weight=t[prefix + "weight"].numpy(),
        mask=t[prefix + "mask"].numpy().astype(bool) if prefix + "mask" in t else None,
        columns={c: v.astype(method.columns.get(c, v.dtype)) for c, v in columns.items()},
        sample_weight=float(t[prefix + "sample_weight"][0])
        if prefix + "sample_weight" in t
        else None,
    )


@marks_failure
def run_weights(
    cfg: WeightsRunConfig,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Run:
    """Compute the chosen methods' signals for every sample into the run folder `cfg.out`."""
    from vlmcredit.data.rollouts import read_rollouts
    from vlmcredit.pipelines.capture import sample_row
    from vlmcredit.pipelines.rollout_checks import load_and_screen, rollout_keys
    from vlmcredit.probes.capture import CaptureSpec

    cfg.check()
    methods = parse_methods(cfg.method)
    configs = method_configs(methods, cfg.params)
    needs = combined_needs(methods, configs)
    refuse_taken(cfg.out, cfg.resume, parallel=True)
    cfg = replace(cfg, device=rank_device(cfg.device, cfg.device_map))
    start = time.perf_counter()
    rollouts = read_rollouts(
        cfg.data, skip_bad=cfg.skip_bad, max_samples=cfg.max_samples, keys=rollout_keys(cfg)
    )
    samples = rollouts.samples
    ck, samples, screened_out = load_and_screen(cfg, samples)
    geo = ck.geometry
    choice = choose_heads(cfg.layers, cfg.heads, cfg.heads_json, geo.num_layers, geo.num_heads)
    captured_heads = choice.heads if choice.reduce == "heads" else [-1]
    pairs = pair_indices(choice.pairs, choice.layers, captured_heads)
    head_choice = chosen_pairs(choice)  # the heads Q/K methods (KAWHI) average
    qk_layers = sorted({layer % geo.num_layers for layer in needs.qk_layers})
    spec = CaptureSpec(
        layers=choice.layers,
        heads=choice.heads,
        reduce=choice.reduce,  # type: ignore[arg-type]
        attention=needs.attention,
        qk_layers=qk_layers,
    )
    extra = {
        "checkpoint": checkpoint_record(ck, cfg.ckpt),
        "passes": needs.names(),
        "attention": {
            "layers": choice.layers,
            "heads": choice.heads,
            "pairs": choice.pairs,
            "heads_source": choice.source,
        }
        if needs.attention
        else None,
        # the heads whose Q/K a method averages (KAWHI's critical heads), when Q/K is read
        "qk_heads": {"pairs": head_choice, "source": choice.source}
        if needs.qk_layers or needs.qk_states
        else None,
    }
    # what the logprobs pass scores (temperatures, top-p, perturbation), from the configs
    pass_options = {"logprobs": collect_pass_options(configs.values())}
    if needs.logprobs:
        extra["logprobs"] = {"variants": list(needs.logprobs), **pass_options["logprobs"]}
    bad = [*(b.record() for b in rollouts.bad_rows), *screened_out]
    run = open_run(Path(cfg.out), "weights", cfg.parameters(configs), cfg.resume, extra, bad)
    # Wall time is booked batch by batch into the shards (each batch gets the time since the
    # previous commit, reading and model loading included in the first), so `seconds` of a
    # resumed run sums every invocation up to its last commit, as anchors' `timing.total` does.
    clock = [start]

    def work(batch: Sequence[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        import torch

        captured, passes = run_passes(
            ck, batch, needs, spec, pairs, pass_options, head_choice=head_choice
        )
        tensors: dict[str, Any] = {}
        for sample in passes:
            tensors[f"{sample.sample_id}/response_ids"] = torch.from_numpy(sample.token_ids)
        for m in methods:
            for sample, out in zip(passes, m.run(passes, configs[m.name]), strict=True):
                tensors.update(_tensors(sample.sample_id, m.name, out))
        now = time.perf_counter()
        share, clock[0] = (now - clock[0]) / max(len(passes), 1), now
        for sample in passes:
            tensors[f"{sample.sample_id}/{WALL}"] = torch.tensor([share], dtype=torch.float64)
        return [sample_row(item) for item in captured], tensors

    drive(run, batched(samples, cfg.batch_size), lambda s: s.id, work, progress, log)

    def finish() -> None:
        summary = write_signal_tables(run, methods, configs)
        write_paragraph_tables(run, methods, ck.tokenizer)
        run.finish(
            weights=summary,
            seconds=booked_seconds(run) + time.perf_counter() - clock[0],
            invocations=1 + len(run.manifest.get("resumed_at", [])),
        )

    return conclude(run, finish)


def booked_seconds(run: Run) -> float:
    """The wall seconds the committed batches booked in the run's shards (every invocation;
    in a data-parallel run every rank's), read from those tensors alone."""
    from safetensors import safe_open

    done = {r["id"] for r in run.rows if r["status"] == "done"}
    shards = sorted({r["shard"] for r in run.rows if isinstance(r.get("shard"), str)})
    total = 0.0
    for shard in shards:
        with safe_open(str(run.path / shard), framework="np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sid, _, name = key.rpartition("/")
                if name == WALL and sid in done:
                    total += float(f.get_tensor(key)[0])
    return total


def write_signal_tables(
    run: Run, methods: Sequence[Method], configs: Mapping[str, Any]
) -> dict[str, Any]:
    """One signals table per method from the run's shards (root folder when only one)."""
    rows: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    for row in run.rows:
        if row["status"] != "done":
            continue
        t = run.tensors(row["id"])
        ids = t["response_ids"].tolist()
        for m in methods:
            # keyed by the trainer's id: a group's rows share it, their response ids differ
            rows[m.name].append(signal_row(row_sample_id(row), ids, _output(t, m.name, m)))
    summary = {}
    for m in methods:
        if not rows[m.name]:
            raise VlmCreditError(f"{run.path}: no sample finished, so there are no signals")
        folder = None if len(methods) == 1 else run.path / m.name
        path = write_method_signals(run, m, configs[m.name], rows[m.name], folder)
        weights = np.concatenate([r["weight"] for r in rows[m.name]])
        summary[m.name] = {
            "signals": str(path.relative_to(run.path)),
            "num_responses": len(rows[m.name]),
            "num_tokens": int(weights.size),
            "mean_weight": float(weights.mean()) if weights.size else 0.0,
            "share_nonzero": float((weights != 0).mean()) if weights.size else 0.0,
            "loss_denominator": m.denominator_for(configs[m.name]),
        }
    return summary
