"""train-tiny's cell supervision: targets counted from the drawn pixels, read off the image tokens
the language model receives."""

from __future__ import annotations

import random

import numpy as np
import torch

from vlmcredit.data.mme_synth import SynthItem, SynthShape, render_shapes, synth_items
from vlmcredit.models.families import adapter_for
from vlmcredit.pipelines import train_tiny as tt
from vlmcredit.pipelines.train_cells import (
    CELL_COLOURS,
    CELL_KINDS,
    RELATIONS,
    CellSupervision,
    batch_targets,
    cell_targets,
    separate_gradient,
    shape_relations,
)


def _item(*shapes: SynthShape) -> SynthItem:
    return SynthItem("shapes", "x.png", None, (), shapes)


def test_cell_targets_count_the_drawn_pixels_of_each_cell() -> None:
    # 336 x 280 onto 12 x 10 cells: every cell is a 28-px block. A square with box (29, 29) -
    # (83, 83), PIL's corners inclusive: pixels 29..83 in both axes
    item = _item(SynthShape("square", "red", 56, 56, 27))
    t = cell_targets(item, 10, 12)
    assert t.shape == (120, len(CELL_COLOURS) + len(CELL_KINDS))
    red, square = CELL_COLOURS.index("red"), len(CELL_COLOURS) + CELL_KINDS.index("square")
    by_hand = {(1, 1): 27 * 27, (1, 2): 27 * 28, (2, 1): 28 * 27, (2, 2): 28 * 28}
    for r in range(10):
        for c in range(12):
            share = by_hand.get((r, c), 0) / 784
            assert np.isclose(t[r * 12 + c, red], share) and np.isclose(
                t[r * 12 + c, square], share
            )
            assert np.isclose(t[r * 12 + c, len(CELL_COLOURS) - 1], 1 - share)  # background
            assert np.isclose(t[r * 12 + c, -1], 1 - share)
    # two shapes in one cell split it; each half sums to one everywhere
    two = cell_targets(render_shapes(random.Random(3), 3, "y.png"), 8, 9)
    assert np.allclose(two[:, : len(CELL_COLOURS)].sum(1), 1)
    assert np.allclose(two[:, len(CELL_COLOURS) :].sum(1), 1)


def test_cell_targets_line_up_with_the_pixels_of_each_image_token() -> None:
    """The share of shape pixels in a cell's target against the share of non-white pixels in the
    patches the processor gives that image token (resampled: edges blur)."""
    _, _, processor = tt.build_parts(0, image_max_tokens=80)
    pixels = tt.Pixels(processor)
    items = [render_shapes(random.Random(s), 3, f"{s}.png") for s in range(4)]
    values, grid = pixels([it.image for it in items])
    targets = batch_targets(items, grid, pixels.merge).numpy()
    # back to 0-255 RGB: each merged token's row block holds its 4 patches x 3 x 2 x 14 x 14
    per_token = values.reshape(-1, 4, 3, 2, 14, 14).numpy()
    mean = np.asarray(processor.image_mean).reshape(1, 1, 3, 1, 1, 1)
    std = np.asarray(processor.image_std).reshape(1, 1, 3, 1, 1, 1)
    rgb = (per_token * std + mean) * 255
    inked = (rgb.min(axis=2) < 200).mean(axis=(1, 2, 3, 4))  # pixels that are not white
    shape_share = 1 - targets[:, len(CELL_COLOURS) - 1]
    assert len(inked) == len(shape_share) == 4 * 72
    assert np.corrcoef(inked, shape_share)[0, 1] > 0.97
    assert np.abs(inked - shape_share).max() < 0.2


def test_the_cell_head_reads_the_image_tokens_the_language_model_gets() -> None:
    _, model, processor = tt.build_parts(0, image_max_tokens=80)
    pixels = tt.Pixels(processor)
    items = [render_shapes(random.Random(s), 2, f"{s}.png") for s in range(2)]
    values, grid = pixels([it.image for it in items])
    cells = CellSupervision(model, seed=0)
    try:
        with torch.no_grad():
            fed = torch.cat(model.get_image_features(values, grid).pooler_output)
            targets = batch_targets(items, grid, pixels.merge)
            # one-hot targets, so the soft cross-entropy is the ordinary one
            hard = torch.zeros_like(targets)
            colour = targets[:, : len(CELL_COLOURS)].argmax(1)
            kind = targets[:, len(CELL_COLOURS) :].argmax(1)
            hard[torch.arange(len(hard)), colour] = 1
            hard[torch.arange(len(hard)), len(CELL_COLOURS) + kind] = 1
            seen = cells._seen[0]
            loss = cells.loss(hard)
        assert torch.equal(seen, fed)  # what the language model receives, row-major cells
        touched = hard[:, len(CELL_COLOURS) - 1] < 1
        logits = cells.head(fed)[touched]
        split = len(CELL_COLOURS)
        reference = torch.nn.functional.cross_entropy(logits[:, :split], colour[touched])
        reference += torch.nn.functional.cross_entropy(logits[:, split:], kind[touched])
        assert torch.allclose(loss, reference, atol=1e-6)
    finally:
        cells.close()
    adapter_for(model.config.model_type).vision_tower(model)(values, grid_thw=grid)
    assert cells._seen == []  # the hook is gone


