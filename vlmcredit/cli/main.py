"""The `vlmcredit` command: one typer app, one module per command."""

from __future__ import annotations

import typer

from vlmcredit import __version__
from vlmcredit.cli.anchors import anchors
from vlmcredit.cli.capture import capture
from vlmcredit.cli.common import state
from vlmcredit.cli.compare import compare
from vlmcredit.cli.demo import demo
from vlmcredit.cli.export import export
from vlmcredit.cli.info import info
from vlmcredit.cli.make_tiny import make_tiny
from vlmcredit.cli.mme import mme_score, mme_synth
from vlmcredit.cli.probe_heads import probe_heads
from vlmcredit.cli.regions import regions
from vlmcredit.cli.report import report
from vlmcredit.cli.train_tiny import train_tiny
from vlmcredit.cli.weights import weights

app = typer.Typer(
    name="vlmcredit",
    help="Attention-connectivity analysis of Qwen-VL models for multimodal RL credit assignment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlmcredit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    state.debug = debug or state.debug


app.command("info")(info)
app.command("make-tiny")(make_tiny)
app.command("train-tiny")(train_tiny)
app.command("capture")(capture)
app.command("probe-heads")(probe_heads)
app.command("mme-score")(mme_score)
app.command("mme-synth")(mme_synth)
app.command("anchors")(anchors)
app.command("weights")(weights)
app.command("compare")(compare)
app.command("regions")(regions)
app.command("demo")(demo)
app.command("export")(export)
app.command("report")(report)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
