"""The shipped built-in model: it loads by name, it sees, and it is the file the docs describe.

docs/builtin-model.md (written by scripts/builtin_quality.py) records the sha256 of the shipped
model.safetensors and the quality figures measured on it; these tests keep the page and the
package in step and guard the one claim everything else rests on: the model answers held-out
shape questions well above chance.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.builtin import DEFAULT_CKPT, builtin_path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "builtin-model.md"
HELD_OUT_SEED = 99  # synth_items streams of this seed are never drawn by training
IMAGES_PER_CATEGORY = 16
# 128 questions: a coin flip scores 0.5 with a standard deviation of sqrt(0.25 / 128) = 0.044,
# so 0.6 is 2.3 standard deviations above chance (a guesser passes with p ~ 0.01). Every
# always-yes / always-no answerer scores exactly 0.5 (one Yes and one No question per image).
# The model's accuracy on this set is 0.77 (docs/builtin-model.md has the larger held-out set), so
# 0.6 leaves margin without hiding a regression to chance; existence, the category it reliably
# sees (32/32 here), must be >= 0.85 (a coin flip reaches that with p < 1e-4).
MIN_ACCURACY = 0.6


def test_builtin_model_answers_held_out_shape_questions_above_chance(tmp_path: Path) -> None:
    """MME-style questions on held-out images, answered by the probe-heads logit path."""
    from vlmcredit.data.mme import read_mme
    from vlmcredit.data.mme_score import parse_answer
    from vlmcredit.data.mme_synth import write_synthetic_mme
    from vlmcredit.data.synth_dialogs import DIALOG_CATEGORIES
    from vlmcredit.models.loading import load_checkpoint
    from vlmcredit.probes.image_features import ImageFeatureCache
    from vlmcredit.probes.mme_answer import MMEInputs, answer_questions

    write_synthetic_mme(tmp_path, IMAGES_PER_CATEGORY, HELD_OUT_SEED, DIALOG_CATEGORIES)
    questions = read_mme(tmp_path).questions
    assert len(questions) == 2 * IMAGES_PER_CATEGORY * len(DIALOG_CATEGORIES)
    ck = load_checkpoint(DEFAULT_CKPT, dtype="fp32")
    bank = MMEInputs(ck, questions, ImageFeatureCache(64 * 2**20))
    bank.prepare()
    answers = answer_questions(bank, bank.batches(16))
    right: dict[str, list[bool]] = {}
    for i, q in enumerate(questions):
        right.setdefault(q.category, []).append(
            parse_answer(answers[i].prediction) == q.answer.lower()
        )
    per_category = {c: sum(v) / len(v) for c, v in right.items()}
    accuracy = sum(map(sum, right.values())) / len(questions)
    assert per_category["existence"] >= 0.85, per_category
    assert accuracy >= MIN_ACCURACY, (
        f"{DEFAULT_CKPT}: {accuracy:.3f} of {len(questions)} held-out questions right "
        f"(chance 0.5, need {MIN_ACCURACY}); per category {per_category}"
    )


def test_docs_record_the_shipped_weights_sha256() -> None:
    assert DOC.is_file(), f"{DOC} is missing: python scripts/builtin_quality.py writes it"
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"model\.safetensors sha256 \| `([0-9a-f]{64})`", text)
    assert len(found) == 1, f"{DOC}: expected one 'model.safetensors sha256 | `<hex>`' row"
    weights = builtin_path(DEFAULT_CKPT) / "model.safetensors"
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert found[0] == actual, (
        f"{DOC} describes weights {found[0][:12]}..., the package ships {actual[:12]}...: rerun "
        "python scripts/builtin_quality.py --train-log OUT/train-log.jsonl"
    )


def test_training_record_describes_the_shipped_weights() -> None:
    """The stage records the page is rendered from are kept beside it, keyed by the weights' hash:
    the page regenerates without the train logs, and a stale record cannot pass as current."""
    import json

    record_path = DOC.with_suffix(".training.json")
    assert record_path.is_file(), (
        f"{record_path} is missing: builtin_quality.py --train-log writes it"
    )
    record = json.loads(record_path.read_text(encoding="utf-8"))
    weights = builtin_path(DEFAULT_CKPT) / "model.safetensors"
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    stages = record["stages"]
    assert stages and all(st["seconds"] > 0 and st["command"] for st in stages)
    text = DOC.read_text(encoding="utf-8")
    assert f"Stage {len(stages)} of {len(stages)}:" in text
    assert stages[-1]["command"] in text


@pytest.mark.parametrize("name", ["builtin:nope", "builtin:", "builtin:tiny-qwen2.5-vl/../x"])
def test_unknown_builtin_name_is_a_one_line_error(name: str) -> None:
    from vlmcredit.models.loading import load_checkpoint

    with pytest.raises(VlmCreditError) as err:
        load_checkpoint(name)
    message = str(err.value)
    assert "\n" not in message
    assert name in message and DEFAULT_CKPT in message
