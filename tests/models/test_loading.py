"""Loading: every family, dtypes, the processor fallback, and each user error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import FAMILIES
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.provenance import tokenizer_hash, weights_hash
from vlmcredit.models.families import resolve_path
from vlmcredit.models.loading import load_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_matches_modules(loaded, family: str) -> None:
    ck = loaded(family)
    geo = ck.geometry
    layers = ck.decoder_layers()
    assert len(layers) == geo.num_layers
    attn = resolve_path(layers[0], ck.adapter.self_attn_path)
    o_proj = resolve_path(layers[0], ck.adapter.o_proj_path)
    assert o_proj.in_features == geo.num_heads * geo.head_dim
    assert attn.k_proj.out_features == geo.num_kv_heads * geo.head_dim
    assert attn.num_key_value_groups == geo.kv_groups == 2
    assert ck.adapter.vision_tower(ck.model) is ck.model.model.visual
    assert geo.cell_pixels == (32 if family.startswith("qwen3") else 28)
    assert bool(geo.deepstack_layers) == family.startswith("qwen3")
    # The fallback processor is the family's own class, without a video processor.
    assert type(ck.processor).__name__ == ck.adapter.processor_class
    assert ck.processor.image_processor.patch_size == geo.patch_size


def test_bf16_and_hashes(tiny_ckpt) -> None:
    ck = load_checkpoint(tiny_ckpt("qwen2-vl"), dtype="bf16")
    assert next(ck.model.parameters()).dtype == torch.bfloat16
    assert len(weights_hash(ck.path)) == 40
    assert weights_hash(ck.path) != weights_hash(tiny_ckpt("qwen3-vl"))
    assert tokenizer_hash(ck.processor) == tokenizer_hash(ck.processor)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _set_model_type(folder: Path, model_type: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))


def broken_checkpoints(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, expected message fragment), one per user error."""
    cases: dict[str, tuple[Path, str]] = {}
    f = _copy(src, root / "unknown")
    _set_model_type(f, "llava")
    cases["unknown model type"] = (f, "unsupported model_type 'llava'")
    f = _copy(src, root / "textonly")
    _set_model_type(f, "qwen2")
    cases["text-only"] = (f, "text-only checkpoint")
    f = _copy(src, root / "noweights")
    (f / "model.safetensors").unlink()
    cases["no weights"] = (f, "no *.safetensors weights")
    f = _copy(src, root / "pickle")
    (f / "model.safetensors").rename(f / "pytorch_model.bin")
    cases["pickle only"] = (f, "safetensors only")
    f = _copy(src, root / "notok")
    (f / "tokenizer.json").unlink()
    cases["no tokenizer"] = (f, "no tokenizer")
    f = _copy(src, root / "truncated")
    data = (f / "model.safetensors").read_bytes()
    (f / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated weights"] = (f, "truncated")
    f = _copy(src, root / "garbage")
    (f / "model.safetensors").write_bytes(b"\xff" * 8)
    cases["garbage header"] = (f, "not a complete safetensors file")
    f = root / "empty"
    f.mkdir()
    cases["no config"] = (f, "no config.json")
    cases["missing"] = (root / "does-not-exist", "no such folder")
    cases["hub id not cached"] = (Path("nobody/not-a-model"), "not in the local Hugging Face cache")
    return cases


@pytest.fixture(scope="module")
def broken(tiny_ckpt, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return broken_checkpoints(tiny_ckpt("qwen2.5-vl"), tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize(
    "case",
    [
        "unknown model type",
        "text-only",
        "no weights",
        "pickle only",
        "no tokenizer",
        "no config",
        "missing",
        "hub id not cached",
    ],
)
def test_load_errors_are_one_line(broken, case: str) -> None:
    folder, fragment = broken[case]
    with pytest.raises(VlmCreditError) as err:
        load_checkpoint(folder)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message
    assert str(folder) in message


def test_bad_dtype_and_device_map(tiny_ckpt) -> None:
    with pytest.raises(VlmCreditError, match="--dtype"):
        load_checkpoint(tiny_ckpt("qwen2-vl"), dtype="int3")
    with pytest.raises(VlmCreditError, match="exclude each other"):
        load_checkpoint(tiny_ckpt("qwen2-vl"), device="cpu", device_map="auto")
