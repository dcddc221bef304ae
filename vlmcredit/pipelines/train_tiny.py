"""Train the built-in model: a small Qwen2.5-VL, from scratch, on synthetic shape images.

`vlmcredit train-tiny --out DIR` builds the checkpoint shipped as `builtin:tiny-qwen2.5-vl`.
The recipe (architecture, settings, the batch of each step) is `pipelines.train_recipe`.
It is the real transformers class (Qwen2_5_VLForConditionalGeneration) with a small config:
text hidden 128, 4 decoder layers of 8 query heads (4 KV heads), a 2-block vision tower, and an
image processor capped at 36 merged tokens (the 336x280 synthetic images become 6x5 cells).

Training text comes from `data.synth_dialogs`: every synthetic question in two styles, a bare
"Yes"/"No" (MME style) and a grounded sentence followed by the verdict (reasoning style). Every
step renders a fresh batch from its own seeded stream, `Random("vlmcredit-train:<seed>:<step>")`,
so the data never repeats, a run is reproducible from its seed, and a resumed run sees exactly
the batches the killed one would have. Held-out questions come from `synth_items(..., seed)`
streams, which the training streams never share.

The run keeps intermediate checkpoints (`step-NNNNNN/`) for checkpoint comparison, and a resume
state (`resume/`: weights, AdamW moments, step; safetensors, no pickle) rewritten atomically
every `save_every` steps.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.data.mme_synth import SynthItem, synth_items
from vlmcredit.data.synth_dialogs import (
    DIALOG_CATEGORIES,
    Dialog,
    dialogs,
)
from vlmcredit.errors import VlmCreditError
from vlmcredit.pipelines.train_cells import CellSupervision, batch_targets, separate_gradient
from vlmcredit.pipelines.train_recipe import (
    IMAGE_MAX_TOKENS,
    TEXT,
    VISION,
    TrainConfig,
    step_dialogs,
)
from vlmcredit.pipelines.train_resume import drop_log_after, load_resume, save_resume

FAMILY = "qwen2_5_vl"
# Words of the dialogs, so each is one token in the built-in tokenizer as in a real vocabulary.
DIALOG_CORPUS = (
    " There There is are no only So the answer is yes. no. Look at image, then answer yes or no. "
    "on the left on the right at the top at the bottom circles squares triangles exactly Are "
    "Is this zero one two three four five six seven eight of above below Describe shapes shape: "
    "in image. top left, bottom right and a an "
)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
EVAL_SEED = 7  # held-out questions: synth_items(category, n, EVAL_SEED), never a training stream


# -- tokenizer, model, pixels --------------------------------------------------------------------
def build_parts(
    seed: int,
    image_max_tokens: int = IMAGE_MAX_TOKENS,
    mrope_section: Sequence[int] = TrainConfig.mrope_section,
    hidden_size: int = TrainConfig.hidden_size,
    rope_theta: float = TrainConfig.rope_theta,
    vision_hidden_size: int = TrainConfig.vision_hidden_size,
) -> tuple[Any, Any, Any]:
    """(tokenizer, model, image processor) of a fresh built-in model, weights drawn from `seed`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmcredit.models.tiny import build_config, build_image_processor, build_tokenizer

    tokenizer = build_tokenizer(extra_corpus=DIALOG_CORPUS)
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope_section)}
    text = {**TEXT, "hidden_size": hidden_size, "intermediate_size": 3 * hidden_size}
    vision = {
        **VISION,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 2 * vision_hidden_size,
        "out_hidden_size": hidden_size,  # the merger feeds the language model
    }
    config = build_config(FAMILY, tokenizer, {**text, "rope_parameters": rope}, vision)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return tokenizer, model, build_image_processor(FAMILY, image_max_tokens)


