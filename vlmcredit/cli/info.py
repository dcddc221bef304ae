"""`vlmcredit info`: what a checkpoint is, without loading its weights."""

from __future__ import annotations

import json

import typer

from vlmcredit.cli import options
from vlmcredit.cli.common import user_errors
from vlmcredit.models.describe import describe_checkpoint


@user_errors
def info(
    ckpt: str | None = options.CKPT,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the checkpoint's own Python code to run."
    ),
) -> None:
    """Family, layers, heads, kv heads, head_dim, vision patch/merge, image token id, size."""
    facts = describe_checkpoint(options.ckpt_or_builtin(ckpt), trust_remote_code=trust_remote_code)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        typer.echo(f"{key:<{width}}  {value}")
