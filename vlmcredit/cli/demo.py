"""`vlmcredit demo`: the user's path on the built-in tiny model, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli.common import user_errors


@user_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for the demo's runs."),
    quick: bool = typer.Option(False, "--quick", help="Fewer images (for tests; under a minute)."),
) -> None:
    """The whole path (MME -> heads -> rollouts -> anchors -> weights -> compare -> export ->
    report) on the built-in model, offline."""
    from vlmcredit.pipelines.demo import run_demo

    run_demo(out, echo=typer.echo, quick=quick)
