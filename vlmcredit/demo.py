"""The built-in demo: the user's path on a tiny offline checkpoint.

It grows as commands land. Today: build the tiny checkpoint, describe it, encode a rendered
image + prompt + response and show the token layout the probes work on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vlmcredit.data.sample import Sample

DEMO_FAMILY = "qwen2.5-vl"


def demo_image(seed: int = 0):  # -> PIL.Image.Image
    """A small rendered scene: coloured shapes on a light background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (224, 168), (235, 235, 230))
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 30, 90, 100), fill=(200, 30, 30))
    draw.rectangle((130, 60, 200, 130), fill=(30, 60, 200))
    draw.text((20, 140), "RED & BLUE", fill=(10, 10, 10))
    return img


def demo_samples() -> list[Sample]:
    img = demo_image()
    return [
        Sample(
            [img], "Is there a red circle in the image?", "Yes, there is a red circle.", "demo-0"
        ),
        Sample([img], "What is on the right?", "A blue square is on the right.", "demo-1"),
    ]


def ensure_tiny_checkpoint(out: Path) -> Path:
    from vlmcredit.probes.tiny import make_tiny

    ckpt = out / f"tiny-{DEMO_FAMILY}"
    if not (ckpt / "config.json").is_file():
        make_tiny(DEMO_FAMILY, ckpt, seed=0)
    return ckpt


def run_demo(out: Path, echo: Callable[[str], None] = print) -> None:
    from vlmcredit.probes.describe import describe_checkpoint
    from vlmcredit.probes.inputs import encode_samples
    from vlmcredit.probes.loading import load_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    echo("vlmcredit demo (partial): what exists so far is checkpoint building, loading and the")
    echo("token layout; capture, probe-heads, anchors, export and report join as they land.\n")
    ckpt = ensure_tiny_checkpoint(out)
    echo(f"[1/3] tiny {DEMO_FAMILY} checkpoint: {ckpt}")
    facts = describe_checkpoint(ckpt)
    echo("[2/3] vlmcredit info --ckpt " + str(ckpt))
    for key in (
        "family",
        "layers",
        "heads",
        "kv_heads",
        "head_dim",
        "vision_patch_size",
        "vision_merge_size",
        "image_token_id",
        "parameters",
    ):
        echo(f"      {key:<18} {facts[key]}")
    loaded = load_checkpoint(ckpt, dtype="fp32")
    batch = encode_samples(loaded.processor, loaded.geometry, demo_samples())
    echo("[3/3] teacher-forced batch (left-padded) and its token layout")
    for sample, layout in zip(demo_samples(), batch.layouts, strict=True):
        im = layout.images[0]
        _, rows, cols = im.merged_grid
        echo(
            f"      {sample.id}: prompt {layout.prompt_span}, response {layout.response_span} "
            f"({layout.num_response_tokens} tokens), image {im.original_size[1]}x"
            f"{im.original_size[0]} px -> {rows}x{cols} cells = {im.num_tokens} image tokens"
        )
    echo(f"\ndemo outputs in {out}/")
