"""Options every computing command shares, defined once.

Typer reads options from a function's signature, so the groups (checkpoint, run, attention
heads) are shared as option objects: one definition and one help text that each command puts in
its signature, then hands to its pipeline's config dataclass.
"""

from __future__ import annotations

import typer

# -- the checkpoint -----------------------------------------------------------------------------
CKPT = typer.Option(
    None,
    "--ckpt",
    help="Checkpoint folder, cached hub id or builtin:NAME (default: builtin:tiny-qwen2.5-vl).",
)


def ckpt_or_builtin(ckpt: str | None) -> str:
    """`ckpt`, or the built-in demo model with a one-line note on stderr when it is omitted."""
    if ckpt:
        return ckpt
    from vlmcredit.models.builtin import DEFAULT_CKPT, NOTE

    typer.echo(NOTE, err=True)
    return DEFAULT_CKPT


DTYPE = typer.Option("auto", "--dtype", help="auto, bf16, fp16 or fp32.")
DEVICE = typer.Option(None, "--device", help="e.g. cuda:0 (default: cpu).")
DEVICE_MAP = typer.Option(None, "--device-map", help="e.g. auto (multi-GPU).")
TRUST_REMOTE_CODE = typer.Option(
    False, "--trust-remote-code", help="Allow the checkpoint's own Python code to run."
)

# -- the run ------------------------------------------------------------------------------------
OUT = typer.Option(..., "--out", help="Run folder to write (or resume).")
DATA = typer.Option(..., "--data", help="Rollouts: .jsonl, .parquet or VERL parquet.")
BATCH_SIZE = typer.Option(4, "--batch-size", help="Samples per forward.")
MAX_SAMPLES = typer.Option(None, "--max-samples", help="Stop after N.")
RESUME = typer.Option(False, "--resume", help="Continue a killed run in --out.")
SKIP_BAD = typer.Option(False, "--skip-bad", help="Skip malformed rows (recorded).")
# the trainer's column names (EasyR1: prompt_key problem; VERL: prompt)
PROMPT_KEY = typer.Option(
    "prompt", "--prompt-key", help="Rollout column with the prompt (EasyR1: problem)."
)
IMAGE_KEY = typer.Option("images", "--image-key", help="Rollout column with the images.")
RESPONSE_KEY = typer.Option("response", "--response-key", help="Rollout column with the response.")
QUIET = typer.Option(False, "--quiet", help="No progress bar.")
DRY_RUN = typer.Option(
    False,
    "--dry-run",
    help="Print the estimated peak memory, disk and time (from config.json, safetensors headers "
    "and the data; no weights loaded) and exit without writing anything.",
)


def print_dry_run(estimate: object, out: object) -> None:
    """The estimate's lines on stdout (`pipelines/estimate.py` states each rule)."""
    for line in estimate.lines():  # type: ignore[attr-defined]
        typer.echo(line)
    typer.echo(f"dry run: no weights loaded, nothing written (--out {out} left as it was)")


# -- which attention ----------------------------------------------------------------------------
LAYERS = typer.Option("all", "--layers", help="Decoder layers: all, 0,4,8-11, -1.")
HEADS = typer.Option("all", "--heads", help="Query heads: all or a list/range.")
STORE_DTYPE = typer.Option(
    "fp32",
    "--store-dtype",
    help="Stored attention dtype: fp32, bf16 or fp16 (computed in fp32; bf16 halves it).",
)
HEADS_JSON = typer.Option(
    None, "--heads-json", help="Use only the vision-critical heads of a probe-heads run."
)
