"""Cell supervision for train-tiny: what each image token should carry, read by a linear head.

The built-in model's vision merger, trained through the language model's loss alone, kept either
shape kind or colour in its output and dropped the other (linear probes of the merger output,
scripts/feature_probe.py; docs/builtin-model-recipes.md). `--cell-loss W` adds W times an auxiliary
loss: a linear head on the merger output (the image tokens the language model reads) predicts,
for every merged 28-px cell, the share of its pixels of each colour and of each shape kind (with
background as a class in both). Its targets come from the drawn geometry, so both features are
asked of every cell that a shape touches, from the first step.

`--cell-relations R` adds, for the same cells, R times a binary cross-entropy on where the other
shapes are: for each of left / right / above / below, whether another shape's box lies entirely
on that side of the cell's own shape. A position question ("Is the red circle on the left of the
blue square?") then has its answer in the tokens of the shape it names, as a colour question
does. Qwen2.5-VL's vision tower has no absolute position embedding (2-D rotary only), so on a
white background where a shape is in the image is not computable there; where it is relative to
another shape is (the full-attention block sees both).

The head is a training device: it is saved with the resume state and never with a checkpoint,
which stays the plain transformers class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmcredit.data.mme_synth import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    SynthItem,
    SynthShape,
    shape_index_map,
)

CELL_COLOURS = (*COLORS, "background")
CELL_KINDS = (*SHAPES, "background")
# another shape's box lies entirely on this side of the cell's shape (image axes: y grows down)
RELATIONS = ("left", "right", "above", "below")


def shape_relations(shapes: Sequence[SynthShape]) -> np.ndarray:
    """(len(shapes), 4) float32: for each shape, whether some other shape's box lies entirely to
    its left, right, above, below (the separation synthetic MME draws its position pairs with)."""
    out = np.zeros((len(shapes), len(RELATIONS)), np.float32)
    for i, a in enumerate(shapes):
        ax0, ay0, ax1, ay1 = a.box
        for j, b in enumerate(shapes):
            if i != j:
                bx0, by0, bx1, by1 = b.box
                out[i] = np.maximum(out[i], [bx1 < ax0, bx0 > ax1, by1 < ay0, by0 > ay1])
    return out


def cell_targets(item: SynthItem, rows: int, cols: int, relations: bool = False) -> np.ndarray:
    """(rows * cols, colours + kinds [+ 4 relations]) float32, cells row-major as the merger emits
    them: the share of each cell's pixels that is each colour (then background) and each kind
    (then background); with `relations`, the `RELATIONS` of the shapes in the cell, averaged over
    its shape pixels (0 for a background cell).

    The processor resizes the whole image onto the rows x cols grid of merged cells, so the pixel
    at (x, y) of the drawn image lands in cell (floor((y + .5) * rows / H), floor((x + .5) * cols /
    W)); shares are counted on the drawn pixels, before resampling blurs the edges.
    """
    width, height = IMAGE_SIZE
    owner = shape_index_map(item.shapes)  # (H, W): 0 background, k + 1 shape k
    row = ((np.arange(height) + 0.5) * rows / height).astype(np.int64)
    col = ((np.arange(width) + 0.5) * cols / width).astype(np.int64)
    cell = (row[:, None] * cols + col[None, :]).ravel()
    n_shapes = len(item.shapes) + 1
    counts = np.bincount(cell * n_shapes + owner.ravel(), minlength=rows * cols * n_shapes)
    share = (
        counts.reshape(rows * cols, n_shapes) / np.bincount(cell, minlength=rows * cols)[:, None]
    )
    colour = np.zeros((n_shapes, len(CELL_COLOURS)), np.float32)  # shape index -> one-hot class
    kind = np.zeros((n_shapes, len(CELL_KINDS)), np.float32)
    colour[0, -1] = kind[0, -1] = 1.0
    for k, s in enumerate(item.shapes, start=1):
        colour[k, CELL_COLOURS.index(s.color)] = 1.0
        kind[k, CELL_KINDS.index(s.kind)] = 1.0
    parts = [share @ colour, share @ kind]
    if relations:
        on_shapes = share[:, 1:].sum(1, keepdims=True)
        rel = share[:, 1:] @ shape_relations(item.shapes)
        parts.append(np.divide(rel, on_shapes, out=np.zeros_like(rel), where=on_shapes > 0))
    return np.concatenate(parts, axis=1).astype(np.float32)


def batch_targets(
    items: Sequence[SynthItem], grid: Any, merge: int, relations: bool = False
) -> Any:
    """Targets of a batch, one block per image in the order of `grid` (its image_grid_thw)."""
    import torch

    blocks = []
    for item, (_, h, w) in zip(items, grid.tolist(), strict=True):
        blocks.append(cell_targets(item, h // merge, w // merge, relations))
    return torch.from_numpy(np.concatenate(blocks))


class ClippedGradient:
    """A gradient to add to the parameters' own (`.grad`) after theirs was clipped."""

    def __init__(self, params: list[Any], grads: Sequence[Any]) -> None:
        self.pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]

    def add_clipped(self, max_norm: float) -> float:
        """Add it, scaled as torch's clip_grad_norm_ scales (max_norm / (norm + 1e-6), at most
        1); returns its norm before clipping."""
        import torch

        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for _, g in self.pairs])))
        scale = min(1.0, max_norm / (norm + 1e-6))
        for p, g in self.pairs:
            if p.grad is None:
                p.grad = g * scale
            else:
                p.grad.add_(g, alpha=scale)
        return norm


