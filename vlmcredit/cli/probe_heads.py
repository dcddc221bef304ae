"""`vlmcredit probe-heads`: head ablation on MME -> vision-critical heads (heads.json)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer

from vlmcredit.cli import options
from vlmcredit.cli.common import echo_err, progress_bar, silence_libraries, user_errors

SHOWN = 20  # configurations listed in the summary (largest drops first)


@user_errors
def probe_heads(
    ckpt: str | None = options.CKPT,
    mme: Path = typer.Option(..., "--mme", help="MME: lmms-lab parquet(s) or MME folder."),
    out: Path = options.OUT,
    categories: str | None = typer.Option(
        None, "--categories", help="Comma-separated MME subtasks (default: all present)."
    ),
    mode: str = typer.Option(
        "head-index", "--mode", help="head-index (one head in every layer) or layer-head."
    ),
    layers: str = typer.Option("all", "--layers", help="layer-head mode: all, 0,4,8-11, -1."),
    heads: str = typer.Option("all", "--heads", help="Head indices to ablate: all or a list."),
    ablation: str = typer.Option("zero", "--ablation", help="zero, or mean (MME-set mean)."),
    generate: bool = typer.Option(
        False, "--generate", help="Decode up to 16 tokens and parse (reference; slower)."
    ),
    share_prefix: bool = typer.Option(
        True,
        "--share-prefix/--no-share-prefix",
        help="Logits mode: run the system prompt once per configuration and an image's common "
        "prompt prefix once for both its questions; in layer-head mode start each ablated "
        "forward at its layer from inputs recorded once (same answers; off = full forwards).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions per forward."),
    max_questions: int | None = typer.Option(
        None,
        "--max-questions",
        help="Quick look: about N questions, whole images from every category in turn.",
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Absolute rule: critical when the score drops by more than this many points "
        "(default 100, the paper's; giving it selects the absolute rule).",
    ),
    threshold_rule: str | None = typer.Option(
        None,
        "--threshold-rule",
        help="absolute (drop > --threshold points; default on all 14 MME subtasks) or relative "
        "(drop > --relative-share x (baseline - gray-image control); default on a subset).",
    ),
    relative_share: float | None = typer.Option(
        None,
        "--relative-share",
        help="Relative rule's share of (baseline - gray-image control), in (0, 1]; default 0.5.",
    ),
    metric: str = typer.Option("total", "--metric", help="total or perception."),
    feature_cache_mb: float = typer.Option(
        4096.0,
        "--feature-cache-mb",
        help="Bound of the image-feature cache, kept on the model's device (0 = off).",
    ),
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    device_map: str | None = options.DEVICE_MAP,
    resume: bool = options.RESUME,
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip broken MME items (recorded)."),
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or log lines."),
    dry_run: bool = options.DRY_RUN,
) -> None:
    """Ablate heads, re-score MME each time, and list the heads whose ablation hurts most."""
    from vlmcredit.formats.heads import read_heads
    from vlmcredit.pipelines.probe_heads import ProbeHeadsConfig, run_probe_heads

    cfg = ProbeHeadsConfig(
        ckpt=options.ckpt_or_builtin(ckpt),
        mme=mme,
        out=out,
        categories=categories,
        mode=mode,
        layers=layers,
        heads=heads,
        ablation=ablation,
        generate=generate,
        share_prefix=share_prefix,
        batch_size=batch_size,
        max_questions=max_questions,
        dtype=dtype,
        device=device,
        device_map=device_map,
        skip_bad=skip_bad,
        trust_remote_code=trust_remote_code,
        threshold=threshold,
        threshold_rule=threshold_rule,
        relative_share=relative_share,
        metric=metric,
        feature_cache_mb=feature_cache_mb,
        resume=resume,
    )
    if dry_run:
        from vlmcredit.pipelines.dry_run import dry_run_probe_heads

        options.print_dry_run(dry_run_probe_heads(cfg), cfg.out)
        return
    with ExitStack() as stack:
        advance = _LazyBar(stack, quiet)
        run = run_probe_heads(cfg, progress=advance, log=(lambda _m: None) if quiet else echo_err)
    report = read_heads(run.path)
    base = report["baseline"]
    typer.echo(
        f"baseline: total {base['total']:.2f} (perception {base['perception']:.2f}, "
        f"cognition {base['cognition']:.2f}) on {report['num_questions']} questions"
    )
    controls = report["controls"]
    shown = {name.replace("_", " "): name for name in ("gray_image", "constant_yes", "constant_no")}
    typer.echo(
        "controls (total): "
        + ", ".join(f"{label} {controls[key]['total']:.2f}" for label, key in shown.items())
        + f"; baseline answers other {100 * base['answers']['other']:.0f}%"
    )
    rule = report["threshold_rule"]
    typer.echo(f"threshold rule: {rule['rule']} ({rule['reason']}): {rule['formula']}")
    if rule["warning"] and quiet:  # otherwise the run's log has just printed it
        echo_err(f"warning: {rule['warning']}")
    rows = sorted(report["heads"], key=lambda h: -h["drop"][report["metric"]])
    typer.echo(f"{'layer':>5} {'head':>4} {'total':>9} {'drop':>9} {'other':>6}  critical")
    for h in rows[:SHOWN]:
        layer = "all" if h["layer"] is None else str(h["layer"])
        answers = h["answers"]
        flags = [f"all {answers['constant']}"] if answers["constant"] else []
        flags += ["answer format broken"] if answers["format_broken"] else []
        typer.echo(
            f"{layer:>5} {h['head']:>4} {h['scores']['total']:>9.2f} "
            f"{h['drop'][report['metric']]:>9.2f} {100 * answers['other']:>5.0f}%  "
            f"{'yes' if h['critical'] else '':<3} {'; '.join(flags)}".rstrip()
        )
    if len(rows) > SHOWN:
        typer.echo(f"... {len(rows) - SHOWN} more in {run.path / 'heads.parquet'}")
    typer.echo(f"{critical_line(report)}; written to {run.path / 'heads.json'}")


def critical_line(report: dict[str, Any]) -> str:
    """The verdict in the unit that was ablated: head indices in head-index mode, (layer, head)
    pairs in layer-head mode (their head indices alone would read as whole heads)."""
    rule = f"(drop in {report['metric']} > {report['threshold']:g})"
    if report["mode"] != "layer-head":
        heads = ", ".join(str(h) for h in report["critical_heads"]) or "none"
        return f"vision-critical heads {rule}: {heads}"
    pairs = [(c["layer"], c["head"]) for c in report["critical"]]
    shown = ", ".join(f"L{layer}.H{head}" for layer, head in pairs[:SHOWN])
    more = f", ... {len(pairs) - SHOWN} more" if len(pairs) > SHOWN else ""
    return f"vision-critical (layer, head) pairs {rule}: {len(pairs)} of {len(report['heads'])}" + (
        f": {shown}{more}" if pairs else ""
    )


class _LazyBar:
    """The progress bar, shown from the first update on: option and input errors, found before
    any work starts, then print as one line with no bar around them."""

    def __init__(self, stack: ExitStack, quiet: bool) -> None:
        self.stack, self.quiet = stack, quiet
        self.update: Callable[[int, int], None] | None = None
        if quiet:  # now: the model loads (with its own bar) before the first update
            silence_libraries()

    def __call__(self, done: int, total: int) -> None:
        if self.update is None:
            # the bar counts question passes (questions x configurations + encoding passes)
            self.update = self.stack.enter_context(
                progress_bar("probe-heads: question passes", self.quiet)
            )
        self.update(done, total)
