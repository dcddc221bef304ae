"""`vlmcredit capture`: response -> image attention and Q/K states into a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli import options
from vlmcredit.cli.common import progress_bar, user_errors


@user_errors
def capture(
    ckpt: str | None = options.CKPT,
    data: Path = typer.Option(..., "--data", help="Rollouts: .jsonl, .parquet or VERL parquet."),
    out: Path = options.OUT,
    layers: str = typer.Option("all", "--layers", help="Decoder layers: all, 0,4,8-11, -1."),
    heads: str = typer.Option("all", "--heads", help="Query heads: all or a list/range."),
    reduce: str = typer.Option("mean", "--reduce", help="heads (keep each), mean or sum."),
    store_dtype: str = options.STORE_DTYPE,
    batch_size: int = options.BATCH_SIZE,
    max_samples: int | None = options.MAX_SAMPLES,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    device_map: str | None = options.DEVICE_MAP,
    qk: bool = typer.Option(True, "--qk/--no-qk", help="Also store post-RoPE Q and K."),
    qk_layers: str = typer.Option("-1", "--qk-layers", help="Layers for Q/K (default: last)."),
    generate: int = typer.Option(0, "--generate", help="Sample N responses per prompt."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="With --generate."),
    temperature: float = typer.Option(1.0, "--temperature", help="With --generate; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="With --generate."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    resume: bool = options.RESUME,
    skip_bad: bool = options.SKIP_BAD,
    prompt_key: str = options.PROMPT_KEY,
    image_key: str = options.IMAGE_KEY,
    response_key: str = options.RESPONSE_KEY,
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    quiet: bool = options.QUIET,
    dry_run: bool = options.DRY_RUN,
) -> None:
    """Capture response -> image attention (never the S x S matrix) beside an SDPA forward."""
    from vlmcredit.pipelines.capture import CaptureRunConfig, run_capture
    from vlmcredit.probes.response_attention import GenerationConfig

    cfg = CaptureRunConfig(
        ckpt=options.ckpt_or_builtin(ckpt),
        data=data,
        out=out,
        layers=layers,
        heads=heads,
        reduce=reduce,
        store_dtype=store_dtype,
        batch_size=batch_size,
        max_samples=max_samples,
        dtype=dtype,
        device=device,
        device_map=device_map,
        qk=qk,
        qk_layers=qk_layers,
        generate=generate,
        generation=GenerationConfig(max_new_tokens, temperature, top_p, seed),
        resume=resume,
        skip_bad=skip_bad,
        prompt_key=prompt_key,
        image_key=image_key,
        response_key=response_key,
        trust_remote_code=trust_remote_code,
    )
    if dry_run:
        from vlmcredit.pipelines.dry_run import dry_run_capture

        options.print_dry_run(dry_run_capture(cfg), cfg.out)
        return
    with progress_bar("capture", quiet) as advance:
        run = run_capture(cfg, progress=advance)
    m = run.manifest
    typer.echo(f"captured {m['samples_done']} samples ({m['samples_bad']} bad) into {run.path}")
