"""A tiny checkpoint that answers MME-style yes/no questions from what it sees.

The random tiny model (`make_tiny`) answers every question the same way, so ablating its heads
changes nothing. This copy rewrites only the lm_head rows of the yes/no tokens so that the
first answer token is read off the model's own final hidden state by a ridge probe fitted on a
(synthetic) MME set: whether it says yes or no then depends on the image and question through
every decoder layer, and head ablation moves the score. Used by the demo, the tests and the
probe-heads benchmark; it is a test instrument, not a trained model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from vlmcredit.data.mme import read_mme
from vlmcredit.models.loading import load_checkpoint
from vlmcredit.probes.mme_answer import ImageFeatureCache, MMEInputs


def yes_no_checkpoint(
    src: Path, dst: Path, mme_dir: Path, base: float = 2.0, spread: float = 1.5
) -> Path:
    """Copy of a tiny checkpoint whose first answer token is usually a yes/no variant.

    The random tiny model answers garbage. Here the lm_head rows of "Yes", " yes", "No" and
    " No" are rewritten to read the model's own final hidden state h at the answer position:
      row = base * m / |m|^2 + spread * (+-p  or  0.7 (+-p) + 0.7 o)
    where m is the mean of h over the questions of `mme_dir` (so every row scores about `base`,
    above most random logits), p a ridge-regression probe of h for the ground-truth answer and o
    the main remaining direction of h (so " yes" / " No" sometimes beat "Yes" / "No"). Whether
    the greedy token is yes, no or something else thus depends on the image and question
    through every layer, and head ablation changes it.
    """
    ck = load_checkpoint(src, dtype="fp32")
    questions = read_mme(mme_dir).questions
    bank = MMEInputs(ck, questions, ImageFeatureCache(1 << 30))
    bank.prepare()
    states = torch.zeros(len(questions), ck.geometry.hidden_size)
    seen: dict[str, torch.Tensor] = {}
    lm_head = ck.adapter.output_embedding(ck.model)
    handle = lm_head.register_forward_hook(
        lambda _m, args, _o: seen.__setitem__("h", args[0][:, -1].detach())
    )
    try:
        for batch in bank.batches(8):
            inputs = ck.adapter.with_positions(ck.model, bank.inputs(batch))
            with torch.no_grad():
                ck.model(**inputs, logits_to_keep=1)
            states[batch] = seen["h"]
    finally:
        handle.remove()
    mean = states.mean(0)
    centred = states - mean

    def unit(v: torch.Tensor) -> torch.Tensor:  # off the mean direction, unit spread over h
        v = v - (v @ mean) / (mean @ mean) * mean
        return v / (centred @ v).std()

    target = torch.tensor([1.0 if q.answer == "Yes" else -1.0 for q in questions])
    gram = centred.T @ centred + torch.eye(centred.shape[1])
    probe = unit(torch.linalg.solve(gram, centred.T @ target))
    rest = centred - torch.outer(centred @ probe, probe) / (probe @ probe)
    other = unit(torch.linalg.svd(rest, full_matrices=False).Vh[0])
    weight = lm_head.weight.detach().clone()
    offset = base * mean / (mean @ mean)
    rows = {"Yes": probe, " yes": 0.7 * probe + 0.7 * other,
            "No": -probe, " No": -0.7 * probe + 0.7 * other}  # fmt: skip
    for text, direction in rows.items():
        (token,) = ck.tokenizer.encode(text, add_special_tokens=False)
        weight[token] = offset + spread * direction
    from safetensors.torch import load_file, save_file

    tmp = Path(tempfile.mkdtemp(prefix=f".{Path(dst).name}.", dir=Path(dst).parent))
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    tensors = load_file(str(tmp / "model.safetensors"))
    tensors["lm_head.weight"] = weight.contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes 0600; the copy keeps the permissions a plain open() would give
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp / "model.safetensors", 0o666 & ~mask)
    tmp.rename(dst)  # a half-written checkpoint never sits at `dst`
    return Path(dst)