class Pixels:
    """Qwen's image preprocessing, vectorised over a batch of same-size images.

    Resizing stays the processor's own (PIL bicubic on uint8); rescale, normalise and patchify
    are done here on the whole batch at once. `check` proves equality with the processor.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.patch = processor.patch_size
        self.merge = processor.merge_size
        self.temporal = processor.temporal_patch_size
        mean = np.asarray(processor.image_mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(processor.image_std, np.float32).reshape(1, 3, 1, 1)
        self.scale, self.mean, self.std = np.float32(processor.rescale_factor), mean, std

    def resized(self, image: Any) -> np.ndarray:
        """(3, H, W) uint8, resized exactly as the processor resizes."""
        from transformers.image_utils import PILImageResampling

        arr = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
        size = self.processor.size
        out = self.processor.resize(
            arr,
            size=size,
            resample=PILImageResampling.BICUBIC,
            factor=self.patch * self.merge,
        )
        return np.asarray(out, dtype=np.uint8)

    def __call__(self, images: Sequence[Any]) -> tuple[Any, Any]:
        import torch

        batch = np.stack([self.resized(im) for im in images]).astype(np.float32)
        batch = (batch * self.scale - self.mean) / self.std
        n, c, h, w = batch.shape
        p, m = self.patch, self.merge
        gh, gw = h // p, w // p
        x = batch.reshape(n, c, gh // m, m, p, gw // m, m, p).transpose(0, 2, 5, 3, 6, 1, 4, 7)
        x = np.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], self.temporal, p, p))
        pixel_values = torch.from_numpy(np.ascontiguousarray(x).reshape(n * gh * gw, -1))
        grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long)
        return pixel_values, grid

    def check(self, images: Sequence[Any]) -> None:
        """Raise unless this equals the processor's output on `images` (up to float rounding)."""
        import torch

        ref = self.processor(images=list(images), return_tensors="pt")
        mine, grid = self(images)
        if not torch.equal(grid, ref["image_grid_thw"]) or not torch.allclose(
            mine, ref["pixel_values"], atol=1e-5
        ):
            raise RuntimeError("vectorised pixels differ from the image processor's")


def init_weights(model: Any, folder: Path) -> None:
    """Copy a train-tiny checkpoint's weights into `model` (safetensors through transformers'
    own loader, so its key mapping applies); names and shapes must match."""
    from transformers import AutoModelForImageTextToText

    if not (folder / "model.safetensors").is_file():
        raise VlmCreditError(f"--init-from {folder}: no model.safetensors; pass a checkpoint")
    source = AutoModelForImageTextToText.from_pretrained(folder, dtype="float32")
    # the rotary sections are config, not weights: continuing under other ones would silently
    # move every image token's position
    for key, option in (("mrope_section", "--mrope-section"), ("rope_theta", "--rope-theta")):
        theirs = source.config.text_config.rope_parameters.get(key)
        ours = model.config.text_config.rope_parameters.get(key)
        if json.dumps(theirs) != json.dumps(ours):  # a tuple and a list of the same sections agree
            raise VlmCreditError(
                f"--init-from {folder}: trained with {option} {theirs}, this run uses {ours}; "
                f"pass the same {option}"
            )
    loaded = source.state_dict()
    own = model.state_dict()
    if set(loaded) != set(own) or any(loaded[k].shape != own[k].shape for k in own):
        raise VlmCreditError(
            f"--init-from {folder}: not a checkpoint of the built-in architecture; pass a "
            "train-tiny checkpoint"
        )
    model.load_state_dict(loaded)


# -- batches --------------------------------------------------------------------------------------
class Encoder:
    """Token ids of prompt + answer in the chat template's layout, checked against the processor."""

    def __init__(self, tokenizer: Any, image_tokens: int) -> None:
        self.tok = tokenizer
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.image_tokens = image_tokens

    def prompt(self, question: str) -> str:
        pads = "<|image_pad|>" * self.image_tokens
        return (
            f"{SYSTEM}<|im_start|>user\n<|vision_start|>{pads}<|vision_end|>{question}"
            "<|im_end|>\n<|im_start|>assistant\n"
        )

    def batch(self, dialogs_: Sequence[Dialog], with_answers: bool = True) -> dict[str, Any]:
        """Right-padded input_ids, attention_mask, labels (-100 outside answers), prompt lengths."""
        import torch

        prompts = self.tok([self.prompt(d.question) for d in dialogs_])["input_ids"]
        answers = self.tok([d.answer for d in dialogs_])["input_ids"] if with_answers else None
        rows, labels = [], []
        for k, p in enumerate(prompts):
            a = [*answers[k], self.end] if answers is not None else []
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            ids[k, : len(r)] = torch.tensor(r)
            lab[k, : len(lb)] = torch.tensor(lb)
            mask[k, : len(r)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": lab,
            "prompt_lengths": [len(p) for p in prompts],
        }

    def check(self, processor: Any, image: Any, question: str) -> None:
        """Raise unless `prompt` tokenises as the processor's chat template + image expansion."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        ref = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
        mine = self.tok([self.prompt(question)])["input_ids"][0]
        if ref.tolist() != mine:
            raise RuntimeError("the training prompt differs from the processor's chat template")


def model_inputs(enc: dict[str, Any], pixels: tuple[Any, Any]) -> dict[str, Any]:
    ids = enc["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": enc["attention_mask"],
        "pixel_values": pixels[0],
        "image_grid_thw": pixels[1],
        "mm_token_type_ids": (ids == IMAGE_ID[0]).long(),
    }


IMAGE_ID = [0]  # set once the tokenizer exists (the <|image_pad|> id)


def answer_loss(logits: Any, labels: Any, per_dialog: bool) -> Any:
    """Next-token cross-entropy on the answer tokens (labels != -100): the mean per dialog, then
    over dialogs (`per_dialog`), or the mean over all answer tokens of the batch (transformers')."""
    import torch

    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none"
    )  # (B, S - 1), 0 where ignored
    counts = (target != -100).sum(dim=1)
    if not per_dialog:
        return nll.sum() / counts.sum()
    return (nll.sum(dim=1) / counts.clamp(min=1)).mean()


