"""`vlmcredit make-tiny`: write a tiny offline checkpoint of one family."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli.common import user_errors


@user_errors
def make_tiny(
    family: str = typer.Option(
        ..., "--family", help="qwen2-vl, qwen2.5-vl, qwen3-vl or qwen3-vl-moe."
    ),
    out: Path = typer.Option(..., "--out", help="New folder to write the checkpoint to."),
    seed: int = typer.Option(0, "--seed", help="Weight seed; same seed, same bytes."),
) -> None:
    """Build a complete random-weight checkpoint (< 2 MB) offline, for tests and demos."""
    from vlmcredit.models.tiny import make_tiny as build

    path = build(family, out, seed=seed)
    typer.echo(f"wrote {family} tiny checkpoint to {path}")
