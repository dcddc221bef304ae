"""The recipe of the built-in model: its architecture, every training setting (`TrainConfig`,
which decides the trained bytes) and the batch of each step, a pure function of (seed, step).

`pipelines.train_tiny` runs it; `vlmcredit train-tiny` exposes the settings as options.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

from vlmcredit.data.mme_synth import SynthItem, render_item, render_shapes
from vlmcredit.data.synth_dialogs import (
    DESCRIBE_PROMPT,
    PRESENCE,
    TRAIN_CATEGORIES,
    TRAIN_STYLES,
    Dialog,
    description,
    dialogs,
    render_presence,
    single_shape_question,
)
from vlmcredit.errors import VlmCreditError

TEXT = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
VISION = {
    "depth": 2,
    "num_heads": 4,
    "hidden_size": 64,
    "intermediate_size": 128,
    "out_hidden_size": 128,
    "window_size": 56,
    "fullatt_block_indexes": [1],
}
IMAGE_MAX_TOKENS = 36  # merged 28-px cells: a 336x280 image becomes 6x5 = 30 tokens


@dataclass
class TrainConfig:
    """Everything that decides the trained bytes (with the package versions)."""

    # The defaults are the first stage of the earlier built-in model (v2). The shipped model is
    # twelve stages with the options after batch_size (80 image tokens, mrope 1,1,6, curriculum,
    # per-dialog loss, then question pairs, the lookup style, colour presence, cell supervision and
    # single-shape questions); each command is in
    # docs/builtin-model.md, and what each option changed in docs/builtin-model-recipes.md.
    steps: int = 6000
    batch_size: int = 32
    # merged 28-px cells per image (the processor's cap, saved with the checkpoint). At 36 cells
    # (6 x 5) the synthetic shapes (16-30 px half-sides) become 1-2 patches of 14 px and no run
    # learned to tell a circle from a square; at 80 (252x224, 9 x 8 cells) a single-shape
    # curriculum did
    image_max_tokens: int = IMAGE_MAX_TOKENS
    # curriculum: the first `single_shape_share` of the steps describe single-shape images, where
    # every non-background image token is the one object: colour, kind and place are read after
    # 250-1,000 steps, against ~4,500 steps before colour alone without it
    single_shape_share: float = 0.0
    # share of the curriculum's dialogs that are bare yes/no questions about the single shape
    # (existence or colour, `synth_dialogs.single_shape_question`) instead of its description
    single_shape_questions: float = 0.0
    # Qwen2.5-VL's mrope gives the t, h, w sections of the rotary pairs in order of falling
    # frequency, so with the tiny head_dim (8 pairs) [2, 3, 3] leaves the image column (w) only
    # rotations below 0.0032 rad per cell: runs learned "top"/"bottom" but never "left"/"right".
    # (1, 1, 6) gives both axes a pair of 0.1-0.3 rad per cell and keeps the slow pairs that
    # content matching uses (a smaller rope_theta instead slowed learning colour fourfold)
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    # width of the language model (8 heads, so head_dim = hidden_size / 8, and an MLP of 3x):
    # every rotary pair rotates with the text position, and matching a question word to an image
    # token or to an earlier word 20-130 positions away uses the slow pairs only; a wider head
    # has more of them (head_dim 16: 3-4 pairs below 0.01 rad per position, 24: 6), though a
    # diagnostic with 24 learned single-shape verdicts no sooner (builtin-model-recipes.md)
    hidden_size: int = TEXT["hidden_size"]
    rope_theta: float = 10000.0
    # width of the vision tower (4 heads, MLP 2x). At 64 the shipped lineage's merger kept shape
    # kind and dropped colour (linear probes of its output, scripts/feature_probe.py: kind 0.97,
    # colour 0.24), and runs whose curriculum learned colour first kept colour and not kind, at
    # 128 too (builtin-model-recipes.md)
    vision_hidden_size: int = VISION["hidden_size"]
    # loss: the mean over each dialog's answer tokens, then over the batch (True), instead of the
    # mean over all answer tokens of the batch, which gives a bare "Yes"/"No" ~2% of the gradient
    per_dialog_loss: bool = False
    # after the curriculum, both questions of each image (its Yes and its No one, in one style)
    # in the same batch, as MME pairs them: half the images per step, and the gradient of a
    # constant answer cancels within each pair, leaving the part that depends on the question
    paired_questions: bool = False
    # the lookup style on both questions of colour and count images (True), or on their No
    # question only (False), where the fact is not a word of the question and must be read
    lookup_copyable: bool = True
    lr: float = 2e-3
    warmup: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    # category mix: position is the hardest (two objects, an axis and an order); "color_presence"
    # (training only) asks "Is there a red shape in this image?", existence's check for a colour
    category_weights: dict[str, float] = field(
        default_factory=lambda: {"existence": 1.0, "count": 1.0, "position": 1.6, "color": 0.8}
    )
    # answer styles (data.synth_dialogs): descriptions are the dense visual supervision; without
    # them a first run (1,700 steps) learned to copy the question and never looked at the image
    style_weights: dict[str, float] = field(
        default_factory=lambda: {"describe": 0.3, "reason": 0.35, "mme": 0.35}
    )
    keep: tuple[float, ...] = (0.1, 0.25, 0.5)  # intermediate checkpoints, as fractions of steps
    eval_every: int = 250
    eval_images: int = 24  # held-out images per category for the running accuracy
    save_every: int = 250
    # continue from the weights of an earlier run's checkpoint (fresh optimizer and schedule)
    init_from: str | None = None
    # learning rate of the vision tower, as a multiple of `lr`, for stages that try to move it
    # more than the language model. (On the shipped lineage, whose merger dropped colour, 600 steps
    # at 10x did not bring colour back: builtin-model-recipes.md)
    vision_lr_scale: float = 1.0
    # weight of the cell supervision (pipelines.train_cells): a linear head on the image tokens
    # predicts each cell's shares of colours and kinds, so the merger is asked to keep both
    # (without it, every run kept one of the two: builtin-model-recipes.md). 0: off
    cell_loss: float = 0.0
    # how the cell gradient is clipped: "joint", one clip at 1.0 over the sum of both losses'
    # gradients; "separate", each clipped at 1.0 on its own, then summed. A fresh head on a
    # trained model's image tokens has gradient norms of 4-60 for hundreds of steps, which a joint
    # clip turns into language-model steps 4-60 times smaller; from scratch they stay near 1
    cell_clip: str = "joint"
    # weight of the relation term of the cell supervision (train_cells.RELATIONS: is another shape
    # entirely left / right / above / below this cell's shape), so the tokens of a named shape
    # carry what a position question asks; needs cell_loss > 0. 0: off
    cell_relations: float = 0.0

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise VlmCreditError("--steps and --batch-size must be >= 1")
        if self.image_max_tokens < 4 or not 0 <= self.single_shape_share < 1:
            raise VlmCreditError(
                "image_max_tokens must be >= 4 and single_shape_share in [0, 1); got "
                f"{self.image_max_tokens} and {self.single_shape_share}"
            )
        if self.vision_hidden_size < 16 or self.vision_hidden_size % 16:
            raise VlmCreditError(
                "vision_hidden_size must be a multiple of 16 (4 heads of a head_dim divisible by "
                f"4 for the 2-D rotary); got {self.vision_hidden_size}"
            )
        if not self.cell_loss >= 0 or self.cell_clip not in ("joint", "separate"):
            raise VlmCreditError(
                f"cell_loss must be >= 0 and cell_clip joint or separate; got {self.cell_loss} "
                f"and {self.cell_clip!r}"
            )
        if not self.cell_relations >= 0 or (self.cell_relations and not self.cell_loss):
            raise VlmCreditError(
                f"cell_relations must be >= 0, and above 0 only with cell_loss above 0; got "
                f"{self.cell_relations} with cell_loss {self.cell_loss}"
            )
        if not self.vision_lr_scale > 0:
            raise VlmCreditError(f"vision_lr_scale must be > 0; got {self.vision_lr_scale}")
        if not 0 <= self.single_shape_questions <= 1:
            raise VlmCreditError(
                f"single_shape_questions must be in [0, 1]; got {self.single_shape_questions}"
            )
        heads = TEXT["num_attention_heads"]
        if self.hidden_size < 2 * heads or self.hidden_size % (2 * heads) or self.rope_theta <= 1:
            raise VlmCreditError(
                f"hidden_size must be a multiple of {2 * heads} ({heads} heads of an even "
                f"head_dim) and rope_theta > 1; got {self.hidden_size} and {self.rope_theta}"
            )
        pairs = self.hidden_size // heads // 2
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != pairs:
            raise VlmCreditError(
                f"mrope_section must be 3 numbers (t, h, w) summing to {pairs} (head_dim / 2); "
                f"got {list(self.mrope_section)}"
            )
        styles = self.style_weights
        if set(styles) - set(TRAIN_STYLES) or min(styles.values()) < 0 or sum(styles.values()) <= 0:
            raise VlmCreditError(f"style weights must be >= 0 over {TRAIN_STYLES}, not all 0")
        unknown = set(self.category_weights) - set(TRAIN_CATEGORIES)
        if unknown:
            raise VlmCreditError(
                f"unknown categories {sorted(unknown)}; known: {', '.join(TRAIN_CATEGORIES)}"
            )
        if min(self.category_weights.values()) < 0 or sum(self.category_weights.values()) <= 0:
            raise VlmCreditError("category weights must be >= 0, not all 0")

    @property
    def single_shape_steps(self) -> int:
        return round(self.single_shape_share * self.steps)


def step_dialogs(cfg: TrainConfig, step: int) -> list[tuple[SynthItem, Dialog]]:
    """The batch of training step `step`: a pure function of (seed, step)."""
    rng = random.Random(f"vlmcredit-train:{cfg.seed}:{step}")
    if step < cfg.single_shape_steps:
        out = []
        for i in range(cfg.batch_size):
            item = render_shapes(rng, 1, f"{step}-{i}.png")
            # rng.random() only when asked for, so the shipped recipe's stream is unchanged
            if cfg.single_shape_questions and rng.random() < cfg.single_shape_questions:
                out.append((item, single_shape_question(item, rng)))
                continue
            out.append((item, Dialog("shapes", DESCRIBE_PROMPT, description(item), "", "describe")))
        return out
    cats = list(cfg.category_weights)
    weights = [cfg.category_weights[c] for c in cats]
    styles = list(cfg.style_weights)
    style_weights = [cfg.style_weights[s] for s in styles]
    out: list[tuple[SynthItem, Dialog]] = []
    i = 0
    while len(out) < cfg.batch_size:
        category = rng.choices(cats, weights)[0]
        render = render_presence if category == PRESENCE else partial(render_item, category)
        item = render(rng, f"{step}-{i}.png")
        i += 1
        style = rng.choices(styles, style_weights)[0]
        if cfg.paired_questions:  # a description has no pair; the batch keeps its size
            out.extend((item, d) for d in dialogs(item, (style,), cfg.lookup_copyable))
        else:
            out.append((item, rng.choice(dialogs(item, (style,), cfg.lookup_copyable))))
    return out[: cfg.batch_size]
