"""The checkpoints shipped inside the package, loadable as `--ckpt builtin:NAME`.

`builtin:tiny-qwen2.5-vl` is a small Qwen2.5-VL trained from scratch by `vlmcredit train-tiny`
on synthetic shape images (docs/builtin-model.md has its quality figures and how it was made);
`builtin:tiny-qwen2.5-vl-early` is its first training stage at 10% of that stage's steps, for
checkpoint comparison.
They are ordinary checkpoint folders: the same loader serves them and a 72B model.
"""

from __future__ import annotations

from pathlib import Path

from vlmcredit.errors import VlmCreditError

PREFIX = "builtin:"
DEFAULT = "tiny-qwen2.5-vl"
NAMES = ("tiny-qwen2.5-vl", "tiny-qwen2.5-vl-early")
DEFAULT_CKPT = PREFIX + DEFAULT
NOTE = (
    f"note: no --ckpt given; using the built-in demo model {DEFAULT_CKPT} (a tiny Qwen2.5-VL "
    "trained on synthetic shapes); pass --ckpt for a real checkpoint"
)


def root() -> Path:
    return Path(__file__).resolve().parent.parent / "builtin"


def is_builtin(ckpt: object) -> bool:
    return isinstance(ckpt, str) and ckpt.startswith(PREFIX)


def builtin_path(ckpt: str) -> Path:
    """The package folder of `builtin:NAME`; a one-line error for an unknown name."""
    name = ckpt.removeprefix(PREFIX)
    if name not in NAMES:
        raise VlmCreditError(
            f"--ckpt {ckpt}: no such built-in model; built-in: "
            + ", ".join(PREFIX + n for n in NAMES)
        )
    folder = root() / name
    if not (folder / "config.json").is_file():
        raise VlmCreditError(
            f"--ckpt {ckpt}: the package has no files for it ({folder}); reinstall vlmcredit "
            "(pip install -e .) or rebuild it with `vlmcredit train-tiny`"
        )
    return folder
