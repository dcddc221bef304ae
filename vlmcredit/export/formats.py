"""`vlmcredit export`: a run's trainer signals -> a folder a training recipe reads.

Formats: `parquet` (the contract as is), `jsonl` (the same rows as JSON lines), `verl` and
`trl` (the contract plus a README with the lines to add to a VERL config / TRL script). Every
folder holds `manifest.json` (the run's `signals` object, provenance) and README.md, and
`heads.json` when `--heads` is given. The folder is built beside `--out` and renamed into
place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmcredit import __version__
from vlmcredit.errors import VlmCreditError
from vlmcredit.export import trl_modes, verl_support
from vlmcredit.formats.files import atomic_write_bytes, atomic_write_json, make_temp_dir, now
from vlmcredit.formats.heads import HEADS_JSON as HEADS_FILE
from vlmcredit.formats.heads import heads_outside, read_heads
from vlmcredit.formats.run import MANIFEST, read_manifest
from vlmcredit.formats.signals import (
    SIGNALS_FILE,
    SIGNALS_JSONL,
    arrow_table,
    read_signals,
    write_signals_jsonl,
)

FORMATS = ("parquet", "jsonl", "verl", "trl")
BUILDING = ".vlmcredit-export-building"  # marks a scratch folder still being written


@dataclass
class ExportResult:
    out: Path
    format: str
    num_rows: int
    method: str
    files: list[str] = field(default_factory=list)


def _check_heads(path: Path, run_manifest: dict[str, Any]) -> bytes:
    """The bytes of a heads.json (or a probe-heads run folder's), validated by its reader and
    against the model the run's signals come from (its geometry in the run's manifest)."""
    if not path.exists():
        raise VlmCreditError(f"--heads {path}: no such file or run folder")
    try:
        report = read_heads(path)
    except VlmCreditError as exc:
        raise VlmCreditError(f"--heads {exc}") from None
    checkpoint = run_manifest.get("checkpoint")
    geometry = checkpoint.get("geometry") if isinstance(checkpoint, dict) else None
    if isinstance(geometry, dict) and {"num_layers", "num_heads"} <= geometry.keys():
        problem = heads_outside(
            report["critical"], int(geometry["num_layers"]), int(geometry["num_heads"])
        )
        if problem:
            raise VlmCreditError(
                f"--heads {path}: {problem}, the model of the run's signals "
                f"({checkpoint.get('id') or checkpoint.get('path')}); pass the heads.json of "
                "a probe-heads run on that model"
            )
    return (path / HEADS_FILE if path.is_dir() else path).read_bytes()


def export_run(run: Path, fmt: str, out: Path, heads: Path | None = None) -> ExportResult:
    """Export the trainer signals of run folder `run` as `fmt` into the new folder `out`."""
    if fmt not in FORMATS:
        raise VlmCreditError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    run, out = Path(run), Path(out)
    run_manifest = read_manifest(run)
    if not (run / SIGNALS_FILE).is_file():
        command = run_manifest.get("command", "?")
        raise VlmCreditError(
            f"{run}: this {command} run has no trainer signals ({SIGNALS_FILE}); export an "
            "anchors or weights run"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VlmCreditError(f"--out {out}: exists and is not empty; choose a new folder")
    heads_bytes = _check_heads(Path(heads), run_manifest) if heads is not None else None
    signals = read_signals(run)  # validates before anything is written

    out.parent.mkdir(parents=True, exist_ok=True)
    _drop_killed_exports(out)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        (tmp / BUILDING).touch()  # ours, unfinished: a later export may remove it if killed
        files = _write_folder(tmp, fmt, signals, run, run_manifest, heads_bytes, out)
        (tmp / BUILDING).unlink()
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, fmt, len(signals.frame), str(signals.meta["method"]), files)


def _drop_killed_exports(out: Path) -> None:
    """Remove the scratch folders of earlier exports to `out` that were killed before their
    rename (kill -9 runs no cleanup); only folders holding our BUILDING mark, nothing else."""
    for folder in out.parent.glob(f".{out.name}.*"):
        if folder.is_dir() and (folder / BUILDING).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def _write_folder(
    folder: Path,
    fmt: str,
    signals: Any,
    run: Path,
    run_manifest: dict[str, Any],
    heads_bytes: bytes | None,
    final: Path,
) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "jsonl":
        table_name = SIGNALS_JSONL
        write_signals_jsonl(folder / table_name, signals.frame)
    else:
        table_name = SIGNALS_FILE
        sink = pa.BufferOutputStream()
        pq.write_table(arrow_table(signals.frame, signals.meta.get("extra_columns")), sink)
        atomic_write_bytes(folder / table_name, sink.getvalue().to_pybytes())
    files = [table_name]
    if heads_bytes is not None:
        atomic_write_bytes(folder / HEADS_FILE, heads_bytes)
        files.append(HEADS_FILE)
    manifest = {
        "tool": "vlmcredit",
        "version": __version__,
        "command": "export",
        "format": fmt,
        "created": now(),
        "source_run": {
            "path": str(run.resolve()),
            "command": run_manifest.get("command"),
            "created": run_manifest.get("created"),
            "checkpoint": run_manifest.get("checkpoint"),
        },
        "heads": HEADS_FILE if heads_bytes is not None else None,
        "signals": signals.meta,
    }
    atomic_write_json(folder / MANIFEST, manifest)
    readme = README[fmt].format(
        method=signals.meta["method"],
        rows=len(signals.frame),
        denominator=signals.meta["loss_denominator"],
        scope=signals.meta["selection_scope"],
        tokenizer=signals.meta["tokenizer_sha1"][:12],
        heads=HEADS_NOTE if heads_bytes is not None else "",
        folder=final.resolve(),
        trl_matrix=trl_modes.matrix_markdown(),
        verl_matrix=verl_support.support_matrix_markdown(),
    )
    atomic_write_bytes(folder / "README.md", readme.encode())
    return [*files, MANIFEST, "README.md"]


_HEADER = """# vlmcredit trainer signals ({method})

