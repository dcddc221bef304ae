"""The built-in demo: the user's whole path on a tiny offline checkpoint.

synthetic MME -> probe-heads -> sample rollouts -> anchors -> export -> report, each step run
through the same `vlmcredit` command a user types (in-process), so the demo exercises the real
CLI. The checkpoint is the tiny random-weight one `make-tiny` builds, with its yes/no lm_head
rows fitted to the synthetic MME set (`probes/tiny_answerer.py`) so that its answers depend on
the image and ablating a head moves the score. A trained demo model will replace it: the
numbers show the mechanics, not findings about a real model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from vlmcredit.errors import VlmCreditError

DEMO_FAMILY = "qwen2.5-vl"
DEMO_SEED = 0
MME_IMAGES_PER_CATEGORY = 4
# The paper's threshold is a drop of more than 100 in the MME total over 2,374 questions. On the
# demo's 48 questions every one of the tiny model's 4 heads drops the total by 112-150, so the
# demo sets the bar at 125 to show a real selection (3 of 4) flowing into anchors.
DEMO_THRESHOLD = 125.0


def ensure_tiny_checkpoint(out: Path) -> Path:
    from vlmcredit.models.tiny import make_tiny

    ckpt = out / f"tiny-{DEMO_FAMILY}"
    if not (ckpt / "config.json").is_file():
        make_tiny(DEMO_FAMILY, ckpt, seed=DEMO_SEED)
    return ckpt


def answerer_checkpoint(out: Path, tiny: Path, mme: Path) -> Path:
    """The tiny checkpoint with yes/no rows fitted to the synthetic MME set (fresh each run)."""
    from vlmcredit.probes.tiny_answerer import yes_no_checkpoint

    target = out / f"tiny-{DEMO_FAMILY}-answerer"
    shutil.rmtree(target, ignore_errors=True)
    return yes_no_checkpoint(tiny, target, mme)


def describe_shapes(item) -> str:  # item: vlmcredit.data.mme_synth.SynthItem
    """A faithful one-paragraph answer about a synthetic image (what was drawn)."""
    if item.text:
        return f'The image shows the text "{item.text}" written in dark letters.'
    parts = [f"a {s.color} {s.kind} near ({s.cx}, {s.cy})" for s in item.shapes]
    listing = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return f"There are {len(parts)} shapes in the picture: {listing}. The background is plain."


def write_demo_rollouts(folder: Path, seed: int = DEMO_SEED) -> Path:
    """A JSONL rollout file over rendered images, as users hand one in."""
    from vlmcredit.data.mme_synth import synth_items

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for category in ("color", "position", "count", "OCR"):
        for item in synth_items(category, 2, seed + 1):
            name = f"{category}-{item.name}"
            item.image.save(folder / name)
            rows.append(
                {
                    "id": f"{category}-{item.name.split('.')[0]}",
                    "images": [name],
                    "prompt": "Describe what you see in the image.",
                    "response": describe_shapes(item),
                }
            )
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vlmcredit(args: Sequence[str], echo: Callable[[str], None]) -> None:
    """Run one `vlmcredit` command in-process, exactly as typed; stop the demo if it fails."""
    from vlmcredit.cli.main import app

    echo("$ vlmcredit " + " ".join(args))
    code = app(list(args), standalone_mode=False)
    if code not in (None, 0):
        raise VlmCreditError(f"demo step 'vlmcredit {args[0]}' failed (exit {code})")


def run_demo(out: Path, echo: Callable[[str], None] = print) -> Path:
    """Run the whole path into `out`; returns the report's path."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars of a sub-MB model are noise
    out.mkdir(parents=True, exist_ok=True)
    echo("vlmcredit demo: synthetic MME -> probe-heads -> rollouts -> anchors -> export -> report")
    echo(f"on a tiny random-weight {DEMO_FAMILY} checkpoint (mechanics, not findings).\n")
    ckpt = str(ensure_tiny_checkpoint(out))
    runs = out / "runs"
    for stale in ("heads", "anchors"):  # the demo starts fresh each time
        shutil.rmtree(runs / stale, ignore_errors=True)
    for stale in ("export-verl", "export-trl", "mme", "data", "report-figures"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "report.html").unlink(missing_ok=True)

    echo("[1/7] the checkpoint")
    _vlmcredit(["info", "--ckpt", ckpt], echo)
    echo("\n[2/7] a synthetic MME set (real rendered images, one Yes and one No per image)")
    mme = out / "mme"
    n = str(MME_IMAGES_PER_CATEGORY)
    _vlmcredit(["mme-synth", "--out", str(mme), "--images-per-category", n, "--seed", "0"], echo)
    ckpt = str(answerer_checkpoint(out, Path(ckpt), mme))
    echo(f"      yes/no lm_head rows fitted on it by a ridge probe: {ckpt}")
    echo("\n[3/7] vision-critical heads: ablate each head index in every layer, score MME")
    heads = runs / "heads"
    args = ["probe-heads", "--ckpt", ckpt, "--mme", str(mme), "--out", str(heads)]
    _vlmcredit([*args, "--threshold", str(DEMO_THRESHOLD), "--dtype", "fp32", "--quiet"], echo)
    critical = json.loads((heads / "heads.json").read_text())["critical"]
    echo("\n[4/7] rollouts to analyse (rendered images + responses)")
    data = write_demo_rollouts(out / "data")
    echo(f"      {data}")
    echo("\n[5/7] anchor tokens: token-image graph + Leiden, ~15% of response tokens")
    anchors = runs / "anchors"
    args = ["anchors", "--ckpt", ckpt, "--data", str(data), "--out", str(anchors)]
    if critical:
        args += ["--heads-json", str(heads / "heads.json")]
    else:
        echo("      (no head passed the threshold: averaging every head)")
    _vlmcredit([*args, "--dtype", "fp32", "--quiet"], echo)
    echo("\n[6/7] export for the trainers")
    for fmt in ("verl", "trl"):
        target = out / f"export-{fmt}"
        args = ["export", str(anchors), "--format", fmt, "--out", str(target)]
        _vlmcredit([*args, "--heads", str(heads / "heads.json")], echo)
    echo("\n[7/7] the report")
    report = out / "report.html"
    _vlmcredit(["report", str(heads), str(anchors), "--out", str(report), "--quiet"], echo)
    echo(f"\ndemo done. Open the report: {report}")
    return report
