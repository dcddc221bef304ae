"""Run folders for the report tests, made once per session by the real commands.

`vlmcredit mme-synth` -> the tiny yes/no checkpoint (`probes/tiny_answerer.py`) -> `probe-heads`
in both modes -> `anchors` on small rollouts (one sample with two images) -> `capture` and
`anchors --from` in threshold mode with the rollouts gone (so no thumbnails) -> `anchors` on
rollouts with hostile ids and text, written to a hostile folder name. Everything the report
tests check is read back from these outputs through `vlmcredit.formats`, never planted.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import noise_image

FAMILY = "qwen2.5-vl"
HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = '"><img src=x onerror=alert(1)>'
HOSTILE_ID = f"x{HOSTILE_IMG}"
HOSTILE_TEXT = "".join([" Look", HOSTILE_SCRIPT, " and", HOSTILE_IMG, "\x00\n", " $5 &amp;"] * 6)
WORDS = [
    "the",
    "red",
    "square",
    "sits",
    "on",
    "the",
    "left",
    ",",
    "a",
    "blue",
    "circle",
    "on",
    "the",
    "right",
    ";",
    "two",
    "people",
    "stand",
    "near",
    "a",
    "tree",
    "and",
    "the",
    "sky",
    "is",
    "blue",
    ",",
    "so",
    "the",
    "answer",
    "is",
    "yes",
    "because",
    "the",
    "sign",
    "says",
    "3",
    ".",
]
LONG_WORDS = 1500  # about 2,000 tokens of the tiny tokenizer


@dataclass(frozen=True)
class ReportRuns:
    heads: Path  # probe-heads, head-index mode
    layer_head: Path  # probe-heads, layer-head mode, layer 1 only (the grid shows all 3)
    anchors: Path  # anchors (bipartite, --heads-json heads), 3 samples, thumbnails, signals
    threshold: Path  # anchors --from capture --mode threshold: 2 long samples, no thumbnails
    capture: Path  # a capture run: nothing the report draws
    hostile: Path  # anchors on hostile sample ids and text, in a hostile folder name


def vlmcredit(*args: str) -> None:
    """One command through the CLI, with sys.argv as the console script would have it."""
    from vlmcredit.cli.main import app

    argv = sys.argv
    sys.argv = ["vlmcredit", *args]
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        sys.argv = argv
    assert result.exit_code == 0, (args, result.output)


def _rollouts(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _text(n: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


def _critical_split(run: Path) -> float | None:
    """A threshold between the lowest and highest measured drop, or None when all are equal."""
    drops = sorted(
        {h["drop"]["total"] for h in json.loads((run / "heads.json").read_text())["heads"]}
    )
    return None if len(drops) < 2 else (drops[0] + drops[1]) / 2


def _probe_heads(ckpt: Path, mme: Path, out: Path, *extra: str) -> None:
    args = ["probe-heads", "--ckpt", str(ckpt), "--mme", str(mme), "--out", str(out)]
    vlmcredit(*args, "--dtype", "fp32", "--quiet", *extra)
    # Re-select on the measured drops (a documented resume: nothing is recomputed) so that
    # some heads are critical and some are not.
    threshold = _critical_split(out)
    if threshold is not None:
        vlmcredit(
            *args, "--dtype", "fp32", "--quiet", *extra, "--threshold", str(threshold), "--resume"
        )


def _row(sample_id: str, images: list[str], response: str) -> dict:
    return {"id": sample_id, "images": images, "prompt": "Describe.", "response": response}


@pytest.fixture(scope="session")
def report_runs(tiny_ckpt, tmp_path_factory) -> ReportRuns:
    from vlmcredit.probes.tiny_answerer import yes_no_checkpoint

    root = tmp_path_factory.mktemp("report-runs")
    mme = root / "mme"
    vlmcredit("mme-synth", "--out", str(mme), "--images-per-category", "1", "--seed", "0")
    ckpt = yes_no_checkpoint(tiny_ckpt(FAMILY), root / "answerer", mme)
    _probe_heads(ckpt, mme, root / "heads")
    _probe_heads(ckpt, mme, root / "heads-lh", "--mode", "layer-head", "--layers", "1")
    ck = ["--ckpt", str(ckpt), "--dtype", "fp32", "--quiet"]

    images = root / "images"
    images.mkdir()
    noise_image(112, 140, 3).save(images / "a.png")
    noise_image(84, 168, 4).save(images / "b.png")
    rows = [
        _row("s0", ["a.png", "b.png"], _text(60, 0)),
        _row("s1", ["b.png"], _text(45, 1)),
        _row("s2", ["a.png"], _text(50, 2)),
    ]
    anchors = root / "anchors"
    heads = ["--heads-json", str(root / "heads")]
    vlmcredit("anchors", *ck, "--data", str(_rollouts(images, rows)), "--out", str(anchors), *heads)

    # Threshold mode from a capture run whose rollouts are gone: no thumbnails to store.
    gone = root / "gone"
    gone.mkdir()
    shutil.copy(images / "a.png", gone / "a.png")
    rows = [_row(f"long{i}", ["a.png"], _text(LONG_WORDS, i)) for i in range(2)]
    capture = root / "capture"
    vlmcredit(
        "capture", *ck, "--data", str(_rollouts(gone, rows)), "--out", str(capture), "--no-qk"
    )
    shutil.rmtree(gone)
    threshold = root / "anchors-thr"
    vlmcredit("anchors", "--from", str(capture), "--out", str(threshold), "--mode", "threshold")

    rows = [
        _row("s0", [str(images / "a.png")], HOSTILE_TEXT),
        _row(HOSTILE_ID, [str(images / "b.png")], HOSTILE_TEXT),
    ]
    hostile = root / HOSTILE_IMG
    vlmcredit(
        "anchors", *ck, "--data", str(_rollouts(root / "hostile-data", rows)), "--out", str(hostile)
    )
    return ReportRuns(root / "heads", root / "heads-lh", anchors, threshold, capture, hostile)
