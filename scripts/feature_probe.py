#!/usr/bin/env python3
"""What a train-tiny checkpoint's image tokens carry: shape colour and shape kind.

    python scripts/feature_probe.py CHECKPOINT [CHECKPOINT ...] [--images 240]

On held-out single-shape images (`render_shapes`, seeds no training stream uses), two measures:

1. linear probes after each stage of the vision tower (patch embedding, every block, the merger
   whose output the language model reads): a softmax regression on the mean of the unit-normed
   patch (or merged-token) features of an image, fitted on `--images` images and scored on a
   third as many others; chance is 1/6 for colour and 1/3 for kind;
2. descriptions, teacher-forced: the share of colour words and of kind words of "There is one
   shape: a red circle at the top left." whose greedy prediction is right.

builtin-model-recipes.md uses it to show where the shipped lineage lost colour (the merger) and
that a curriculum that learns colour first leaves kind unlearned.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlmcredit.data.mme_synth import COLORS, SHAPES, render_shapes  # noqa: E402
from vlmcredit.data.synth_dialogs import DESCRIBE_PROMPT, Dialog, description  # noqa: E402
from vlmcredit.pipelines import train_tiny as tt  # noqa: E402

TRAIN_SEED, TEST_SEED, DESCRIBE_SEED = "probe-train", "probe-test", "probe-describe"


def load(folder: Path) -> tuple:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor, read_model_type

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype="float32").eval()
    processor = load_processor(folder, adapter_for(read_model_type(folder, str(folder))))
    return model, AutoTokenizer.from_pretrained(folder), tt.Pixels(processor.image_processor)


def stage_features(model, pixels, seed: str, n: int) -> tuple[dict, np.ndarray, np.ndarray]:
    vision = model.model.visual
    names = ["patch_embed", *(f"blocks.{i}" for i in range(len(vision.blocks))), "merger"]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        vision.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(
                name, out[0] if isinstance(out, tuple) else out
            )
        )
        for name in names
    ]
    rng = random.Random(seed)
    items = [render_shapes(rng, 1, f"{i}.png") for i in range(n)]
    feats: dict[str, list[np.ndarray]] = {name: [] for name in names}
    try:
        for item in items:
            values, grid = pixels([item.image])
            with torch.no_grad():
                vision(values, grid_thw=grid)
            for name in names:
                x = seen[name]
                feats[name].append((x / x.norm(dim=-1, keepdim=True)).mean(0).numpy())
    finally:
        for h in hooks:
            h.remove()
    colours = np.array([list(COLORS).index(it.shapes[0].color) for it in items])
    kinds = np.array([SHAPES.index(it.shapes[0].kind) for it in items])
    return {k: np.array(v) for k, v in feats.items()}, colours, kinds


def probe(x_train, y_train, x_test, y_test, classes: int) -> float:
    """Held-out accuracy of an L2-regularised softmax regression on standardised features."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = torch.tensor((x_train - mu) / sd, dtype=torch.float32)
    b = torch.tensor((x_test - mu) / sd, dtype=torch.float32)
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=300)
    target = torch.tensor(y_train)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, target) + 1e-2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((b @ w + bias).argmax(-1).numpy() == y_test).mean())


def described(model, tok, pixels, n: int = 96) -> dict[str, tuple[int, int]]:
    rng = random.Random(DESCRIBE_SEED)
    items = [render_shapes(rng, 1, f"{i}.png") for i in range(n)]
    tt.IMAGE_ID[0] = tok.convert_tokens_to_ids("<|image_pad|>")
    _, grid = pixels([items[0].image])
    encoder = tt.Encoder(tok, int(grid[0].prod()) // 4)
    dialogs = [Dialog("shapes", DESCRIBE_PROMPT, description(it), "", "describe") for it in items]
    enc = encoder.batch(dialogs)
    with torch.no_grad():
        logits = model(**tt.model_inputs(enc, pixels([it.image for it in items]))).logits
    words = {
        "colour": {tok.convert_tokens_to_ids("Ġ" + c) for c in COLORS},
        "kind": {tok.convert_tokens_to_ids("Ġ" + k) for k in SHAPES},
    }
    right = {w: [0, 0] for w in words}
    for k in range(n):
        labels = enc["labels"][k]
        for p in (labels != -100).nonzero().flatten().tolist():
            for w, ids in words.items():
                if int(labels[p]) in ids:
                    right[w][0] += int(logits[k, p - 1].argmax()) == int(labels[p])
                    right[w][1] += 1
    return {w: (r, t) for w, (r, t) in right.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--images", type=int, default=240, help="probe training images")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for folder in args.checkpoints:
        if not (folder / "model.safetensors").is_file():
            raise SystemExit(f"{folder}: no model.safetensors; pass a train-tiny checkpoint folder")
        model, tok, pixels = load(folder)
        train, c_train, k_train = stage_features(model, pixels, TRAIN_SEED, args.images)
        test, c_test, k_test = stage_features(model, pixels, TEST_SEED, args.images // 3)
        print(folder)
        for name in train:
            colour = probe(train[name], c_train, test[name], c_test, len(COLORS))
            kind = probe(train[name], k_train, test[name], k_test, len(SHAPES))
            print(f"  {name:12s} linear probe: colour {colour:.2f}  kind {kind:.2f}")
        said = described(model, tok, pixels)
        print("  descriptions: " + ", ".join(f"{w} {r}/{t}" for w, (r, t) in said.items()))


if __name__ == "__main__":
    main()
