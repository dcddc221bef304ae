"""Every command against bad input, as one table: exit 2, exactly one `error:` line on stderr
naming the input, no traceback, no output folder; for a few, the corrected command then runs.

Commands run in-process (CliRunner) on the smallest inputs; almost every case fails while
reading its input, before a model is loaded, which keeps the whole table to a few seconds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app

runner = CliRunner()
FAMILY = "qwen2.5-vl"
ROLLOUT_COMMANDS = ("capture", "anchors", "weights")


@dataclass(frozen=True)
class Inputs:
    root: Path
    ckpt: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def _rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(i: int, image: str = "a.png", response: str = "Dots here.") -> dict:
    return {"id": f"r{i}", "images": [image], "prompt": "Describe.", "response": response}


@pytest.fixture(scope="module")
def inputs(tiny_ckpt, tmp_path_factory) -> Inputs:
    """Every bad input once: files, images, rollouts, MME sets and checkpoints."""
    root = tmp_path_factory.mktemp("bad-inputs")
    ckpt = tiny_ckpt(FAMILY)
    noise_image(56, 84, 1).save(root / "a.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    Image.new("RGB", (1, 1)).save(root / "one.png")
    # a real 20,000 x 20,000 px PNG (1 bit per pixel: 48 kB on disk, 1.2 GB once RGB)
    Image.new("1", (20_000, 20_000)).save(root / "huge.png")
    (root / "empty.jsonl").write_text("")
    (root / "folder").mkdir()
    (root / "file.txt").write_text("user data")
    _rows(root / "good.jsonl", [_row(0), _row(1, response="Static noise.")])
    for name in ("corrupt", "one", "huge"):
        _rows(root / f"{name}.jsonl", [_row(0), _row(1, f"{name}.png")])
    (root / "malformed.jsonl").write_text(
        json.dumps(_row(0)) + "\n{not json\n" + json.dumps(_row(2)) + "\n"
    )
    pd.DataFrame([{"id": "r0", "images": ["a.png"], "prompt": "Describe."}]).to_parquet(
        root / "no-response.parquet"
    )
    pd.DataFrame([{"id": "r0", "prompt": "Describe.", "response": "x"}]).to_parquet(
        root / "no-images.parquet"
    )
    for name, text in (("empty-response", ""), ("blank-response", " \t "), ("nl-response", "\n\n")):
        _rows(root / f"{name}.jsonl", [_row(0), _row(1, response=text)])
    # a checkpoint of another VLM family, and one whose tokenizer outgrew the model's vocabulary
    shutil.copytree(ckpt, root / "llava")
    config = json.loads((root / "llava" / "config.json").read_text())
    (root / "llava" / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    shutil.copytree(ckpt, root / "other-tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "other-tokenizer")
    tok.add_tokens([f"<extra_{i}>" for i in range(200)])
    tok.save_pretrained(root / "other-tokenizer")
    # MME: a set, and the same set with one broken image each way
    from vlmcredit.data.mme_synth import write_synthetic_mme, write_synthetic_mme_parquet

    write_synthetic_mme(root / "mme", 1, 0, ["existence", "count"])
    write_synthetic_mme_parquet(root / "mme", root / "mme.parquet")
    for name in ("corrupt", "one", "huge"):
        shutil.copytree(root / "mme", root / f"mme-{name}")
        shutil.copy(root / f"{name}.png", root / f"mme-{name}" / "count" / "0000.png")
    pd.read_parquet(root / "mme.parquet").drop(columns=["answer"]).to_parquet(
        root / "mme-no-answer.parquet"
    )
    (root / "existence.txt").write_text("a.png\tIs it?\tYes\tYes\nbroken\na.png\tIs it?\tNo\tNo\n")
    (root / "empty-results").mkdir()
    (root / "empty-results" / "count.txt").write_text("")
    (root / "maybe").mkdir()
    (root / "maybe" / "existence.txt").write_text("a.png\tIs it?\tMaybe\tYes\n")
    # a real anchors run of the 3-layer, 4-head checkpoint, and heads.json files it lacks
    run = ["anchors", "--ckpt", str(ckpt), "--data", str(root / "good.jsonl"), "--quiet"]
    assert runner.invoke(app, [*run, "--out", str(root / "run")]).exit_code == 0
    (root / "head7.json").write_text(json.dumps({"critical_heads": [7]}))
    (root / "layer5.json").write_text(json.dumps({"critical": [{"layer": 5, "head": 0}]}))
    return Inputs(root, ckpt)


# (command, case, args, what the message must name); {x} is a path under the inputs folder,
# {ckpt} the tiny checkpoint, {out} the output path the case must leave absent.
ROLLOUT_CASES = [
    ("missing path", ["--data", "{nope.jsonl}"], "nope.jsonl"),
    ("empty file", ["--data", "{empty.jsonl}"], "empty.jsonl"),
    ("a PNG as --data", ["--data", "{a.png}"], "a.png"),
    ("a folder as --data", ["--data", "{folder}"], "folder: is a folder"),
    ("corrupt image", ["--data", "{corrupt.jsonl}"], "corrupt.png"),
    ("1x1 image", ["--data", "{one.jsonl}"], "one.png"),
    ("20000x20000 image", ["--data", "{huge.jsonl}"], "huge.png"),
    ("malformed JSONL line in the middle", ["--data", "{malformed.jsonl}"], "row 1 (line 2)"),
    ("parquet missing a column", ["--data", "{no-response.parquet}"], "no-response.parquet"),
    ("empty response", ["--data", "{empty-response.jsonl}"], "empty-response.jsonl: row 1"),
    ("whitespace response", ["--data", "{blank-response.jsonl}"], "blank-response.jsonl: row 1"),
    ("newlines-only response", ["--data", "{nl-response.jsonl}"], "nl-response.jsonl: row 1"),
    ("unknown layer", ["--data", "{good.jsonl}", "--layers", "99"], "--layers"),
    ("unknown head", ["--data", "{good.jsonl}", "--heads", "99"], "--heads"),
    ("non-Qwen VLM config", ["--data", "{good.jsonl}", "--ckpt", "{llava}"], "llava"),
    (
        "mismatched tokenizer",
        ["--data", "{good.jsonl}", "--ckpt", "{other-tokenizer}"],
        "tokenizer",
    ),
]
MME_CASES = [
    ("missing path", ["--mme", "{nope}"], "nope"),
    ("empty file", ["--mme", "{empty.jsonl}"], "empty.jsonl"),
    ("a PNG as --mme", ["--mme", "{a.png}"], "a.png"),
    ("corrupt image", ["--mme", "{mme-corrupt}"], "0000.png"),
    ("1x1 image", ["--mme", "{mme-one}"], "0000.png"),
    ("20000x20000 image", ["--mme", "{mme-huge}"], "0000.png"),
    ("parquet missing a column", ["--mme", "{mme-no-answer.parquet}"], "answer"),
    ("unknown head", ["--mme", "{mme}", "--heads", "99"], "--heads"),
    ("unknown layer", ["--mme", "{mme}", "--mode", "layer-head", "--layers", "99"], "--layers"),
    ("share outside (0, 1]", ["--mme", "{mme}", "--relative-share", "1.5"], "--relative-share"),
    ("non-Qwen VLM config", ["--mme", "{mme}", "--ckpt", "{llava}"], "llava"),
    ("mismatched tokenizer", ["--mme", "{mme}", "--ckpt", "{other-tokenizer}"], "tokenizer"),
]
CASES = [
    *[(cmd, case, args, named) for cmd in ROLLOUT_COMMANDS for case, args, named in ROLLOUT_CASES],
    ("anchors", "ratio above 1", ["--data", "{good.jsonl}", "--ratio", "1.5"], "--ratio"),
    ("anchors", "ratio 0", ["--data", "{good.jsonl}", "--ratio", "0"], "--ratio"),
    ("weights", "ratio above 1", ["--data", "{good.jsonl}", "-p", "ratio=1.5"], "ratio"),
    (
        "anchors",
        "--heads-json naming head 7 of a 4-head model",
        ["--data", "{good.jsonl}", "--heads-json", "{head7.json}"],
        "head 7 does not exist in a model with 4 heads",
    ),
    (
        "weights",
        "--heads-json naming layer 5 of a 3-layer model",
        ["--data", "{good.jsonl}", "--heads-json", "{layer5.json}"],
        "layer 5 does not exist in a model with 3 layers",
    ),
    *[("probe-heads", case, args, named) for case, args, named in MME_CASES],
    ("regions", "missing path", ["--data", "{nope.jsonl}"], "nope.jsonl"),
    ("regions", "a PNG as --data", ["--data", "{a.png}"], "a.png"),
    ("regions", "corrupt image", ["--data", "{corrupt.jsonl}"], "corrupt.png"),
    ("regions", "1x1 image", ["--data", "{one.jsonl}"], "one.png"),
    ("regions", "20000x20000 image", ["--data", "{huge.jsonl}"], "huge.png"),
    ("regions", "malformed JSONL line", ["--data", "{malformed.jsonl}"], "row 1 (line 2)"),
    ("regions", "parquet missing a column", ["--data", "{no-images.parquet}"], "images"),
    ("regions", "non-Qwen VLM config", ["--data", "{good.jsonl}", "--ckpt", "{llava}"], "llava"),
]
# commands without a checkpoint: (command, case, full argv, what the message must name)
PLAIN_CASES = [
    *[
        (cmd, case, [cmd, path, *rest], named)
        for cmd, rest in (("export", ["--out", "{out}"]), ("report", ["--out", "{out}"]))
        for case, path, named in (
            ("missing path", "{nope}", "nope"),
            ("empty file", "{empty.jsonl}", "empty.jsonl"),
            ("a PNG as the run", "{a.png}", "a.png"),
            ("an empty folder as the run", "{folder}", "folder"),
        )
    ],
    (
        "export",
        "--heads naming head 7 of a 4-head model",
        ["export", "{run}", "--out", "{out}", "--heads", "{head7.json}"],
        "head 7 does not exist in a model with 4 heads",
    ),
    (
        "export",
        "--heads naming layer 5 of a 3-layer model",
        ["export", "{run}", "--out", "{out}", "--heads", "{layer5.json}"],
        "layer 5 does not exist in a model with 3 layers",
    ),
    (
        "report",
        "--out a file it did not write",
        ["report", "{run}", "--out", "{file.txt}"],
        "file.txt: exists and is not a vlmcredit report",
    ),
    ("compare", "missing path", ["compare", "{nope}", "{nope}", "--out", "{out}"], "nope"),
    ("compare", "a PNG", ["compare", "{a.png}", "{a.png}", "--out", "{out}"], "a.png"),
    ("mme-score", "missing path", ["mme-score", "{nope}"], "nope"),
    ("mme-score", "empty file", ["mme-score", "{empty.jsonl}"], "empty.jsonl"),
    ("mme-score", "a PNG", ["mme-score", "{a.png}"], "a.png"),
    ("mme-score", "malformed line in the middle", ["mme-score", "{existence.txt}"], "txt:2:"),
    (
        "mme-score",
        "empty results file",
        ["mme-score", "{empty-results/count.txt}"],
        "count.txt: holds no predictions",
    ),
    (
        "mme-score",
        "ground truth Maybe",
        ["mme-score", "{maybe/existence.txt}"],
        "existence.txt:1: ground truth (third field) is 'Maybe'",
    ),
    ("mme-synth", "--out a file", ["mme-synth", "--out", "{file.txt}"], "file.txt"),
    (
        "mme-synth",
        "--parquet a folder",
        ["mme-synth", "--out", "{out}", "--parquet", "{folder}"],
        "--parquet",
    ),
    (
        "mme-synth",
        "--parquet an existing file",
        ["mme-synth", "--out", "{out}", "--parquet", "{file.txt}"],
        "--parquet",
    ),
    ("mme-synth", "unknown category", ["mme-synth", "--out", "{out}", "--categories", "x"], "'x'"),
    ("info", "missing path", ["info", "--ckpt", "{nope}"], "nope"),
    ("info", "a file", ["info", "--ckpt", "{empty.jsonl}"], "empty.jsonl"),
    ("info", "non-Qwen VLM config", ["info", "--ckpt", "{llava}"], "llava"),
    ("info", "mismatched tokenizer", ["info", "--ckpt", "{other-tokenizer}"], "tokenizer has"),
    ("make-tiny", "unknown family", ["make-tiny", "--family", "x", "--out", "{out}"], "--family"),
    ("make-tiny", "--out a file", ["make-tiny", "--family", FAMILY, "--out", "{file.txt}"], "file"),
    ("demo", "--out a file", ["demo", "--out", "{file.txt}"], "file.txt"),
]


def _fill(args: list[str], inputs: Inputs, out: Path) -> list[str]:
    def one(arg: str) -> str:
        if arg == "{out}":
            return str(out)
        if arg.startswith("{") and arg.endswith("}"):
            return str(inputs / arg[1:-1])
        return arg

    return [one(a) for a in args]


def assert_one_line_error(result, named: str, out: Path | None) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert named in lines[0], (named, lines[0])
    if out is not None:
        assert not out.exists(), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize(
    ("command", "case", "args", "named"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES]
)
def test_bad_input_is_one_line(command, case, args, named, inputs, tmp_path) -> None:
    out = tmp_path / "out"
    argv = [command, "--ckpt", str(inputs.ckpt), "--out", str(out), "--quiet"]
    result = runner.invoke(app, argv + _fill(args, inputs, out))  # a later --ckpt wins
    assert_one_line_error(result, named, out)


@pytest.mark.parametrize(
    ("command", "case", "args", "named"),
    PLAIN_CASES,
    ids=[f"{c[0]}: {c[1]}" for c in PLAIN_CASES],
)
def test_bad_input_is_one_line_without_a_model(command, case, args, named, inputs, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, _fill(args, inputs, out))
    assert_one_line_error(result, named, out)
    assert (inputs / "file.txt").read_text() == "user data"


@pytest.mark.parametrize(
    ("command", "bad", "fixed", "recorded"),
    [
        ("capture", ["--data", "{blank-response.jsonl}"], ["--data", "{good.jsonl}"], None),
        ("weights", ["--data", "{good.jsonl}", "--heads", "99"], ["--data", "{good.jsonl}"], None),
        (
            "anchors",
            ["--data", "{huge.jsonl}"],
            ["--data", "{huge.jsonl}", "--skip-bad"],
            "decompression-bomb guard",
        ),
        (
            "anchors",
            ["--data", "{empty-response.jsonl}"],
            ["--data", "{empty-response.jsonl}", "--skip-bad"],
            "'response' is empty",
        ),
    ],
)
def test_the_corrected_command_then_runs(command, bad, fixed, recorded, inputs, tmp_path):
    out = tmp_path / "out"
    argv = [command, "--ckpt", str(inputs.ckpt), "--out", str(out), "--quiet"]
    first = runner.invoke(app, argv + _fill(bad, inputs, out))
    assert first.exit_code == 2 and not out.exists()
    second = runner.invoke(app, argv + _fill(fixed, inputs, out))
    assert second.exit_code == 0, second.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    if recorded:  # the refused row is recorded, not silently dropped
        rows = pd.read_parquet(out / "samples.parquet")
        bad_rows = rows[rows["status"] == "bad"]
        assert len(bad_rows) == 1 and recorded in bad_rows["error"].iloc[0]
