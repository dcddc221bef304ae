"""`train-tiny`: the built-in model's training run, on a few steps (the real run is 6000)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from vlmcredit.cli.main import app
from vlmcredit.data.mme_synth import NUMBER_WORDS, render_item
from vlmcredit.data.synth_dialogs import (
    COLORS,
    DIALOG_CATEGORIES,
    LOOKUP_SUFFIX,
    PRESENCE,
    REASON_SUFFIX,
    SHAPES,
    dialogs,
    grounded_statement,
    lookup_fact,
    named_shapes,
    render_presence,
)
from vlmcredit.errors import VlmCreditError
from vlmcredit.pipelines import train_tiny as tt


def test_vectorised_pixels_equal_the_image_processor() -> None:
    _, _, processor = tt.build_parts(0)
    pixels = tt.Pixels(processor)
    images = [it.image for it, _ in tt.step_dialogs(tt.TrainConfig(batch_size=5), 3)]
    pixels.check(images)  # raises on any difference
    values, grid = pixels(images)
    assert grid.tolist() == [[1, 10, 12]] * 5  # 336x280 -> 168x140: 6x5 merged cells
    _, _, processor80 = tt.build_parts(0, image_max_tokens=80)
    assert tt.Pixels(processor80)(images[:1])[1].tolist() == [[1, 16, 18]]  # 252x224: 9 x 8 cells
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


def test_lookup_answers_start_with_the_fact_that_decides_the_verdict() -> None:
    """The fact is recomputed here from the drawn shapes and the question's own words, and the
    verdict must follow from it by the question's rule. Without copyable facts, colour and count
    ask only the No question, so the fact is never a word of the question; position and existence
    keep both, where neither copying nor negating a question word gives the fact."""
    rng = random.Random(9)
    seen = set()
    for category in ("existence", "count", "color", "position"):
        for _ in range(30):
            item = render_item(category, rng, "x.png")
            both = dialogs(item, ("lookup",))
            assert [d.truth for d in both] == ["Yes", "No"]
            for d in dialogs(item, ("lookup",), lookup_copyable=False):
                assert d.question.endswith(LOOKUP_SUFFIX)
                fact, _, verdict = d.answer.partition(", so ")
                assert verdict == f"{d.truth.lower()}.", d.answer
                words = d.question.removesuffix(LOOKUP_SUFFIX).rstrip("?").split()
                if category in ("color", "count"):
                    assert d.truth == "No" and fact not in words
                if category in ("existence", "count"):
                    kind = next(k for k in SHAPES if k in words or k + "s" in words)
                    n = sum(s.kind == kind for s in item.shapes)
                    assert fact == NUMBER_WORDS[n]
                    if category == "existence":
                        assert (fact != "zero") == (d.truth == "Yes")
                    else:
                        assert (fact in words) == (d.truth == "Yes")
                elif category == "color":
                    kind = next(k for k in SHAPES if k in words)
                    (shape,) = [s for s in item.shapes if s.kind == kind]
                    assert fact == shape.color
                    asked = next(c for c in COLORS if c in words)
                    assert (fact == asked) == (d.truth == "Yes")
                else:
                    a, b = (
                        next(s for s in item.shapes if f"{s.color} {s.kind}" == " ".join(pair))
                        for pair in ((words[2], words[3]), (words[-2], words[-1]))
                    )
                    if "left" in words or "right" in words:
                        assert fact == ("left" if a.cx < b.cx else "right")
                    else:
                        assert fact == ("above" if a.cy < b.cy else "below")
                    assert (fact in words) == (d.truth == "Yes")
                seen.add((category, d.truth))
    assert seen == {(c, t) for c in DIALOG_CATEGORIES for t in ("Yes", "No")} - {
        ("color", "Yes"),
        ("count", "Yes"),
    }


def test_colour_presence_questions_ask_for_a_drawn_and_an_undrawn_colour() -> None:
    """Counted from the drawn shapes: the Yes question names a colour that is drawn, the No one a
    colour that is not, and every answer style says so (the lookup fact is the number of shapes
    of that colour)."""
    rng = random.Random(3)
    kinds_seen = set()
    for _ in range(60):
        item = render_presence(rng, "x.png")
        assert item.category == PRESENCE and 1 <= len(item.shapes) <= 3
        drawn = {s.color for s in item.shapes}
        for question, truth in item.questions:
            (asked,) = [c for c in COLORS if f" {c} shape " in question]
            assert (asked in drawn) == (truth == "Yes")
            n = sum(s.color == asked for s in item.shapes)
            assert lookup_fact(item, question) == NUMBER_WORDS[n]
            named = named_shapes(item, question)
            assert named == ([s for s in item.shapes if s.color == asked] or list(item.shapes))
        for d in dialogs(item, ("reason", "lookup"), lookup_copyable=False):
            said = grounded_statement(item, d.question)
            if d.style == "reason":
                assert said.startswith("There is " if d.truth == "Yes" else "There is no ")
            assert d.answer.endswith(f"{d.truth.lower()}.")
            kinds_seen.add((d.style, d.truth))
    assert kinds_seen == {(s, t) for s in ("reason", "lookup") for t in ("Yes", "No")}
    cfg = tt.TrainConfig(batch_size=8, category_weights={PRESENCE: 1.0}, paired_questions=True)
    batch = tt.step_dialogs(cfg, 0)
    assert {it.category for it, _ in batch} == {PRESENCE} and len(batch) == 8


def test_the_vision_tower_gets_its_own_learning_rate_scale() -> None:
    _, model, _ = tt.build_parts(0)
    opt = tt.make_optimizer(model, tt.TrainConfig(vision_lr_scale=4.0, weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            seen.add(n)
            assert group["lr_scale"] == (4.0 if ".visual." in f".{n}" else 1.0), n
            decayed = p.ndim >= 2 and "embed" not in n
            assert group["weight_decay"] == (0.05 if decayed else 0.0), n
    assert seen == set(names.values())  # every parameter in exactly one group
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0, 4.0}


def test_a_wider_language_model_keeps_eight_heads_and_its_rotary_settings() -> None:
    _, model, _ = tt.build_parts(0, mrope_section=(1, 2, 9), hidden_size=192, rope_theta=1e5)
    text = model.config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.intermediate_size) == (192, 8, 576)
    assert text.rope_parameters["rope_theta"] == 1e5
    assert model.config.vision_config.out_hidden_size == 192
    layer = model.model.language_model.layers[0].self_attn
    assert layer.head_dim == 24 and layer.q_proj.out_features == 192
    tt.TrainConfig(hidden_size=192, mrope_section=(1, 2, 9)).check()
    for settings, message in (
        ({"hidden_size": 100}, "multiple of 16"),
        ({"hidden_size": 192}, "summing to 12"),  # the default sections sum to 8
        ({"rope_theta": 1.0}, "rope_theta"),
        ({"vision_hidden_size": 40}, "vision_hidden_size"),
    ):
        with pytest.raises(VlmCreditError, match=message):
            tt.TrainConfig(**settings).check()


def test_a_wider_vision_tower_feeds_the_same_language_model() -> None:
    _, model, processor = tt.build_parts(0, 80, (1, 1, 6), vision_hidden_size=128)
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_heads) == (128, 256, 4)
    assert vision.out_hidden_size == model.config.text_config.hidden_size == 128
    pixels = tt.Pixels(processor)
    values, grid = pixels([tt.step_dialogs(tt.TrainConfig(batch_size=1), 0)[0][0].image])
    with torch.no_grad():
        out = model.model.visual(values, grid_thw=grid)
    embeds = out.pooler_output if hasattr(out, "pooler_output") else out
    assert embeds.shape == (int(grid.prod()) // 4, 128)  # one 128-wide embedding per merged cell


@pytest.mark.parametrize(
    ("cell_loss", "cell_clip", "relations"),
    [(0.0, "joint", 0.0), (1.0, "joint", 0.0), (1.0, "separate", 1.0)],
)
def test_a_killed_run_resumes_where_it_stopped(tmp_path, cell_loss, cell_clip, relations) -> None:
    """Killed after step 4 with the resume state of step 2, then resumed to six: equals six
    uninterrupted steps, and the log holds each step once (steps 3-4 are redone, not repeated).
    With the cell supervision on, its head and moments resume too, and the checkpoint holds the
    plain model only."""
    cfg = dict(steps=6, batch_size=2, eval_every=6, eval_images=1, save_every=2, keep=(1 / 3,))
    cfg.update(cell_loss=cell_loss, cell_clip=cell_clip, cell_relations=relations)
    straight = tt.train_tiny(tmp_path / "a", tt.TrainConfig(**cfg), echo=lambda _m: None)

    class Killed(Exception):
        pass

    original = tt.save_resume
    calls = []

    def save_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the kill lands between two saves
            raise Killed
        original(*args, **kwargs)

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
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(("cell_loss" in r) == bool(cell_loss) for r in log)
    assert all(("cell_grad_norm" in r) == (cell_clip == "separate") for r in log)
    assert all(("cell_relation_loss" in r) == bool(relations) for r in log)
    untrained = load_file(str(tmp_path / "b" / "step-000000" / "model.safetensors"))
    assert wa.keys() == untrained.keys()  # the plain model: no cell head in a checkpoint
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


def test_the_curriculum_starts_with_single_shape_descriptions() -> None:
    from vlmcredit.data.mme_synth import COLORS, SHAPES
    from vlmcredit.data.synth_dialogs import DESCRIBE_PROMPT

    cfg = tt.TrainConfig(steps=8, batch_size=6, single_shape_share=0.25)
    assert cfg.single_shape_steps == 2
    for step in (0, 1):
        batch = tt.step_dialogs(cfg, step)
        for item, d in batch:
            (shape,) = item.shapes
            assert shape.kind in SHAPES and shape.color in COLORS and item.questions == ()
            article = "an" if shape.color[0] in "aeiou" else "a"
            assert (d.question, d.style) == (DESCRIBE_PROMPT, "describe")
            assert d.answer.startswith(f"There is one shape: {article} {shape.color} {shape.kind}")
            # the image shows exactly that shape: its centre pixel has the shape's colour
            assert item.image.getpixel((shape.cx, shape.cy)) == COLORS[shape.color]
        assert tt.step_dialogs(cfg, step) == batch  # a pure function of (seed, step)
    mixed = tt.step_dialogs(cfg, 2)
    assert any(d.style != "describe" for _, d in mixed)
    assert all(item.questions for item, _ in mixed)
    with pytest.raises(VlmCreditError, match="single_shape_share"):
        tt.TrainConfig(single_shape_share=1.0).check()


def test_single_shape_questions_are_answered_by_what_was_drawn() -> None:
    """The curriculum's yes/no questions: MME's existence and colour wording, the truth read
    from the drawn shape, both answers and both categories present; the descriptions stay."""
    from vlmcredit.data.mme_synth import COLORS, SUFFIX

    cfg = tt.TrainConfig(
        steps=40, batch_size=16, single_shape_share=0.5, single_shape_questions=0.5
    )
    seen = {"describe": 0, "existence": 0, "color": 0, "Yes": 0, "No": 0}
    for step in range(4):
        for item, d in tt.step_dialogs(cfg, step):
            (shape,) = item.shapes
            assert item.image.getpixel((shape.cx, shape.cy)) == COLORS[shape.color]
            if d.style == "describe":
                seen["describe"] += 1
                continue
            assert d.style == "mme" and d.question.endswith(SUFFIX) and d.answer == d.truth
            seen[d.category] += 1
            seen[d.truth] += 1
            asked = d.question.removesuffix(SUFFIX)
            if d.category == "existence":
                kind = asked.removeprefix("Is there a ").removesuffix(" in this image?")
                assert (kind == shape.kind) == (d.truth == "Yes"), (asked, shape)
            else:
                assert asked.startswith(f"Is the {shape.kind} in this image ")
                color = asked.rsplit(" ", 1)[1].rstrip("?")
                assert color in COLORS and (color == shape.color) == (d.truth == "Yes")
    assert min(seen.values()) >= 8, seen  # 64 dialogs: every kind of row, both answers
    # the default keeps the curriculum descriptions only (the shipped recipe's batches)
    plain = tt.TrainConfig(steps=40, batch_size=16, single_shape_share=0.5)
    assert all(d.style == "describe" for _, d in tt.step_dialogs(plain, 0))


def test_paired_questions_put_both_answers_of_an_image_in_one_batch() -> None:
    cfg = tt.TrainConfig(steps=20, batch_size=15, paired_questions=True)
    for step in (3, 11):
        batch = tt.step_dialogs(cfg, step)
        assert len(batch) == 15 and tt.step_dialogs(cfg, step) == batch
        by_image: dict[str, list] = {}
        for item, d in batch:
            by_image.setdefault(item.name, []).append(d)
        for name, rows in by_image.items():
            if rows[0].style == "describe":
                assert len(rows) == 1, name
                continue
            assert {d.style for d in rows} == {rows[0].style}
            if len(rows) == 2:  # the last image may be cut to keep the batch size
                assert sorted(d.truth for d in rows) == ["No", "Yes"], rows
        assert sum(len(v) == 2 for v in by_image.values()) >= 4
    # unpaired: one question per image, as the shipped recipe's batches
    single = tt.step_dialogs(tt.TrainConfig(steps=20, batch_size=15), 3)
    assert len({item.name for item, _ in single}) == 15


def test_mrope_sections_decide_whether_an_image_axis_gets_a_fast_rotary_pair() -> None:
    """8 rotary pairs in Qwen's t/h/w section order: [2, 3, 3] leaves the column axis only
    rotations below 0.004 rad per cell; (1, 1, 6) gives both axes >= 0.1 rad per cell."""

    def fastest(mrope_section: tuple[int, int, int]) -> tuple[float, float]:
        _, model, _ = tt.build_parts(0, mrope_section=mrope_section)
        rope = model.config.text_config.rope_parameters
        sections = rope["mrope_section"]
        assert sections == list(mrope_section)
        pairs = sum(sections)
        freq = [rope["rope_theta"] ** (-i / pairs) for i in range(pairs)]
        return freq[sections[0]], freq[sections[0] + sections[1]]  # first h pair, first w pair

    h, w = fastest((2, 3, 3))
    assert h >= 0.1 and w < 0.004, (h, w)
    h, w = fastest((1, 1, 6))
    assert h >= 0.1 and w >= 0.1, (h, w)
    with pytest.raises(VlmCreditError, match="mrope_section"):
        tt.TrainConfig(mrope_section=(2, 2, 2)).check()


def test_train_tiny_cli_options_reach_the_run_config(tmp_path) -> None:
    args = ["train-tiny", "--out", str(tmp_path / "a"), "--steps", "2", "--batch-size", "2"]
    args += ["--image-max-tokens", "80", "--single-shape-share", "0.5"]
    args += ["--per-dialog-loss", "--single-shape-questions", "0.5"]
    args += ["--style-weights", "describe=0.2,mme=0.6,lookup=0.2"]
    args += ["--category-weights", "color=2,count=1", "--hidden-size", "64", "--rope-theta", "1e5"]
    args += ["--mrope-section", "1,1,2", "--lookup-no-copy", "--vision-lr-scale", "3"]
    args += ["--vision-hidden-size", "32", "--cell-loss", "0.5", "--cell-clip", "separate"]
    args += ["--cell-relations", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "a" / "train-config.json").read_text())
    assert config["batch_size"] == 2 and config["image_max_tokens"] == 80
    assert config["single_shape_share"] == 0.5 and config["mrope_section"] == [1, 1, 2]
    assert config["per_dialog_loss"] is True and config["single_shape_questions"] == 0.5
    assert config["style_weights"] == {"describe": 0.2, "mme": 0.6, "lookup": 0.2}
    assert config["hidden_size"] == 64 and config["rope_theta"] == 1e5
    assert config["lookup_copyable"] is False and config["vision_lr_scale"] == 3.0
    assert config["vision_hidden_size"] == 32 and config["cell_loss"] == 0.5
    assert config["cell_clip"] == "separate" and config["cell_relations"] == 2.0
    assert config["category_weights"] == {"color": 2.0, "count": 1.0}
    final = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert final["text_config"]["rope_parameters"] == {
        "mrope_section": [1, 1, 2],
        "rope_theta": 1e5,
        "rope_type": "default",
    }
    assert final["text_config"]["hidden_size"] == 64
    bad = CliRunner().invoke(
        app, ["train-tiny", "--out", str(tmp_path / "b"), "--mrope-section", "x"]
    )
    assert bad.exit_code != 0 and "--mrope-section 'x'" in bad.output
    assert not (tmp_path / "b").exists()
    for option, value in (("--style-weights", "mme:1"), ("--category-weights", "OCR=1")):
        bad = CliRunner().invoke(app, ["train-tiny", "--out", str(tmp_path / "b"), option, value])
        assert bad.exit_code != 0 and bad.output.count("\n") <= 2, bad.output
        assert not (tmp_path / "b").exists()
    # continuing that checkpoint under the default sections is refused in one line
    cont = ["train-tiny", "--out", str(tmp_path / "c"), "--steps", "1", "--batch-size", "1"]
    cont += ["--init-from", str(tmp_path / "a" / "final")]
    refused = CliRunner().invoke(app, cont)
    assert refused.exit_code != 0 and "pass the same --mrope-section" in refused.output
    assert not (tmp_path / "c").exists()  # no partial run folder
    # the same sections and width under another rotary base: refused as well
    cont += ["--mrope-section", "1,1,2", "--hidden-size", "64"]
    refused = CliRunner().invoke(app, cont)
    assert refused.exit_code != 0 and "pass the same --rope-theta" in refused.output
    assert not (tmp_path / "c").exists()


def test_the_per_dialog_loss_weighs_every_dialog_alike() -> None:
    """answer_loss against transformers' own loss: the whole batch (token mean) and each row
    alone (its mean), so a bare "Yes" weighs as much as a 30-token description."""
    tokenizer, model, processor = tt.build_parts(0)
    tt.IMAGE_ID[0] = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pixels = tt.Pixels(processor)
    cfg = tt.TrainConfig(batch_size=6, steps=10, single_shape_share=0.0)
    batch = tt.step_dialogs(cfg, 5)
    _, grid = pixels([batch[0][0].image])
    encoder = tt.Encoder(tokenizer, int(grid[0].prod()) // 4)
    enc = encoder.batch([d for _, d in batch])
    inputs = tt.model_inputs(enc, pixels([it.image for it, _ in batch]))
    with torch.no_grad():
        logits = model(**inputs).logits
        token_mean = model(**inputs, labels=enc["labels"]).loss
        rows = []
        for item, dialog in batch:
            one = encoder.batch([dialog])
            alone = tt.model_inputs(one, pixels([item.image]))
            rows.append(model(**alone, labels=one["labels"]).loss)
    lengths = {len(d.answer) for _, d in batch}
    assert len(lengths) > 1  # the rows differ in length, so the two means differ
    assert torch.allclose(tt.answer_loss(logits, enc["labels"], False), token_mean, atol=1e-5)
    per_dialog = tt.answer_loss(logits, enc["labels"], True)
    assert torch.allclose(per_dialog, torch.stack(rows).mean(), atol=1e-4)
    assert not torch.allclose(per_dialog, token_mean, atol=1e-3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "--steps"),
        ({"image_max_tokens": 2}, "image_max_tokens"),
        ({"single_shape_share": -0.1}, "single_shape_share"),
        ({"mrope_section": (4, 4)}, "mrope_section"),
        ({"style_weights": {"poetry": 1.0}}, "style weights"),
        ({"style_weights": {"mme": -1.0}}, "style weights"),
        ({"category_weights": {"OCR": 1.0}}, "unknown categories .* color_presence"),
        ({"style_weights": {"mme": 0.0}}, "style weights"),
        ({"category_weights": {"color": 0.0}}, "category weights"),
        ({"single_shape_questions": 1.5}, "single_shape_questions"),
        ({"vision_lr_scale": 0.0}, "vision_lr_scale"),
        ({"cell_loss": -1.0}, "cell_loss"),
        ({"cell_clip": "both"}, "cell_clip"),
        ({"cell_relations": -1.0, "cell_loss": 1.0}, "cell_relations"),
        ({"cell_relations": 1.0}, "cell_relations .* cell_loss"),
    ],
)
def test_impossible_settings_are_refused_before_anything_is_written(
    tmp_path, settings, message
) -> None:
    with pytest.raises(VlmCreditError, match=message):
        tt.train_tiny(tmp_path / "run", tt.TrainConfig(**settings), echo=lambda _m: None)
    assert not (tmp_path / "run").exists()


def test_an_out_path_that_is_a_file_is_refused_and_kept(tmp_path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    result = CliRunner().invoke(app, ["train-tiny", "--out", str(target), "--steps", "1"])
    assert result.exit_code != 0 and "is a file" in result.output
    assert target.read_text() == "mine"
