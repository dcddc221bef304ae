"""`vlmcredit compare`: how credit methods (or checkpoints) agree on the same rollouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vlmcredit.cli import options
from vlmcredit.cli.common import echo_err, progress_bar, user_errors
from vlmcredit.errors import VlmCreditError

if TYPE_CHECKING:
    from vlmcredit.pipelines.compare_checkpoints import CheckpointCompareConfig


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _signed(value: object) -> str:
    return "-" if value is None else f"{value:+.3f}" if isinstance(value, float) else str(value)


@user_errors
def compare(
    runs: list[Path] | None = typer.Argument(
        None,
        help="Method comparison: signals folders or multi-method weights runs over the same "
        "rollouts.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder to write compare.json/.parquet (or checkpoints.json) into."
    ),
    ckpts: list[str] | None = typer.Option(
        None,
        "--ckpt",
        help="Checkpoint comparison: a checkpoint, repeated in training order (--ckpt A --ckpt "
        "B ...); each runs anchors on --data into OUT/ckpt-<k>/anchors (and probe-heads on "
        "--mme into OUT/ckpt-<k>/heads).",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="With --ckpt: the rollouts every checkpoint is run on."
    ),
    mme: Path | None = typer.Option(
        None, "--mme", help="With --ckpt: also ablate heads on this MME set (probe-heads)."
    ),
    anchors_runs: list[Path] | None = typer.Option(
        None,
        "--anchors-run",
        help="Checkpoint comparison of finished runs: an anchors run per checkpoint, in order.",
    ),
    heads_runs: list[Path] | None = typer.Option(
        None,
        "--heads-run",
        help="With --anchors-run (or alone): a probe-heads run per checkpoint, in the same order.",
    ),
    max_questions: int | None = typer.Option(
        None, "--max-questions", help="With --mme: quick look at about N MME questions."
    ),
    batch_size: int = options.BATCH_SIZE,
    max_samples: int | None = options.MAX_SAMPLES,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    device_map: str | None = options.DEVICE_MAP,
    resume: bool = typer.Option(
        False, "--resume", help="Checkpoint comparison: continue in --out, reusing finished runs."
    ),
    prompt_key: str = options.PROMPT_KEY,
    image_key: str = options.IMAGE_KEY,
    response_key: str = options.RESPONSE_KEY,
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    quiet: bool = options.QUIET,
    as_json: bool = typer.Option(False, "--json", help="Print the result JSON instead of a table."),
) -> None:
    """Compare credit methods (RUN...: token overlap and Spearman of every method pair) or
    checkpoints (--ckpt A --ckpt B --data FILE [--mme DIR], or --anchors-run / --heads-run per
    checkpoint: connectivity, bimodality and anchor-share shift, anchor overlap, head drops)."""
    checkpoint_mode = bool(ckpts or anchors_runs or heads_runs)
    if runs and checkpoint_mode:
        raise VlmCreditError(
            "compare: give RUN... (methods) or --ckpt / --anchors-run / --heads-run "
            "(checkpoints), not both"
        )
    if checkpoint_mode:
        from vlmcredit.pipelines.compare_checkpoints import CheckpointCompareConfig

        cfg = CheckpointCompareConfig(
            out=out,
            ckpts=list(ckpts or []),
            data=data,
            mme=mme,
            anchors_runs=list(anchors_runs or []),
            heads_runs=list(heads_runs or []),
            batch_size=batch_size,
            max_samples=max_samples,
            max_questions=max_questions,
            dtype=dtype,
            device=device,
            device_map=device_map,
            resume=resume,
            trust_remote_code=trust_remote_code,
            prompt_key=prompt_key,
            image_key=image_key,
            response_key=response_key,
        )
        _compare_checkpoints(cfg, quiet, as_json)
        return
    if not runs:
        raise VlmCreditError(
            "compare: pass RUN... (method signals), --ckpt A --ckpt B --data ROLLOUTS, or "
            "--anchors-run per checkpoint"
        )
    for name, value in (("--data", data), ("--mme", mme), ("--max-questions", max_questions)):
        if value is not None:
            raise VlmCreditError(f"{name} {value}: goes with --ckpt (checkpoint comparison)")
    from vlmcredit.pipelines.compare import run_compare

    result = run_compare(runs, out, command=sys.argv)
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    head = ("a", "b", "responses", "tokens", "jaccard", "precision", "recall", "spearman")
    typer.echo("  ".join(head))
    for pair in result["pairs"]:
        typer.echo("  ".join(_fmt(pair.get(c)) for c in head))
    for item in result["anchors_in_vppo"]:
        share = "-" if item["share"] is None else f"{100 * item['share']:.1f}%"
        typer.echo(
            f"{share} of the {item['anchors_selected']} anchor tokens ({item['anchors']}) are "
            f"also perturbation-sensitive tokens of {item['vppo']}"
        )
    typer.echo(f"-> {Path(out) / 'compare.json'}")


def _compare_checkpoints(cfg: CheckpointCompareConfig, quiet: bool, as_json: bool) -> None:
    from vlmcredit.formats.checkpoints import CHECKPOINTS_JSON
    from vlmcredit.pipelines.compare_checkpoints import run_checkpoint_compare

    result = run_checkpoint_compare(
        cfg,
        stage=lambda name: progress_bar(name, quiet),
        log=(lambda _m: None) if quiet else echo_err,
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    head = ("checkpoint", "anchor_share", "conn_mean", "conn_median", "bimodality", "baseline")
    typer.echo("  ".join(head))
    for c in result["checkpoints"]:
        a, h = c["anchors"] or {}, c["heads"] or {}
        values = (
            a.get("anchor_share"), a.get("connectivity_mean"), a.get("connectivity_median"),
            a.get("bimodality_coefficient"), h.get("baseline"),
        )  # fmt: skip
        typer.echo("  ".join([c["label"], *(_fmt(v) for v in values)]))
    for p in result["pairs"]:
        parts = [f"{p['a']} -> {p['b']}:"]
        if p["anchors"]:
            s = p["anchors"]
            parts.append(
                f"bimodality {_signed(s['bimodality_coefficient_change'])}, anchor share "
                f"{_signed(s['anchor_share_change'])}, anchor jaccard {_fmt(s['jaccard'])}, "
                f"connectivity spearman {_fmt(s['connectivity_spearman'])}"
            )
        if p["heads"]:
            s = p["heads"]
            parts.append(
                f"baseline {_signed(s['baseline_change'])}, max drop "
                f"{_signed(s['max_drop_change'])}, critical jaccard {_fmt(s['critical_jaccard'])}"
            )
        typer.echo(" ".join(parts))
    typer.echo(f"-> {Path(cfg.out) / CHECKPOINTS_JSON}")
