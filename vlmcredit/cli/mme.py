"""`vlmcredit mme-score` (official MME scoring of a predictions file) and `mme-synth`."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli.common import user_errors


@user_errors
def mme_score(
    predictions: Path = typer.Argument(
        ..., help="Official results folder (<category>.txt), one .txt, or our .parquet."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    pair_by: str = typer.Option(
        "lines",
        "--pair-by",
        help="acc+ pairs: lines (consecutive lines per category, as the official script) or "
        "image (by image name).",
    ),
) -> None:
    """Score MME predictions the official way: per subtask acc, acc+, score; group totals."""
    import json
    from dataclasses import asdict

    from vlmcredit.cli.common import echo_err
    from vlmcredit.data.mme_score import read_predictions, score_predictions

    scores = score_predictions(read_predictions(predictions), pair_by)
    if scores.mixed_pairs:
        how = (
            "paired anyway, as the official script does; --pair-by image pairs by name"
            if pair_by == "lines"
            else "paired by image name here; the official script would pair the lines"
        )
        echo_err(
            f"warning: {scores.mixed_pairs} pair(s) of consecutive lines hold two different "
            f"images (the file is not in MME's order): {how}"
        )
    if as_json:
        obj = {
            "subtasks": {c: asdict(s) for c, s in scores.subtasks.items()},
            "perception": scores.perception,
            "cognition": scores.cognition,
            "total": scores.total,
            "absent": scores.absent,
            "pair_by": scores.pair_by,
            "mixed_pairs": scores.mixed_pairs,
        }
        typer.echo(json.dumps(obj, indent=2))
        return
    typer.echo(f"{'subtask':<22} {'group':<10} {'acc':>7} {'acc+':>7} {'score':>8} {'other':>6}")
    for row in scores.table():
        if row["score"] is None:
            continue
        typer.echo(
            f"{row['category']:<22} {row['group']:<10} {100 * row['acc']:>7.2f} "
            f"{100 * row['acc_plus']:>7.2f} {row['score']:>8.2f} {row['n_other']:>6}"
        )
    typer.echo(f"{'perception':<22} {'':<10} {'':>7} {'':>7} {scores.perception:>8.2f}")
    typer.echo(f"{'cognition':<22} {'':<10} {'':>7} {'':>7} {scores.cognition:>8.2f}")
    typer.echo(f"{'total':<22} {'':<10} {'':>7} {'':>7} {scores.total:>8.2f}")
    if scores.absent:
        typer.echo(f"absent (not scored): {', '.join(scores.absent)}")


@user_errors
def mme_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write (MME's original layout)."),
    images_per_category: int = typer.Option(
        10, "--images-per-category", help="Images per category (two questions each)."
    ),
    seed: int = typer.Option(0, "--seed", help="Same seed, same images."),
    categories: str | None = typer.Option(
        None,
        "--categories",
        help="Comma-separated subset of: existence, count, position, color, OCR, "
        "numerical_calculation (default: all).",
    ),
    parquet: Path | None = typer.Option(
        None, "--parquet", help="Also write the set as one lmms-lab style parquet file."
    ),
) -> None:
    """Write a synthetic MME set (shapes, counts, positions, colours, OCR, sums) offline."""
    from vlmcredit.data.mme_synth import write_synthetic_mme, write_synthetic_mme_parquet
    from vlmcredit.errors import VlmCreditError

    chosen = [c for c in categories.split(",") if c.strip()] if categories else None
    if out.exists() and not out.is_dir():
        raise VlmCreditError(f"--out {out}: is a file; choose a folder for the MME set")
    if out.exists() and any(out.iterdir()):
        raise VlmCreditError(f"--out {out}: exists and is not empty; choose a new folder")
    if parquet is not None and parquet.is_dir():  # found before the folder is written
        raise VlmCreditError(f"--parquet {parquet}: is a folder; give a file name (.parquet)")
    if parquet is not None and parquet.exists():  # like --out: never over someone's file
        raise VlmCreditError(f"--parquet {parquet}: exists; choose a new file name")
    counts = write_synthetic_mme(out, images_per_category, seed, chosen)
    summary = ", ".join(f"{c} {n}" for c, n in counts.items())
    typer.echo(f"wrote {sum(counts.values())} images ({summary}) to {out}")
    if parquet is not None:
        write_synthetic_mme_parquet(out, parquet)
        typer.echo(f"wrote {2 * sum(counts.values())} questions to {parquet}")
