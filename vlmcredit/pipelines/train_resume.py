"""train-tiny's resume state: weights, AdamW moments and the step, in safetensors (no pickle).

Written into the run folder that `train_tiny` has checked is its own (`OUT/resume`, through
`OUT/resume.tmp`), so the two folders removed here are only ever ones this module wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def save_resume(folder: Path, model: Any, optimizer: Any, step: int) -> None:
    """Weights, AdamW moments and the step, in safetensors, replaced atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                n = names[id(p)]
                tensors[f"adam.{n}.exp_avg"] = state["exp_avg"]
                tensors[f"adam.{n}.exp_avg_sq"] = state["exp_avg_sq"]
                tensors[f"adam.{n}.step"] = state["step"].reshape(1)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "step.json").write_text(json.dumps({"step": step}))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_resume(folder: Path, model: Any, optimizer: Any) -> int:
    """Restore what `save_resume` wrote; returns the number of finished steps."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    )
    for n, p in model.named_parameters():
        if f"adam.{n}.exp_avg" in tensors:
            optimizer.state[p] = {
                "exp_avg": tensors[f"adam.{n}.exp_avg"],
                "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"],
                "step": tensors[f"adam.{n}.step"].reshape(()).to(torch.float32),
            }
    return int(json.loads((folder / "step.json").read_text())["step"])


def drop_log_after(log: Path, step: int) -> None:
    """Keep the records of steps <= `step` in the run's own train log: a run killed between two
    saves logged steps that the resumed run does again, and each step is logged once."""
    if not log.exists():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [x for x in lines if x.strip() and json.loads(x)["step"] <= step]
    if len(kept) < len(lines):
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(log)
