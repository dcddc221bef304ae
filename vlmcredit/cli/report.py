"""`vlmcredit report`: one self-contained HTML page + PNG/SVG figures from run folders."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli.common import echo_err, progress_bar, user_errors


@user_errors
def report(
    runs: list[Path] = typer.Argument(
        ..., help="Run folders: any mix of probe-heads, anchors and signals runs."
    ),
    out: Path = typer.Option(..., "--out", help="HTML file to write (figures embedded)."),
    png_dir: Path | None = typer.Option(
        None, "--png-dir", help="Folder for the figures as PNG/SVG (default: OUT-figures/)."
    ),
    samples: int = typer.Option(10, "--samples", help="Samples shown in full per run."),
    max_tokens: int = typer.Option(
        2000, "--max-tokens", help="Tokens shown per response before a truncation note."
    ),
    top_clusters: int = typer.Option(3, "--top-clusters", help="Clusters drawn over the image."),
    title: str = typer.Option("vlmcredit report", "--title", help="Page title."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Write a self-contained HTML report (and the same figures as files) from run folders."""
    from vlmcredit.reports.report import (
        build_report,
        check_outputs,
        default_png_dir,
        write_report,
    )
    from vlmcredit.reports.sections import ReportOptions

    figures_dir = png_dir or default_png_dir(out)
    check_outputs(out, figures_dir)
    options = ReportOptions(samples, max_tokens, top_clusters, title)
    with progress_bar("report", quiet) as advance:
        result = build_report(runs, options, progress=advance)
    write_report(result, out, figures_dir)
    for warning in result.warnings:
        echo_err(f"warning: {warning}")
    size = len(result.html.encode("utf-8"))
    typer.echo(
        f"wrote {out} ({size / 1e6:.2f} MB, {len(result.sections)} sections) and "
        f"{len(result.figures)} figures in {figures_dir}"
    )
