"""`train-tiny`: the built-in model's training run, on a few steps (the real run is 6000)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from vlmcredit.cli.main import app
from vlmcredit.data.mme_synth import NUMBER_WORDS, render_item
from vlmcredit.data.synth_dialogs import REASON_SUFFIX, dialogs, grounded_statement
from vlmcredit.errors import VlmCreditError
from vlmcredit.pipelines import train_tiny as tt


def test_vectorised_pixels_equal_the_image_processor() -> None:
    _, _, processor = tt.build_parts(0)
    pixels = tt.Pixels(processor)
    images = [it.image for it, _ in tt.step_dialogs(tt.TrainConfig(batch_size=5), 3)]
    pixels.check(images)  # raises on any difference
    values, grid = pixels(images)
    assert grid.tolist() == [[1, 10, 12]] * 5  # 336x280 -> 168x140: 6x5 merged cells
    ref = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(values, ref, atol=1e-5)


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    cfg = tt.TrainConfig(batch_size=6)
    a, b = tt.step_dialogs(cfg, 11), tt.step_dialogs(cfg, 11)
    assert [d for _, d in a] == [d for _, d in b]
    assert [d for _, d in a] != [d for _, d in tt.step_dialogs(cfg, 12)]
    other_seed = tt.step_dialogs(tt.TrainConfig(batch_size=6, seed=1), 11)
    assert [d for _, d in a] != [d for _, d in other_seed]


def test_grounded_answers_say_what_was_drawn() -> None:
    rng = random.Random(5)
    for _ in range(40):
        item = render_item("position", rng, "x.png")
        a, b = item.shapes
        for d in dialogs(item, ("reason",)):
            assert d.question.endswith(REASON_SUFFIX)
            assert d.answer.endswith(f"So the answer is {d.truth.lower()}.")
            sentence = grounded_statement(item, d.question)
            horizontal = abs(a.cx - b.cx) >= abs(a.cy - b.cy)
            if horizontal:
                side = "left" if a.cx < b.cx else "right"
                assert sentence.startswith(f"The {a.color} {a.kind} is on the {side}")
            else:
                side = "top" if a.cy < b.cy else "bottom"
                assert sentence.startswith(f"The {a.color} {a.kind} is at the {side}")
    for _ in range(20):
        item = render_item("count", rng, "x.png")
        for d in dialogs(item, ("reason",)):
            kind = next(k for k in ("circle", "square", "triangle") if k in d.question)
            n = sum(s.kind == kind for s in item.shapes)
            said = f"There is one {kind}." if n == 1 else f"There are {NUMBER_WORDS[n]} {kind}s."
            assert d.answer.startswith(said + "\n\nSo the answer is ")


def test_a_killed_run_resumes_where_it_stopped(tmp_path) -> None:
    """Two steps, killed, then resumed to four, equals four uninterrupted steps."""
    cfg = dict(steps=4, batch_size=2, eval_every=4, eval_images=1, save_every=2, keep=(0.5,))
    straight = tt.train_tiny(tmp_path / "a", tt.TrainConfig(**cfg), echo=lambda _m: None)

    class Killed(Exception):
        pass

    original = tt.save_resume

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Killed

    tt.save_resume = save_then_die
    try:
        with pytest.raises(Killed):
            tt.train_tiny(tmp_path / "b", tt.TrainConfig(**cfg), echo=lambda _m: None)
    finally:
        tt.save_resume = original
    assert (tmp_path / "b" / "resume" / "step.json").is_file()
    resumed = tt.train_tiny(tmp_path / "b", tt.TrainConfig(**cfg), echo=lambda _m: None)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(p / "model.safetensors")) for p in (straight, resumed))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    log = [json.loads(x) for x in (tmp_path / "b" / "train-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert (tmp_path / "b" / "step-000000" / "config.json").is_file()  # the untrained weights
    assert (tmp_path / "b" / "step-000002" / "model.safetensors").is_file()
    assert not (tmp_path / "b" / "resume").exists()


def test_other_settings_do_not_reuse_a_run_folder(tmp_path) -> None:
    cfg = tt.TrainConfig(steps=1, batch_size=1, eval_every=1, eval_images=1, keep=())
    tt.train_tiny(tmp_path, cfg, echo=lambda _m: None)
    with pytest.raises(VlmCreditError, match="other settings"):
        tt.train_tiny(tmp_path, tt.TrainConfig(steps=2, batch_size=1), echo=lambda _m: None)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["train-tiny", "--out", str(stranger), "--steps", "1"])
    assert result.exit_code != 0 and "not a train-tiny run" in result.output
    assert (stranger / "notes.txt").read_text() == "mine"


def test_descriptions_list_every_shape_left_to_right_with_its_quadrant() -> None:
    from vlmcredit.data.mme_synth import IMAGE_SIZE
    from vlmcredit.data.synth_dialogs import DESCRIBE_PROMPT, description

    rng = random.Random(9)
    for category in ("existence", "count", "color", "position"):
        item = render_item(category, rng, "x.png")
        text = description(item)
        (d,) = dialogs(item, ("describe",))
        assert (d.question, d.answer, d.style) == (DESCRIBE_PROMPT, text, "describe")
        w, h = IMAGE_SIZE
        last = -1
        for s in sorted(item.shapes, key=lambda s: (s.cx, s.cy)):
            where = f"{'top' if s.cy < h / 2 else 'bottom'} {'left' if s.cx < w / 2 else 'right'}"
            article = "an" if s.color[0] in "aeiou" else "a"
            phrase = f"{article} {s.color} {s.kind} at the {where}"
            at = text.find(phrase, last + 1)
            assert at > last, (phrase, text)
            last = at
        n = len(item.shapes)
        assert text.startswith("There is one shape" if n == 1 else f"There are {NUMBER_WORDS[n]}")
