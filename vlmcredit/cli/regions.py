"""`vlmcredit regions`: SGUF key regions (KAWHI) of every image on the checkpoint's token grid."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli import options
from vlmcredit.cli.common import progress_bar, user_errors


@user_errors
def regions(
    ckpt: str | None = options.CKPT,
    out: Path = options.OUT,
    data: Path | None = typer.Option(
        None, "--data", help="Rollouts whose images to label (or --images; one of the two)."
    ),
    images: Path | None = typer.Option(
        None, "--images", help="A folder of images to label (or --data; one of the two)."
    ),
    preview: int = typer.Option(
        8, "--preview", help="Write overlay PNGs (key cells tinted) for the first N inputs."
    ),
    param: list[str] = typer.Option(
        [],
        "--param",
        "-p",
        help="An SGUF parameter NAME=VALUE: sigma, delta_s, delta_l, beta, r_skip, "
        "selection (sguf|all|random|inverse), seed.",
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Inputs per committed shard."),
    max_samples: int | None = options.MAX_SAMPLES,
    resume: bool = options.RESUME,
    skip_bad: bool = options.SKIP_BAD,
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    quiet: bool = options.QUIET,
) -> None:
    """SGUF key regions per image: regions.parquet + overlay PNGs (no model weights loaded)."""
    from vlmcredit.analysis.sguf import SgufConfig
    from vlmcredit.methods.registry import parse_params
    from vlmcredit.pipelines.regions import RegionsRunConfig, run_regions, sguf_config

    cfg = RegionsRunConfig(
        out=out,
        ckpt=options.ckpt_or_builtin(ckpt),
        data=data,
        images=images,
        sguf=sguf_config(SgufConfig(), parse_params(param)),
        preview=preview,
        batch_size=batch_size,
        max_samples=max_samples,
        resume=resume,
        skip_bad=skip_bad,
        trust_remote_code=trust_remote_code,
    )
    with progress_bar("regions", quiet) as advance:
        run = run_regions(cfg, progress=advance)
    s = run.manifest["regions"]
    typer.echo(
        f"{s['num_images']} images, {s['num_cells']} cells, {100 * s['key_share']:.1f}% key, "
        f"{100 * s['selected_share']:.1f}% selected, {s['previews']} previews "
        f"-> {run.path / 'regions.parquet'}"
    )
