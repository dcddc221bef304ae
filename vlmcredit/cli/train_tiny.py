"""`vlmcredit train-tiny`: train the built-in model from scratch (seeded, CPU, about 35 minutes)."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli.common import user_errors


@user_errors
def train_tiny(
    out: Path = typer.Option(..., "--out", help="Run folder (a killed run resumes there)."),
    steps: int = typer.Option(6000, "--steps", help="Optimizer steps (batch 32 each)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and of every batch."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for torch."),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Start from this train-tiny checkpoint's weights (stage 2)."
    ),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (warmup, then cosine)."),
) -> None:
    """Train the built-in Qwen2.5-VL on synthetic shape questions; writes OUT/final and
    intermediate OUT/step-NNNNNN checkpoints (the shipped model is `--steps 6000 --seed 0`)."""
    from vlmcredit.pipelines.train_tiny import TrainConfig
    from vlmcredit.pipelines.train_tiny import train_tiny as run

    cfg = TrainConfig(
        steps=steps, seed=seed, lr=lr, init_from=str(init_from) if init_from else None
    )
    final = run(out, cfg, echo=typer.echo, threads=threads)
    typer.echo(f"-> {final} (use it as --ckpt {final})")