def separate_gradient(loss: Any, params: list[Any]) -> ClippedGradient:
    """The gradient of `loss` (the weighted cell loss), kept apart from the language model's:
    both are clipped at the same norm on their own, so a large cell gradient (a head that
    starts on a trained model's image tokens: norms of 4-60 over the first hundreds of steps)
    cannot shrink the language model's steps through a joint clip."""
    import torch

    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return ClippedGradient(params, grads)


class CellSupervision:
    """The head, the hook that reads the merger output of each forward, and the loss.

    The hook keeps the output of the vision tower (found through the family adapter; cells
    row-major, the window reordering undone), which is what the language model receives as image
    tokens.
    """

    def __init__(self, model: Any, seed: int, relations: float = 0.0) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        width = model.config.text_config.hidden_size
        self.relations = relations  # weight of the relation term; 0: no relation outputs
        outputs = len(CELL_COLOURS) + len(CELL_KINDS) + (len(RELATIONS) if relations else 0)
        # skip_init: drawing from the global generator would shift every later draw of the run
        self.head = torch.nn.utils.skip_init(torch.nn.Linear, width, outputs)
        self.last_relation_loss: float | None = None
        with torch.no_grad():
            bound = width**-0.5
            self.head.weight.uniform_(-bound, bound, generator=generator)
            self.head.bias.zero_()
        self._seen: list[Any] = []
        from vlmcredit.models.families import adapter_for

        tower = adapter_for(model.config.model_type).vision_tower(model)
        self._hook = tower.register_forward_hook(
            lambda _m, _i, out: self._seen.append(out.pooler_output)
        )

    def loss(self, targets: Any) -> Any:
        """Soft cross-entropy of colour and of kind over the cells a shape touches (mean over
        those cells, the two summed), plus `relations` times the binary cross-entropy of the
        relation outputs over the same cells (mean over cells and relations), on the image tokens
        of the last forward."""
        import torch

        if len(self._seen) != 1:
            raise RuntimeError(f"expected one vision forward, saw {len(self._seen)}")
        tokens = self._seen.pop()
        if tokens.shape[0] != targets.shape[0]:
            raise RuntimeError(f"{tokens.shape[0]} image tokens, {targets.shape[0]} cell targets")
        logits = self.head(tokens)
        touched = targets[:, len(CELL_COLOURS) - 1] < 1.0  # not all background
        if logits.shape[1] != targets.shape[1]:
            raise RuntimeError(f"{logits.shape[1]} head outputs, {targets.shape[1]} targets")
        split, end = len(CELL_COLOURS), len(CELL_COLOURS) + len(CELL_KINDS)
        total = logits.new_zeros(())
        for lo, hi in ((0, split), (split, end)):
            logp = torch.log_softmax(logits[touched, lo:hi], dim=-1)
            total = total + -(targets[touched, lo:hi] * logp).sum(-1).mean()
        if self.relations:
            rel = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[touched, end:], targets[touched, end:]
            )
            self.last_relation_loss = float(rel.detach())
            total = total + self.relations * rel
        return total

    def discard(self) -> None:
        """Forget a forward the loss was not taken of (evaluation)."""
        self._seen.clear()

    def close(self) -> None:
        self._hook.remove()
        self._seen.clear()
