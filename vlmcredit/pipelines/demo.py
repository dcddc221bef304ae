"""The built-in demo: the user's whole path on the built-in model, offline.

synthetic MME -> probe-heads (with controls) -> the model's own rollouts -> anchors -> every
weight method -> compare -> export -> report, each step run through the same pipeline functions
the commands call (the demo drives the library, not the CLI module). The model is
`builtin:tiny-qwen2.5-vl`, a small Qwen2.5-VL trained from scratch on synthetic shape images
(docs/builtin-model.md): it answers the shape questions well above chance, so its heads and
anchors are findings about a model that sees, at toy scale.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmcredit.errors import VlmCreditError

DEMO_CKPT = "builtin:tiny-qwen2.5-vl"
DEMO_SEED = 0  # synthetic images for the demo; the training streams never produce these
# The paper's threshold (a drop of more than 100 in the MME total) is meant for all 14 subtasks;
# the demo scores the 4 shape subtasks the model was trained on, so probe-heads' default for a
# partial MME applies: the documented relative rule (docs/methods.md), drop > 0.5 x (baseline -
# gray-image control).


@dataclass(frozen=True)
class DemoSize:
    mme_images: int  # per category
    rollout_images: int  # per category; one greedy response each


FULL = DemoSize(mme_images=12, rollout_images=4)
QUICK = DemoSize(mme_images=3, rollout_images=2)
# every weight method besides anchors (which has its own run, with the critical heads)
WEIGHT_METHODS = "kawhi,tor,vppo,entropy,sayo"


def write_demo_rollouts(folder: Path, ck: object, per_category: int, seed: int = DEMO_SEED) -> Path:
    """A JSONL rollout file of the model's own greedy answers to reasoning-style questions."""
    from vlmcredit.data.mme_synth import synth_items
    from vlmcredit.data.sample import Sample
    from vlmcredit.data.synth_dialogs import DIALOG_CATEGORIES, dialogs, named_shapes
    from vlmcredit.probes.generate import generate_responses

    folder.mkdir(parents=True, exist_ok=True)
    rows, samples = [], []
    for category in DIALOG_CATEGORIES:
        for k, item in enumerate(synth_items(category, per_category, seed + 1)):
            name = f"{category}-{item.name}"
            item.image.save(folder / name)
            question = dialogs(item, ("reason",))[k % 2]  # alternate Yes and No questions
            rid = f"{category}-{item.name.split('.')[0]}"
            rows.append({"id": rid, "images": [name], "prompt": question.question})
            rows[-1]["truth"] = question.truth
            # SAYO's target boxes: the shapes the question names, in image pixels
            rows[-1]["boxes"] = [list(sh.box) for sh in named_shapes(item, question.question)]
            samples.append(Sample([item.image], question.question, id=rid))
    tokenizer = ck.tokenizer  # type: ignore[attr-defined]
    for row, ids in zip(rows, generate_responses(ck, samples), strict=True):
        row["response"] = tokenizer.decode(ids)
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DEMO_MARKER = ".vlmcredit-demo"
# What a demo run writes inside --out; only these are replaced when the demo runs again.
DEMO_OUTPUTS = (
    "mme",
    "data",
    "runs",
    "export-verl",
    "export-trl",
    "report.html",
    "report-figures",
)


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