{rows} responses; per-token advantage weights aligned to the response tokens (index 0 = first
generated token). Loss denominator: `{denominator}`; selection scope: `{scope}`; tokenizer
`{tokenizer}...` (the trainer's tokenizer must hash the same, or the adapters refuse the file).
Schema: docs/FORMATS.md, "trainer signals". Rows are keyed by `sample_id` (the rollout id) and
`response_id` (sha1 of the response token ids).
{heads}
"""

HEADS_NOTE = """
`heads.json`: the vision-critical heads the signals were computed with (every head's measured
drop included).
"""

README = {
    "parquet": _HEADER
    + """
## Reading

```python
from vlmcredit.formats.signals import read_signals
from vlmcredit.formats.provenance import tokenizer_hash

signals = read_signals("{folder}", tokenizer_sha1=tokenizer_hash(processor_or_tokenizer))
weights = signals.lookup(sample_id, response_token_ids)  # np.float32 per token, or None
```
""",
    "jsonl": _HEADER
    + """
## Reading

`signals.jsonl` holds one JSON object per row with the same columns as signals.parquet (lists
as JSON arrays). `vlmcredit.formats.signals.read_signals("{folder}")` reads and validates it.
""",
    "trl": _HEADER
    + """
## TRL (GRPOTrainer)

`pip install "vlmcredit[trl]"`. The training dataset needs a `sample_id` column holding the
rollout ids the signals were computed for. Replace `GRPOTrainer` by its subclass:

```python
from vlmcredit.export.trl import VlmCreditGRPOTrainer

trainer = VlmCreditGRPOTrainer(
    model=model,
    reward_funcs=reward_fn,
    args=grpo_config,
    train_dataset=dataset,            # with a "sample_id" column
    processing_class=processor,
    signals="{folder}",            # advantages *= weights, per token
)
trainer.train()
```

Completions are looked up by `sample_id` + their exact token ids (EOS included): record the
rollouts as TRL samples them with `vlmcredit.export.trl_rollouts.record_rollouts(trainer, PATH)`
(or `VlmCreditGRPOTrainer(..., record_rollouts=PATH)`) and compute the signals on that file. A
completion not in the file stops training with an error naming it and the batch's match rate;
`on_miss="keep"` trains it at weight 1, `on_miss="drop"` at weight 0. Every step logs
`vlmcredit/match_rate`, `vlmcredit/rows_found`, `vlmcredit/rows_missed`,
`vlmcredit/tokens_missed`. For fresh rollouts compute the weights online instead:
`VlmCreditGRPOTrainer(..., weights_fn=vlmcredit.online.weights_fn("anchors"))` (rows without
an image keep weight 1, logged as `vlmcredit/rows_text_only`); it captures the attention inside
TRL's own old-log-prob forward when TRL runs one (`num_iterations > 1`; logged as
`vlmcredit/piggyback`), else it runs one extra no-grad forward.
A `selected_tokens` denominator averages the loss over the selected tokens (loss types grpo,
bnpo, dapo, cispo, sapo, vespo); `loss_denominator="all_tokens"` overrides it.

