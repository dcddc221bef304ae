"""Cell supervision for train-tiny: what each image token should carry, read by a linear head.

The built-in model's vision merger, trained through the language model's loss alone, kept either
shape kind or colour in its output and dropped the other (linear probes of the merger output,
scripts/feature_probe.py; docs/builtin-model-recipes.md). `--cell-loss W` adds W times an auxiliary
loss: a linear head on the merger output (the image tokens the language model reads) predicts,
for every merged 28-px cell, the share of its pixels of each colour and of each shape kind (with
background as a class in both). Its targets come from the drawn geometry, so both features are
asked of every cell that a shape touches, from the first step.

The head is a training device: it is saved with the resume state and never with a checkpoint,
which stays the plain transformers class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmcredit.data.mme_synth import COLORS, IMAGE_SIZE, SHAPES, SynthItem, shape_index_map

CELL_COLOURS = (*COLORS, "background")
CELL_KINDS = (*SHAPES, "background")


def cell_targets(item: SynthItem, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, colours + kinds) float32, cells row-major as the merger emits them: the share
    of each cell's pixels that is each colour (then background) and each kind (then background).

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
    return np.concatenate([share @ colour, share @ kind], axis=1).astype(np.float32)


def batch_targets(items: Sequence[SynthItem], grid: Any, merge: int) -> Any:
    """Targets of a batch, one block per image in the order of `grid` (its image_grid_thw)."""
    import torch

    blocks = []
    for item, (_, h, w) in zip(items, grid.tolist(), strict=True):
        blocks.append(cell_targets(item, h // merge, w // merge))
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

    def __init__(self, model: Any, seed: int) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        width = model.config.text_config.hidden_size
        # skip_init: drawing from the global generator would shift every later draw of the run
        self.head = torch.nn.utils.skip_init(
            torch.nn.Linear, width, len(CELL_COLOURS) + len(CELL_KINDS)
        )
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
        those cells, the two summed), on the image tokens of the last forward."""
        import torch

        if len(self._seen) != 1:
            raise RuntimeError(f"expected one vision forward, saw {len(self._seen)}")
        tokens = self._seen.pop()
        if tokens.shape[0] != targets.shape[0]:
            raise RuntimeError(f"{tokens.shape[0]} image tokens, {targets.shape[0]} cell targets")
        logits = self.head(tokens)
        touched = targets[:, len(CELL_COLOURS) - 1] < 1.0  # not all background
        split = len(CELL_COLOURS)
        total = logits.new_zeros(())
        for lo, hi in ((0, split), (split, targets.shape[1])):
            logp = torch.log_softmax(logits[touched, lo:hi], dim=-1)
            total = total + -(targets[touched, lo:hi] * logp).sum(-1).mean()
        return total

    def discard(self) -> None:
        """Forget a forward the loss was not taken of (evaluation)."""
        self._seen.clear()

    def close(self) -> None:
        self._hook.remove()
        self._seen.clear()
