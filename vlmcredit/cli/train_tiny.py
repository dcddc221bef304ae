"""`vlmcredit train-tiny`: train a built-in-style model (seeded, CPU; stages via --init-from)."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcredit.cli.common import user_errors


@user_errors
def train_tiny(
    out: Path = typer.Option(..., "--out", help="Run folder (a killed run resumes there)."),
    steps: int = typer.Option(6000, "--steps", help="Optimizer steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and of every batch."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for torch."),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Start from this train-tiny checkpoint's weights (stage 2)."
    ),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (warmup, then cosine)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Dialogs (images) per step."),
    image_max_tokens: int = typer.Option(
        36, "--image-max-tokens", help="Merged image tokens per image (36: 6 x 5 cells; 80: 9 x 8)."
    ),
    single_shape_share: float = typer.Option(
        0.0,
        "--single-shape-share",
        help="Share of the steps, at the start, that describe single-shape images (curriculum).",
    ),
    single_shape_questions: float = typer.Option(
        0.0,
        "--single-shape-questions",
        help="Share of the curriculum's dialogs that are yes/no questions about the one shape.",
    ),
    style_weights: str = typer.Option(
        "describe=0.3,reason=0.35,mme=0.35",
        "--style-weights",
        help="Mix of answer styles after the curriculum: descriptions, reasoned and bare yes/no.",
    ),
    category_weights: str = typer.Option(
        "existence=1,count=1,position=1.6,color=0.8",
        "--category-weights",
        help="Mix of question categories after the curriculum (existence, count, position, color, "
        "and color_presence: 'Is there a red shape?').",
    ),
    paired_questions: bool = typer.Option(
        False,
        "--paired-questions/--single-questions",
        help="Both questions of each image (Yes and No) in the same batch, as MME pairs them.",
    ),
    lookup_copyable: bool = typer.Option(
        True,
        "--lookup-copyable/--lookup-no-copy",
        help="Lookup style on both questions of colour/count images, or on the No one only.",
    ),
    mrope_section: str = typer.Option(
        "2,3,3",
        "--mrope-section",
        help="Rotary pairs for t,h,w (sum 8); 1,1,6 gives the image column a usable frequency.",
    ),
    hidden_size: int = typer.Option(
        128,
        "--hidden-size",
        help="Width of the language model (8 heads of hidden/8; mrope sections sum to hidden/16).",
    ),
    vision_hidden_size: int = typer.Option(
        64,
        "--vision-hidden-size",
        help="Width of the vision tower (4 heads, MLP 2x); the merger maps it to --hidden-size.",
    ),
    rope_theta: float = typer.Option(
        10000.0, "--rope-theta", help="Rotary base of the language model."
    ),
    vision_lr_scale: float = typer.Option(
        1.0,
        "--vision-lr-scale",
        help="Learning rate of the vision tower as a multiple of --lr.",
    ),
    cell_loss: float = typer.Option(
        0.0,
        "--cell-loss",
        help="Weight of the cell supervision: a linear head on the image tokens predicts each "
        "cell's colours and shape kinds (training only; 0: off).",
    ),
    cell_clip: str = typer.Option(
        "joint",
        "--cell-clip",
        help="joint: one gradient clip over both losses; separate: the cell gradient clipped on "
        "its own (for stages on a trained model, whose fresh cell head has large gradients).",
    ),
    cell_relations: float = typer.Option(
        0.0,
        "--cell-relations",
        help="Weight of a relation term in the cell supervision: each shape's cells also predict "
        "whether another shape lies entirely left / right / above / below it (needs --cell-loss; "
        "0: off).",
    ),
    per_dialog_loss: bool = typer.Option(
        False,
        "--per-dialog-loss/--token-mean-loss",
        help="Mean loss per dialog, then over the batch (instead of over all answer tokens).",
    ),
) -> None:
    """Train the built-in Qwen2.5-VL on synthetic shape questions; writes OUT/final and
    intermediate OUT/step-NNNNNN checkpoints. The defaults are the earlier built-in model's first
    stage; the shipped model is twelve stages, each command in docs/builtin-model.md."""
    from vlmcredit.errors import VlmCreditError
    from vlmcredit.pipelines.train_tiny import TrainConfig
    from vlmcredit.pipelines.train_tiny import train_tiny as run

    try:
        t, h, w = (int(x) for x in mrope_section.split(","))
    except ValueError:
        raise VlmCreditError(
            f"--mrope-section {mrope_section!r}: give three integers t,h,w, e.g. 2,3,3"
        ) from None
    cfg = TrainConfig(
        style_weights=_weights("--style-weights", style_weights),
        category_weights=_weights("--category-weights", category_weights),
        single_shape_questions=single_shape_questions,
        steps=steps,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        image_max_tokens=image_max_tokens,
        single_shape_share=single_shape_share,
        mrope_section=(t, h, w),
        hidden_size=hidden_size,
        vision_hidden_size=vision_hidden_size,
        rope_theta=rope_theta,
        per_dialog_loss=per_dialog_loss,
        paired_questions=paired_questions,
        lookup_copyable=lookup_copyable,
        init_from=str(init_from) if init_from else None,
        vision_lr_scale=vision_lr_scale,
        cell_loss=cell_loss,
        cell_clip=cell_clip,
        cell_relations=cell_relations,
    )
    final = run(out, cfg, echo=typer.echo, threads=threads)
    typer.echo(f"-> {final} (use it as --ckpt {final})")


def _weights(option: str, text: str) -> dict[str, float]:
    """ "a=1,b=0.5" -> {"a": 1.0, "b": 0.5}; the names are checked by TrainConfig.check."""
    from vlmcredit.errors import VlmCreditError

    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise VlmCreditError(
                f"{option} {text!r}: give name=weight pairs separated by commas, e.g. "
                "describe=0.3,reason=0.35,mme=0.35"
            ) from None
    return out
