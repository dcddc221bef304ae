"""`vlmcredit weights`: per-token credit weights from any registered method, in the trainer
contract (signals.parquet)."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli import options
from vlmcredit.cli.common import progress_bar, user_errors


def _list_methods() -> None:
    from vlmcredit.methods.registry import available, config_dict, get

    for name in available():
        m = get(name)
        typer.echo(f"{name}: {m.summary}")
        typer.echo(f"    paper: {m.paper}")
        typer.echo(
            f"    passes: {', '.join(m.needs(m.config()).names()) or 'none'}; loss denominator: "
            f"{m.denominator_for(m.config())}; selection: {m.scope_for(m.config())}"
        )
        params = config_dict(m.config())
        flat = _flatten(params)
        typer.echo("    parameters: " + ", ".join(f"{k}={v}" for k, v in flat.items()))
        if m.columns:
            typer.echo(
                "    extra columns: " + ", ".join(f"{k} ({v})" for k, v in m.columns.items())
            )


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@user_errors
def weights(
    method: str = typer.Option(
        "anchors", "--method", help="Method name(s), comma-separated (see --list)."
    ),
    ckpt: str | None = options.CKPT,
    data: Path | None = typer.Option(
        None, "--data", help="Rollouts: .jsonl, .parquet or VERL parquet (required unless --list)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Run folder to write or resume (required unless --list)."
    ),
    param: list[str] = typer.Option(
        [],
        "--param",
        "-p",
        help="A method parameter NAME=VALUE (repeatable; METHOD.NAME=VALUE with several "
        "methods; nested groups with dots, e.g. cluster.seed=3).",
    ),
    layers: str = typer.Option(
        "all", "--layers", help="Decoder layers whose attention to use: all, 0,4,8-11, -1."
    ),
    heads: str = typer.Option(
        "all", "--heads", help="Query heads whose attention to use: all or a list/range."
    ),
    heads_json: Path | None = typer.Option(
        None, "--heads-json", help="Use only the vision-critical heads of a probe-heads run."
    ),
    batch_size: int = options.BATCH_SIZE,
    max_samples: int | None = options.MAX_SAMPLES,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    device_map: str | None = options.DEVICE_MAP,
    resume: bool = options.RESUME,
    skip_bad: bool = options.SKIP_BAD,
    prompt_key: str = options.PROMPT_KEY,
    image_key: str = options.IMAGE_KEY,
    response_key: str = options.RESPONSE_KEY,
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    quiet: bool = options.QUIET,
    dry_run: bool = options.DRY_RUN,
    list_methods: bool = typer.Option(
        False, "--list", help="List the registered methods with their parameters and exit."
    ),
) -> None:
    """Per-token weights by a registered credit method, written as trainer signals."""
    if list_methods:
        _list_methods()
        return
    from vlmcredit.errors import VlmCreditError
    from vlmcredit.methods.registry import parse_params
    from vlmcredit.pipelines.weights import WeightsRunConfig, run_weights

    missing = [n for n, v in (("--data", data), ("--out", out)) if v is None]
    if missing:
        raise VlmCreditError(f"weights: pass {', '.join(missing)} (or --list to see the methods)")
    cfg = WeightsRunConfig(
        out=out,  # type: ignore[arg-type]
        ckpt=options.ckpt_or_builtin(ckpt),
        data=data,  # type: ignore[arg-type]
        method=method,
        params=parse_params(param),
        layers=layers,
        heads=heads,
        heads_json=heads_json,
        batch_size=batch_size,
        max_samples=max_samples,
        dtype=dtype,
        device=device,
        device_map=device_map,
        resume=resume,
        skip_bad=skip_bad,
        prompt_key=prompt_key,
        image_key=image_key,
        response_key=response_key,
        trust_remote_code=trust_remote_code,
    )
    if dry_run:
        from vlmcredit.pipelines.dry_run import dry_run_weights

        options.print_dry_run(dry_run_weights(cfg), cfg.out)
        return
    with progress_bar("weights", quiet) as advance:
        run = run_weights(cfg, progress=advance)
    for name, s in run.manifest["weights"].items():
        typer.echo(
            f"{name}: {s['num_responses']} responses, {s['num_tokens']} tokens, mean weight "
            f"{s['mean_weight']:.3f}, {100 * s['share_nonzero']:.1f}% non-zero "
            f"(loss denominator: {s['loss_denominator']}) -> {run.path / s['signals']}"
        )
