"""The built-in demo: the user's whole path on a tiny offline checkpoint.

synthetic MME -> probe-heads -> sample rollouts -> anchors -> export -> report, each step run
through the same pipeline functions the commands call (the demo drives the library, not the
CLI module). The checkpoint is the tiny random-weight one `make-tiny` builds, with its yes/no
lm_head rows fitted to the synthetic MME set (`probes/tiny_answerer.py`) so that its answers
depend on the image and ablating a head moves the score. A trained demo model will replace it: the
numbers show the mechanics, not findings about a real model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from vlmcredit.errors import VlmCreditError

DEMO_FAMILY = "qwen2.5-vl"
DEMO_SEED = 0
MME_IMAGES_PER_CATEGORY = 4
# The paper's threshold (a drop of more than 100 in the MME total) is meant for all 14 subtasks;
# the demo scores 6 synthetic ones, so probe-heads' default for a partial MME applies: the
# documented relative rule (docs/methods.md), drop > 0.5 x (baseline - gray-image control).


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


DEMO_MARKER = ".vlmcredit-demo"
# What a demo run writes inside --out; only these are replaced when the demo runs again.
DEMO_OUTPUTS = ("mme", "data", "runs", "export-verl", "export-trl", "report.html", "report-figures")


def prepare_out(out: Path) -> None:
    """Use `out` only if it is new, empty, or a folder an earlier demo made (its marker file);
    then remove exactly what an earlier demo wrote there, nothing else."""
    if out.exists() and not out.is_dir():
        raise VlmCreditError(f"--out {out}: is a file; choose a folder for the demo")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
        raise VlmCreditError(
            f"--out {out}: exists, is not empty and was not made by `vlmcredit demo`; choose a "
            "new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by vlmcredit demo; it replaces its own outputs here\n")
    for name in DEMO_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def run_demo(out: Path, echo: Callable[[str], None] = print) -> Path:
    """Run the whole path into `out` through the library; returns the report's path."""
    from transformers.utils import logging as hf_logging

    from vlmcredit.data.mme_synth import write_synthetic_mme
    from vlmcredit.export.formats import export_run
    from vlmcredit.formats.heads import read_heads
    from vlmcredit.models.describe import describe_checkpoint
    from vlmcredit.pipelines.anchors import AnchorsRunConfig, run_anchors
    from vlmcredit.pipelines.probe_heads import ProbeHeadsConfig, run_probe_heads
    from vlmcredit.reports.report import build_report, default_png_dir, write_report
    from vlmcredit.reports.sections import ReportOptions

    hf_logging.disable_progress_bar()  # weight-loading bars of a sub-MB model are noise
    prepare_out(out)
    echo("vlmcredit demo: synthetic MME -> probe-heads -> rollouts -> anchors -> export -> report")
    echo(f"on a tiny random-weight {DEMO_FAMILY} checkpoint (mechanics, not findings).\n")
    tiny = ensure_tiny_checkpoint(out)
    runs = out / "runs"

    echo("[1/7] the checkpoint")
    facts = describe_checkpoint(str(tiny))
    echo("      " + ", ".join(f"{k} {facts[k]}" for k in list(facts)[:6]))
    echo("\n[2/7] a synthetic MME set (real rendered images, one Yes and one No per image)")
    mme = out / "mme"
    counts = write_synthetic_mme(mme, MME_IMAGES_PER_CATEGORY, 0, None)
    echo(f"      {sum(counts.values())} images in {len(counts)} categories: {mme}")
    ckpt = answerer_checkpoint(out, tiny, mme)
    echo(f"      yes/no lm_head rows fitted on it by a ridge probe: {ckpt}")

    echo("\n[3/7] vision-critical heads: ablate each head index in every layer, score MME")
    heads = run_probe_heads(
        ProbeHeadsConfig(ckpt=str(ckpt), mme=mme, out=runs / "heads", dtype="fp32")
    ).path
    report = read_heads(heads)
    metric, controls, rule = report["metric"], report["controls"], report["threshold_rule"]
    echo(
        f"      baseline {metric} {report['baseline'][metric]:.2f}; controls: gray image "
        f"{controls['gray_image'][metric]:.2f}, constant yes {controls['constant_yes'][metric]:.2f}"
        f", constant no {controls['constant_no'][metric]:.2f}"
    )
    for h in report["heads"]:
        answers = h["answers"]
        flag = f", all {answers['constant']}" if answers["constant"] else ""
        echo(
            f"      head {h['head']}: drop {h['drop'][metric]:.1f} ({metric} "
            f"{h['scores'][metric]:.1f}, other answers {100 * answers['other']:.0f}%{flag})"
        )
    echo(f"      threshold rule: {rule['rule']} ({rule['reason']})")
    echo(f"      {rule['formula']}")
    echo(
        f"      critical (drop > {report['threshold']:g}): "
        f"{', '.join(map(str, report['critical_heads'])) or 'none'}"
    )

    echo("\n[4/7] rollouts to analyse (rendered images + responses)")
    data = write_demo_rollouts(out / "data")
    echo(f"      {data}")
    echo("\n[5/7] anchor tokens: token-image graph + Leiden, ~15% of response tokens")
    if not report["critical"]:
        echo("      (no head passed the threshold: averaging every head)")
    anchors = run_anchors(
        AnchorsRunConfig(
            out=runs / "anchors",
            ckpt=str(ckpt),
            data=data,
            heads_json=heads / "heads.json" if report["critical"] else None,
            dtype="fp32",
        )
    )
    s = anchors.manifest["anchors"]
    echo(
        f"      {s['num_anchors']} anchors of {s['num_tokens']} response tokens "
        f"({100 * s['ratio_achieved']:.1f}%) in {s['num_samples']} samples: {anchors.path}"
    )

    echo("\n[6/7] export for the trainers")
    for fmt in ("verl", "trl"):
        result = export_run(anchors.path, fmt, out / f"export-{fmt}", heads / "heads.json")
        echo(f"      {fmt}: {result.out} ({', '.join(result.files)})")

    echo("\n[7/7] the report")
    page = out / "report.html"
    built = build_report([heads, anchors.path], ReportOptions())
    write_report(built, page, default_png_dir(page))
    echo(f"      {len(built.sections)} sections, {len(built.figures)} figures")
    echo(f"\ndemo done. Open the report: {page}")
    return page
