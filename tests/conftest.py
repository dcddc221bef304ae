"""Session fixtures: tiny offline checkpoints of every family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from tests.helpers import noise_image


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The weights-hash cache of this session, not the user's ~/.cache/vlmcredit."""
    folder = tmp_path_factory.mktemp("vlmcredit-cache")
    os.environ["VLMCREDIT_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_root: Path):
    """tiny_ckpt(family) -> folder of a tiny checkpoint (seed 0), built on first use."""
    from vlmcredit.models.tiny import make_tiny

    def get(family: str) -> Path:
        path = tiny_root / family
        if not path.exists():
            make_tiny(family, path, seed=0)
        return path

    return get


@pytest.fixture(scope="session")
def loaded(tiny_ckpt):
    """loaded(family) -> LoadedCheckpoint in fp32 on CPU, cached per session."""
    from vlmcredit.models.loading import load_checkpoint

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_checkpoint(tiny_ckpt(family), dtype="fp32")
        return cache[family]

    return get


@pytest.fixture
def make_image():
    return noise_image