Loss configurations (trl 1.16): "weighted" = every token's gradient is exactly its weight times
plain GRPO's (a real GRPO step per entry in vlmcredit's tests); the trainer refuses the others
when it is built. The entropy bonus (`entropy_coef`, `use_adaptive_entropy`) is refused too.

{trl_matrix}
""",
    "verl": _HEADER
    + """
## VERL

Install: `pip install "vlmcredit[verl]"` then `pip install --no-deps verl==0.9.1
transferqueue==0.1.11` (what vlmcredit's own tests run: the trainer mode's registration, its
advantage step on a real TransferQueue and VERL's engine loss on CPU; a full `main_ppo` run also
needs VERL's rollout server, vLLM or SGLang, on GPUs). The training parquet must carry each
rollout's id in `extra_info.sample_id`. Make VERL import the adapter in its processes (Ray
workers included), then pick the weighting:

verl 0.9 (v1 trainer, the default; tested):

```
VERL_USE_EXTERNAL_MODULES=vlmcredit.export.verl python -m verl.trainer.main_ppo \\
    algorithm.adv_estimator=grpo \\
    trainer.v1.trainer_mode=vlmcredit \\
    +vlmcredit.signals={folder} \\
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=vlmcredit.export.verl \\
    ...
```

verl 0.8 (and 0.9 with `trainer.use_v1=False`; experimental: the hook is tested on VERL's
`compute_advantage` and DataProto, not inside a legacy `fit`; verl 0.8 refuses
`selected_tokens`, its actor divides each micro-batch by its own token count):

```
VLMCREDIT_SIGNALS={folder} VERL_USE_EXTERNAL_MODULES=vlmcredit.export.verl \\
python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo \\
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=vlmcredit.export.verl \\
    +ray_kwargs.ray_init.runtime_env.env_vars.VLMCREDIT_SIGNALS={folder} \\
    ...
```

After VERL's advantage estimator the adapter multiplies `advantages` by the weights; with a
`selected_tokens` denominator it also narrows `response_mask` and `loss_mask` (the count VERL's
engine divides `token-mean` by) to the selected tokens. A batch with no selected token at all is
an error (0 / 0). The trainer refuses, when it is built, a policy loss or aggregation that does
not scale each token's gradient by its weight exactly (tests/export/test_verl_losses.py):

{verl_matrix}
`actor.use_kl_loss` and a non-zero `actor.entropy_coeff` add terms the weights do not reach
(weight-0 tokens still train); they are refused unless you pass
`+vlmcredit.allow_unweighted_terms=true` (legacy hook: `VLMCREDIT_ALLOW_UNWEIGHTED_TERMS=1`).
In your own trainer code: `vlmcredit.export.verl.weight_dataproto(batch,
VerlWeighting.from_path("{folder}", actor=config.actor_rollout_ref.actor))` after
`compute_advantage`.

Rollouts for `vlmcredit anchors` / `weights`, exactly as sampled (ids, EOS, images, group):
`vlmcredit.export.verl_rollouts.VerlRolloutWriter("rollouts.jsonl").write(batch)` on the batch
after its advantages. `trainer.rollout_data_dir` dumps hold decoded text only (no token ids or
images): `read_generation_dump` reads them for inspection, not for replay.
""",
}
