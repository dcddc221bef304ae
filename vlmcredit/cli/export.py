"""`vlmcredit export`: a run's trainer signals -> a folder a TRL or VERL recipe reads."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli.common import user_errors


@user_errors
def export(
    run: Path = typer.Argument(..., help="Run folder with trainer signals (anchors, weights)."),
    fmt: str = typer.Option(
        "parquet", "--format", help="parquet, jsonl, verl (+ config lines) or trl (+ script lines)."
    ),
    out: Path = typer.Option(..., "--out", help="New folder to write."),
    heads: Path | None = typer.Option(
        None, "--heads", help="heads.json of a probe-heads run, copied beside the signals."
    ),
) -> None:
    """Write a run's per-token weights in the trainer contract, with a README for the recipe."""
    from vlmcredit.export.formats import export_run

    result = export_run(run, fmt, out, heads)
    typer.echo(
        f"exported {result.num_rows} responses ({result.method}) as {result.format} to "
        f"{result.out}: {', '.join(result.files)}"
    )
