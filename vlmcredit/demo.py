"""The built-in demo: the user's path on a tiny offline checkpoint.

It grows as commands land. Today: build the tiny checkpoint, describe it, write a small rollout
file with rendered images, run `capture` on it (response -> image attention and Q/K into a run
folder) and show which response tokens put the most attention on the image.
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


def write_demo_rollouts(folder: Path) -> Path:
    """A JSONL rollout file with one rendered image, as users would hand one in."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    demo_image().save(folder / "scene.png")
    rows = [
        {"id": s.id, "images": ["scene.png"], "prompt": s.prompt, "response": s.response}
        for s in demo_samples()
    ]
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_demo(out: Path, echo: Callable[[str], None] = print) -> None:
    import shutil

    from vlmcredit.probes.capture_run import CaptureRunConfig, run_capture
    from vlmcredit.probes.describe import describe_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    echo("vlmcredit demo (partial): checkpoint building, loading, token layout and attention")
    echo("capture exist so far; probe-heads, anchors, export and report join as they land.\n")
    ckpt = ensure_tiny_checkpoint(out)
    echo(f"[1/3] tiny {DEMO_FAMILY} checkpoint (random weights): {ckpt}")
    facts = describe_checkpoint(ckpt)
    echo(f"[2/3] vlmcredit info --ckpt {ckpt}")
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
    data = write_demo_rollouts(out / "data")
    run_dir = out / "runs" / "capture"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo starts fresh each time
    echo(f"[3/3] vlmcredit capture --ckpt {ckpt} --data {data} --out {run_dir}")
    run = run_capture(CaptureRunConfig(ckpt=str(ckpt), data=data, out=run_dir, dtype="fp32"))
    show_capture(run, ckpt, echo)
    echo(f"\ndemo outputs in {out}/ (run folder: {run_dir})")


def show_capture(run, ckpt: Path, echo: Callable[[str], None]) -> None:  # run: vlmcredit.runs.Run
    """Per sample: the response tokens with the most attention mass on the image."""
    from vlmcredit.probes.families import CLI_NAMES, FAMILIES
    from vlmcredit.probes.loading import load_processor, resolve_checkpoint

    processor = load_processor(resolve_checkpoint(ckpt), FAMILIES[CLI_NAMES[DEMO_FAMILY]])
    for row in run.rows:
        tensors = run.tensors(row["id"])
        attention = tensors["attention"]  # (layers, 1, T, N): mean over heads
        mass = attention.sum(-1).mean(0)[0]  # image mass per response token, mean over layers
        tokens = [processor.tokenizer.decode([t]) for t in tensors["response_ids"].tolist()]
        top = mass.argsort(descending=True)[:3].tolist()
        shown = ", ".join(f"{tokens[i]!r} {float(mass[i]):.3f}" for i in top)
        echo(
            f"      {row['id']}: {row['num_response_tokens']} response x "
            f"{row['num_image_tokens']} image tokens; most image-attentive: {shown}"
        )
