"""`vlmcredit compare`: how credit methods (or checkpoints) agree on the same rollouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from vlmcredit.cli.common import user_errors


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


@user_errors
def compare(
    runs: list[Path] = typer.Argument(
        ..., help="Signals folders or multi-method weights runs over the same rollouts."
    ),
    out: Path = typer.Option(..., "--out", help="Folder to write compare.json/.parquet into."),
    as_json: bool = typer.Option(False, "--json", help="Print compare.json instead of a table."),
) -> None:
    """Overlap (Jaccard, precision, recall) and Spearman correlation of every method pair."""
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