def run_demo(out: Path, echo: Callable[[str], None] = print, quick: bool = False) -> Path:
    """Run the whole path into `out` through the library; returns the report's path."""
    from transformers.utils import logging as hf_logging

    from vlmcredit.data.mme_synth import write_synthetic_mme
    from vlmcredit.data.synth_dialogs import DIALOG_CATEGORIES
    from vlmcredit.export.formats import export_run
    from vlmcredit.formats.heads import read_heads
    from vlmcredit.models.describe import describe_checkpoint
    from vlmcredit.models.loading import load_checkpoint
    from vlmcredit.pipelines.anchors import AnchorsRunConfig, run_anchors
    from vlmcredit.pipelines.compare import run_compare
    from vlmcredit.pipelines.probe_heads import ProbeHeadsConfig, run_probe_heads
    from vlmcredit.pipelines.weights import WeightsRunConfig, run_weights
    from vlmcredit.reports.report import build_report, default_png_dir, write_report
    from vlmcredit.reports.sections import ReportOptions

    size = QUICK if quick else FULL
    hf_logging.disable_progress_bar()  # weight-loading bars of a 5 MB model are noise
    prepare_out(out)
    echo(
        "vlmcredit demo: synthetic MME -> probe-heads -> rollouts -> anchors -> weights -> "
        "compare -> export -> report"
    )
    echo(f"on the built-in model {DEMO_CKPT}{' (--quick: fewer images)' if quick else ''}.\n")
    runs = out / "runs"

    echo("[1/9] the checkpoint")
    facts = describe_checkpoint(DEMO_CKPT)
    echo("      " + ", ".join(f"{k} {facts[k]}" for k in list(facts)[:6]))

    echo("\n[2/9] a synthetic MME set (rendered shapes, one Yes and one No question per image)")
    mme = out / "mme"
    counts = write_synthetic_mme(mme, size.mme_images, DEMO_SEED, DIALOG_CATEGORIES)
    echo(f"      {sum(counts.values())} images in {len(counts)} categories: {mme}")

    echo("\n[3/9] vision-critical heads: ablate each head index in every layer, score MME")
    heads = run_probe_heads(
        ProbeHeadsConfig(ckpt=DEMO_CKPT, mme=mme, out=runs / "heads", dtype="fp32")
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

    echo("\n[4/9] rollouts: the model's own greedy answers to reasoning-style questions")
    ck = load_checkpoint(DEMO_CKPT, dtype="fp32")
    data = write_demo_rollouts(out / "data", ck, size.rollout_images)
    del ck
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    right = sum(r["response"].rstrip(".").endswith(f"answer is {r['truth'].lower()}") for r in rows)
    echo(f"      {len(rows)} responses, {right} end in the right verdict: {data}")
    echo(f"      e.g. {rows[0]['prompt']!r} -> {rows[0]['response']!r}")

    echo("\n[5/9] anchor tokens: token-image graph + Leiden, ~15% of response tokens")
    if not report["critical"]:
        echo("      (no head passed the threshold: averaging every head)")
    heads_json = heads / "heads.json" if report["critical"] else None
    anchors = run_anchors(
        AnchorsRunConfig(
            out=runs / "anchors", ckpt=DEMO_CKPT, data=data, heads_json=heads_json, dtype="fp32"
        )
    )
    s = anchors.manifest["anchors"]
    echo(
        f"      {s['num_anchors']} anchors of {s['num_tokens']} response tokens "
        f"({100 * s['ratio_achieved']:.1f}%) in {s['num_samples']} samples: {anchors.path}"
    )

    echo(f"\n[6/9] the other credit signals: {WEIGHT_METHODS.replace(',', ', ')}")
    weights = run_weights(
        WeightsRunConfig(
            out=runs / "weights",
            ckpt=DEMO_CKPT,
            data=data,
            method=WEIGHT_METHODS,
            heads_json=heads_json,
            # KAWHI needs heads; without critical ones, the paper's all-heads ablation
            params={} if heads_json else {"kawhi.heads": "all"},
            dtype="fp32",
        )
    )
    echo(f"      one signals table per method: {weights.path}")

    echo("\n[7/9] do the methods pick the same tokens?")
    compared = run_compare([anchors.path, weights.path], runs / "compare")
    for pair in compared["pairs"]:
        if "anchors" in (pair["a"], pair["b"]):
            jac = pair.get("jaccard")
            echo(
                f"      {pair['a']} vs {pair['b']}: Jaccard "
                f"{'-' if jac is None else f'{jac:.2f}'} over {pair['tokens']} tokens"
            )
    echo(f"      all pairs: {runs / 'compare' / 'compare.json'}")

    echo("\n[8/9] export for the trainers")
    for fmt in ("verl", "trl"):
        result = export_run(anchors.path, fmt, out / f"export-{fmt}", heads / "heads.json")
        echo(f"      {fmt}: {result.out} ({', '.join(result.files)})")

    echo("\n[9/9] the report")
    page = out / "report.html"
    built = build_report([heads, anchors.path, weights.path, runs / "compare"], ReportOptions())
    write_report(built, page, default_png_dir(page))
    echo(f"      {len(built.sections)} sections, {len(built.figures)} figures")
    echo(f"\ndemo done. Open the report: {page}")
    return page