# -- evaluation -----------------------------------------------------------------------------------
def held_out(n: int) -> list[tuple[SynthItem, Dialog]]:
    """Held-out MME-style questions: both questions of `n` images per category."""
    out = []
    for category in DIALOG_CATEGORIES:
        for item in synth_items(category, n, EVAL_SEED):
            out.extend((item, d) for d in dialogs(item, ("mme",)))
    return out


def answer_accuracy(
    model: Any, encoder: Encoder, pixels: Pixels, rows: Sequence[tuple[SynthItem, Dialog]]
) -> dict[str, float]:
    """Share of held-out questions whose greedy first answer token is the right Yes/No."""
    import torch

    yes = encoder.tok.convert_tokens_to_ids("Yes")
    no = encoder.tok.convert_tokens_to_ids("No")
    right: dict[str, list[bool]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            enc = encoder.batch([d for _, d in chunk], with_answers=False)
            logits = model(**model_inputs(enc, pixels([it.image for it, _ in chunk]))).logits
            for k, (_, d) in enumerate(chunk):
                token = int(logits[k, enc["prompt_lengths"][k] - 1].argmax())
                said = "Yes" if token == yes else "No" if token == no else "other"
                right.setdefault(d.category, []).append(said == d.truth)
    model.train()
    return {c: float(np.mean(v)) for c, v in right.items()}


def make_optimizer(model: Any, cfg: TrainConfig) -> Any:
    """AdamW over four parameter groups: weight decay on matrices (not embeddings, norms, biases),
    and `lr_scale` = cfg.vision_lr_scale on the vision tower (the loop sets lr = lr_at * scale)."""
    import torch

    groups: dict[tuple[bool, bool], list[Any]] = {}
    for n, p in model.named_parameters():  # (decayed?, vision tower?)
        groups.setdefault((p.ndim >= 2 and "embed" not in n, ".visual." in f".{n}"), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": cfg.weight_decay if decayed else 0.0,
                "lr_scale": cfg.vision_lr_scale if vision else 1.0,
            }
            for (decayed, vision), params in sorted(groups.items())
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# -- the run --------------------------------------------------------------------------------------
def train_tiny(
    out: Path, cfg: TrainConfig, echo: Callable[[str], None] = print, threads: int | None = None
) -> Path:
    """Train into `out` (resuming a killed run there); returns the final checkpoint folder."""
    import torch
    from tqdm.auto import tqdm

    from vlmcredit.models.families import adapter_for
    from vlmcredit.models.loading import load_processor, read_model_type
    from vlmcredit.models.tiny import save_checkpoint

    cfg.check()
    if out.exists() and not out.is_dir():
        raise VlmCreditError(f"--out {out}: is a file; choose a new folder")
    marker = out / "train-config.json"
    wanted = json.dumps(asdict(cfg), indent=2, sort_keys=True)
    if marker.exists() and marker.read_text() != wanted:
        raise VlmCreditError(
            f"--out {out}: holds a training run with other settings ({marker}); choose a new "
            "folder or the same settings to resume"
        )
    if not marker.exists() and out.exists() and any(out.iterdir()):
        raise VlmCreditError(
            f"--out {out}: exists and is not a train-tiny run; choose a new folder"
        )
    if threads:
        torch.set_num_threads(threads)

    tokenizer, model, processor = build_parts(
        cfg.seed,
        cfg.image_max_tokens,
        cfg.mrope_section,
        cfg.hidden_size,
        cfg.rope_theta,
        cfg.vision_hidden_size,
    )
    if cfg.init_from:  # checked before the run folder is written: a refusal leaves nothing
        init_weights(model, Path(cfg.init_from))
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(wanted)
    IMAGE_ID[0] = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # the untrained weights, kept for checkpoint comparison; its processor (loaded the way every
    # command loads one) is the reference the vectorised pixels and the prompt ids are checked on
    init = out / "step-000000"
    if not init.exists():
        save_checkpoint(model, tokenizer, processor, init)
    full_processor = load_processor(init, adapter_for(read_model_type(init, str(init))))
    pixels = Pixels(processor)
    probe = step_dialogs(cfg, 0)[:4]
    pixels.check([it.image for it, _ in probe])
    _, grid = pixels([probe[0][0].image])
    encoder = Encoder(tokenizer, int(grid[0].prod()) // (processor.merge_size**2))
    encoder.check(full_processor, probe[0][0].image, probe[0][1].question)

    # what the optimizer trains and the resume state holds: the model, and the cell head if any
    cells = CellSupervision(model, cfg.seed, cfg.cell_relations) if cfg.cell_loss else None
    trained = model if cells is None else torch.nn.ModuleDict({"lm": model, "cells": cells.head})
    optimizer = make_optimizer(trained, cfg)
    resume = out / "resume"
    start = load_resume(resume, trained, optimizer) if (resume / "step.json").exists() else 0
    log_path = out / "train-log.jsonl"
    if start:
        echo(f"resuming at step {start} of {cfg.steps}")
        drop_log_after(log_path, start)
    keep = {max(1, round(f * cfg.steps)) for f in cfg.keep}
    evals = held_out(cfg.eval_images)
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train-tiny")
    t0 = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step) * group["lr_scale"]
        batch = step_dialogs(cfg, step)
        enc = encoder.batch([d for _, d in batch])
        inputs = model_inputs(enc, pixels([it.image for it, _ in batch]))
        if cells is not None:
            cells.discard()  # the evaluation's forwards
        if cfg.per_dialog_loss:
            loss = answer_loss(model(**inputs).logits, enc["labels"], per_dialog=True)
        else:  # transformers' own loss, as the shipped model was trained
            loss = model(**inputs, labels=enc["labels"]).loss
        record: dict[str, Any] = {"step": step + 1, "loss": round(loss.item(), 5)}
        optimizer.zero_grad(set_to_none=True)
        apart = cells is not None and cfg.cell_clip == "separate"
        if cells is not None:
            targets = batch_targets(
                [it for it, _ in batch],
                inputs["image_grid_thw"],
                pixels.merge,
                relations=bool(cfg.cell_relations),
            )
            aux = cells.loss(targets)
            record["cell_loss"] = round(aux.item(), 5)
            if cells.last_relation_loss is not None:
                record["cell_relation_loss"] = round(cells.last_relation_loss, 5)
            if apart:  # its gradient first, while the shared graph is still there
                cell_grads = separate_gradient(cfg.cell_loss * aux, list(trained.parameters()))
            else:
                loss = loss + cfg.cell_loss * aux
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0))
        if apart:
            record["cell_grad_norm"] = round(cell_grads.add_clipped(1.0), 4)
        optimizer.step()
        done = step + 1
        record["grad_norm"] = round(grad_norm, 4)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            acc = answer_accuracy(model, encoder, pixels, evals)
            record["held_out_accuracy"] = {k: round(v, 4) for k, v in acc.items()}
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{np.mean(list(acc.values())):.3f}")
        record["seconds"] = round(time.perf_counter() - t0, 2)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if done in keep:
            target = out / f"step-{done:06d}"
            if not target.exists():
                save_checkpoint(model, tokenizer, processor, target)
        if done % cfg.save_every == 0 and done < cfg.steps:
            save_resume(resume, trained, optimizer, done)
    final = out / "final"
    if not final.exists():
        save_checkpoint(model, tokenizer, processor, final)
    shutil.rmtree(resume, ignore_errors=True)
    if cells is not None:
        cells.close()
    return final
