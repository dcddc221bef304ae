"""`vlmcredit anchors`: capture -> token-image graph -> Leiden -> anchor tokens (AT-RL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vlmcredit.cli import options
from vlmcredit.cli.common import echo_err, progress_bar, user_errors


@user_errors
def anchors(
    out: Path = options.OUT,
    ckpt: str | None = typer.Option(
        None,
        "--ckpt",
        help="Checkpoint to capture with (default: builtin:tiny-qwen2.5-vl; with --from: where "
        "its tokenizer is).",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Rollouts: .jsonl, .parquet or VERL parquet (or --from)."
    ),
    from_run: Path | None = typer.Option(
        None, "--from", help="Reuse a finished `vlmcredit capture` run instead of capturing."
    ),
    layers: str = typer.Option(
        "all", "--layers", help="Decoder layers to average: all, 0,4,8-11, -1."
    ),
    heads: str = typer.Option(
        "all", "--heads", help="Query heads to average: all or a list/range."
    ),
    heads_json: Path | None = typer.Option(
        None, "--heads-json", help="Average only the vision-critical heads of a probe-heads run."
    ),
    mode: str = typer.Option(
        "bipartite",
        "--mode",
        help="bipartite (token-image graph), similarity (token kNN) or "
        "threshold (top ratio by connectivity, no clustering).",
    ),
    ratio: float = typer.Option(0.15, "--ratio", help="Target share of anchor tokens."),
    ratio_scope: str = typer.Option(
        "response",
        "--ratio-scope",
        help="Where --ratio holds: response (each response) or batch (pooled clusters of a "
        "--batch-size batch; some responses get none).",
    ),
    fill: str = typer.Option(
        "clusters-then-tokens",
        "--fill",
        help="clusters-then-tokens (whole clusters, then the best-connected tokens of the next: "
        "exactly the ratio) or whole-clusters (stop at the cluster boundary nearest the ratio).",
    ),
    preset: str = typer.Option(
        "none",
        "--preset",
        help="paper: the AT-RL paper's choices (attention-pattern similarity graph + METIS), "
        "i.e. --mode similarity --backend metis.",
    ),
    other_weight: float = typer.Option(
        0.0, "--other-weight", help="Weight of non-anchor tokens (anchors get 1.0)."
    ),
    top_k: int = typer.Option(16, "--top-k", help="Bipartite: image edges kept per token."),
    min_mass: float | None = typer.Option(
        None, "--min-mass", help="Bipartite: keep edges >= this share of the token's image mass."
    ),
    knn: int = typer.Option(10, "--knn", help="Similarity: neighbours per token."),
    sink: str = typer.Option(
        "none",
        "--sink",
        help="Attention-sink handling: none, mean (subtract each image "
        "token's mean over response tokens) or topk (drop the --sink-k strongest cells).",
    ),
    sink_k: int = typer.Option(0, "--sink-k", help="With --sink topk: cells to drop."),
    backend: str = typer.Option("igraph", "--backend", help="igraph, leidenalg or metis."),
    objective: str = typer.Option(
        "modularity", "--objective", help="modularity, CPM or bipartite (leidenalg only)."
    ),
    resolution: float = typer.Option(1.0, "--resolution", help="Leiden resolution."),
    n_iterations: int = typer.Option(
        2, "--n-iterations", help="Leiden iterations (-1: until stable)."
    ),
    parts: int = typer.Option(8, "--parts", help="METIS: number of parts K."),
    seed: int = typer.Option(0, "--seed", help="Clustering seed."),
    batch_size: int = options.BATCH_SIZE,
    max_samples: int | None = options.MAX_SAMPLES,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    device_map: str | None = options.DEVICE_MAP,
    graphml: bool = typer.Option(
        False, "--graphml", help="Also write each sample's clustered graph to RUN/graphs/*.graphml."
    ),
    resume: bool = options.RESUME,
    skip_bad: bool = options.SKIP_BAD,
    prompt_key: str = options.PROMPT_KEY,
    image_key: str = options.IMAGE_KEY,
    response_key: str = options.RESPONSE_KEY,
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    quiet: bool = options.QUIET,
    dry_run: bool = options.DRY_RUN,
) -> None:
    """Label anchor tokens: the ~15% of response tokens whose attention carries the image."""
    from vlmcredit.analysis.anchors import AnchorConfig
    from vlmcredit.analysis.clustering import ClusterConfig
    from vlmcredit.pipelines.anchors import AnchorsRunConfig, run_anchors

    cfg = AnchorsRunConfig(
        out=out,
        ckpt=ckpt if from_run is not None else options.ckpt_or_builtin(ckpt),
        data=data,
        from_run=from_run,
        layers=layers,
        heads=heads,
        heads_json=heads_json,
        analysis=AnchorConfig(
            mode=mode,
            ratio=ratio,
            other_weight=other_weight,
            top_k=top_k,
            min_mass=min_mass,
            knn=knn,
            sink=sink,
            sink_k=sink_k,
            ratio_scope=ratio_scope,
            fill=fill,
            preset=preset,
            cluster=ClusterConfig(
                backend=backend,
                objective=objective,
                resolution=resolution,
                n_iterations=n_iterations,
                seed=seed,
                parts=parts,
            ),
        ),
        batch_size=batch_size,
        max_samples=max_samples,
        dtype=dtype,
        device=device,
        device_map=device_map,
        resume=resume,
        graphml=graphml,
        skip_bad=skip_bad,
        prompt_key=prompt_key,
        image_key=image_key,
        response_key=response_key,
        trust_remote_code=trust_remote_code,
    )
    if dry_run:
        from vlmcredit.pipelines.dry_run import dry_run_anchors

        options.print_dry_run(dry_run_anchors(cfg), cfg.out)
        return
    with progress_bar("anchors", quiet) as advance:
        run = run_anchors(cfg, progress=advance)
    s = run.manifest["anchors"]
    agree = s["agreement"]
    typer.echo(
        f"{s['num_anchors']} anchors of {s['num_tokens']} response tokens "
        f"({100 * s['ratio_achieved']:.1f}%, target {100 * s['ratio_target']:.0f}%) in "
        f"{s['num_samples']} samples; agreement with top-{100 * s['ratio_target']:.0f}% "
        f"threshold: jaccard {agree['jaccard']:.2f}"
    )
    spread = s["ratio_per_response"]
    if spread["num_responses"]:
        typer.echo(
            f"per response: {100 * spread['min']:.1f}% to {100 * spread['max']:.1f}% (median "
            f"{100 * spread['median']:.1f}%), {100 * spread['within_tolerance']:.0f}% within "
            f"+-{100 * spread['tolerance']:.0f} points of the target (--ratio-scope "
            f"{s['ratio_scope']}, --fill {s['fill']})"
        )
    typer.echo(f"wrote {run.path}/anchors.parquet, anchors.json, signals.parquet")
    warning = ratio_warning(s, cfg.analysis)
    if warning:
        echo_err(f"warning: {warning}")


def ratio_warning(summary: dict[str, Any], analysis: Any) -> str | None:
    """Say so when the anchors are far from the target share (more than 5 points): only
    --fill whole-clusters can miss it by much, when the clustering made few large clusters."""
    achieved, target = summary["ratio_achieved"], summary["ratio_target"]
    if abs(achieved - target) <= 0.05:
        return None
    cluster = analysis.cluster
    if cluster.backend == "metis":
        how, finer = f"--backend metis --parts {cluster.parts}", "more --parts"
    else:
        how = f"--objective {cluster.objective} --resolution {cluster.resolution:g}"
        finer = "a higher --resolution"
    if summary["fill"] == "whole-clusters":
        hint = (
            f"whole clusters are as coarse as the clustering ({how}); use --fill "
            f"clusters-then-tokens (the default) to hold the ratio, or {finer} for smaller "
            "clusters"
        )
    else:
        hint = "the responses may be too short to hold it (see the per-response spread)"
    return (
        f"{100 * achieved:.1f}% of the response tokens are anchors against a "
        f"{100 * target:.0f}% target: {hint}"
    )