def test_the_cell_gradient_is_clipped_apart_from_the_language_models() -> None:
    """Each gradient clipped at 1.0 on its own, then summed: against torch's clip_grad_norm_ on
    each loss alone."""
    torch.manual_seed(0)
    shared, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    params = [*shared.parameters(), *head.parameters()]
    x = torch.randn(5, 3)

    def losses():
        h = shared(x)
        return h.pow(2).sum() * 0.1, head(h).pow(2).sum() * 50  # small, and far above the clip

    expected = []
    for k in range(2):
        for p in params:
            p.grad = None
        losses()[k].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        expected.append([p.grad.clone() if p.grad is not None else 0 for p in params])
    for p in params:
        p.grad = None
    lm, cell = losses()
    grads = separate_gradient(cell, params)
    lm.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    norm = grads.add_clipped(1.0)
    assert norm > 10
    for p, a, b in zip(params, *expected, strict=True):
        assert torch.allclose(p.grad, a + b, atol=1e-6)


def test_relations_of_a_position_pair_give_synthetic_mmes_answer() -> None:
    """The named shape's relation flags decide the official question: "Is A on the left of B?"
    is Yes exactly when another shape lies to A's right (the pair's only other shape is B)."""
    flag_for = {"on the left of": "right", "on the right of": "left", "above": "below",
                "below": "above"}  # fmt: skip
    seen = set()
    for item in synth_items("position", 40, seed=5):
        rel = shape_relations(item.shapes)
        a = item.shapes[0]  # the first named shape (its colour and kind open the question)
        for question, truth in item.questions:
            assert question.startswith(f"Is the {a.color} {a.kind} ")
            asked = next(r for r in flag_for if f" {r} the " in question)
            seen.add((asked, truth))
            assert bool(rel[0, RELATIONS.index(flag_for[asked])]) == (truth == "Yes")
    assert len(seen) == 8  # every relation asked, answered Yes and No


def test_relation_targets_by_hand_on_an_exact_grid() -> None:
    """Two squares on the 28-px grid of 12 x 10 cells, the second entirely right of the first
    and lower: a cell of the first has another shape right and below, one of the second left
    and above; background cells have none; a cell half inside a shape has its shape's flags."""
    left = SynthShape("square", "red", 56, 56, 27)  # pixels 29..83: cells 1-2 (partly), both axes
    right = SynthShape("circle", "blue", 238, 210, 20)  # pixels 218..258 x 190..230: far right, low
    t = cell_targets(_item(left, right), 10, 12, relations=True)
    assert t.shape == (120, len(CELL_COLOURS) + len(CELL_KINDS) + len(RELATIONS))
    rel = t[:, -len(RELATIONS) :]
    assert np.array_equal(rel[2 * 12 + 2], [0, 1, 0, 1])  # inside the square: right, below
    assert np.array_equal(rel[1 * 12 + 1], [0, 1, 0, 1])  # 27 x 27 px of it, the rest background
    assert np.array_equal(rel[7 * 12 + 8], [1, 0, 1, 0])  # the circle's centre cell (210, 238)
    assert np.array_equal(rel[0], [0, 0, 0, 0]) and np.array_equal(rel[119], [0, 0, 0, 0])
    # the same colours and kinds as without relations
    assert np.array_equal(t[:, : -len(RELATIONS)], cell_targets(_item(left, right), 10, 12))
    # overlapping boxes along an axis are not a relation on that axis
    close = SynthShape("triangle", "green", 90, 70, 20)  # x 70..110 overlaps the square's 29..83
    assert np.array_equal(shape_relations([left, close])[0], [0, 0, 0, 0])


def test_the_relation_term_is_a_weighted_binary_cross_entropy() -> None:
    """The loss with relations on, against the colour/kind loss of a head without them plus the
    weight times the logistic loss written out."""
    _, model, processor = tt.build_parts(0, image_max_tokens=80)
    pixels = tt.Pixels(processor)
    items = list(synth_items("position", 3, seed=2))
    values, grid = pixels([it.image for it in items])
    with_rel, plain = CellSupervision(model, 0, relations=2.5), CellSupervision(model, 0)
    try:
        targets = batch_targets(items, grid, pixels.merge, relations=True)
        assert targets[:, -len(RELATIONS) :].sum() > 0
        with torch.no_grad():
            model.get_image_features(values, grid)
            loss = with_rel.loss(targets)
            fed = plain._seen[0]
            plain.head.weight.copy_(with_rel.head.weight[: -len(RELATIONS)])
            plain.head.bias.copy_(with_rel.head.bias[: -len(RELATIONS)])
            base = plain.loss(targets[:, : -len(RELATIONS)])
        touched = targets[:, len(CELL_COLOURS) - 1] < 1
        z = with_rel.head(fed)[touched, -len(RELATIONS) :].detach().double()
        y = targets[touched, -len(RELATIONS) :].double()
        p = 1 / (1 + torch.exp(-z))
        by_hand = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
        assert abs(with_rel.last_relation_loss - float(by_hand)) < 1e-5
        assert torch.allclose(loss.double(), base.double() + 2.5 * by_hand, atol=1e-5)
    finally:
        with_rel.close()
        plain.close()
