"""make-tiny: complete, loadable, GQA checkpoints; byte-identical for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmcredit.errors import VlmCreditError
from vlmcredit.models.tiny import SPECIAL_TOKENS, make_tiny

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl-moe"])
def test_same_seed_same_bytes(tmp_path: Path, family: str) -> None:
    a = _files(make_tiny(family, tmp_path / "a", seed=7))
    b = _files(make_tiny(family, tmp_path / "b", seed=7))
    c = _files(make_tiny(family, tmp_path / "c", seed=8))
    assert set(a) == EXPECTED_FILES
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe"])
def test_tiny_checkpoint_is_gqa_and_ids_match_tokenizer(tiny_ckpt, family: str) -> None:
    folder = tiny_ckpt(family)
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    assert text["num_key_value_heads"] < text["num_attention_heads"]
    vocab = json.loads((folder / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert set(SPECIAL_TOKENS) <= set(added)
    assert config["image_token_id"] == added["<|image_pad|>"]
    assert config["vision_start_token_id"] == added["<|vision_start|>"]
    assert (folder / "model.safetensors").stat().st_size < 2_000_000


def test_unknown_family_and_non_empty_out(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError, match="not supported"):
        make_tiny("llava", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(VlmCreditError, match="not empty"):
        make_tiny("qwen2-vl", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
