"""Credit-assignment ablation: TRL GRPO on the built-in model, which tokens get the advantage.

A verifiable visual task: reason-style yes/no questions about synthetic shape images (the
built-in model's own question style, `vlmcredit.data.synth_dialogs`); the reward is 1 when the
completion's last "answer is yes/no" matches the truth, else 0. Every arm trains from the same
checkpoint with the same seeds, data order, group size and steps; only the per-token weights on
the advantage differ:

    plain    all response tokens (trl.GRPOTrainer, no weights)
    anchors  AT-RL: the ~15% most image-connected tokens (clusters), weight 1, others 0
    low      the same number of tokens per response, the lowest-connectivity non-anchors
    random   the same number of tokens per response, uniformly at random (seeded)
    kawhi    KAWHI paragraph weights (Q/K alignment with SGUF regions; heads "all" unless
             --kawhi-heads names the vision-critical heads)

anchors / low / random share one attention pass per batch and train on their selected tokens only
(loss averaged over the selected tokens, the anchors method's own denominator); kawhi keeps every
token (its weights are in [0.1, 1]). Measured per arm and seed: held-out accuracy every
--eval-every steps (greedy decoding, same parser) and on the same questions with a blank white
image, wall time per step (overhead against plain in the same run), TRL's grad_norm / reward /
loss per step, the selected share and connectivity of each batch, and connectivity statistics
(mean, Sarle's bimodality coefficient, anchor share) on a fixed probe set of teacher-forced
reference answers at the start and end.

    python experiments/credit_ablation.py --out runs/credit-ablation          # the real run
    python experiments/credit_ablation.py --out /tmp/ablation --smoke         # 2 steps per arm
    python experiments/credit_ablation.py --out runs/credit-ablation --plot-only

Writes into --out: steps.jsonl (one line per arm, seed and step), evals.jsonl (held-out and
blank-image accuracy), probes.jsonl (connectivity at start and end), summary.json, and
accuracy.png / accuracy.svg (accuracy against step per arm, band = min..max over seeds).
docs/experiments.md describes the run and its budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from vlmcredit.errors import VlmCreditError  # noqa: E402

ARMS = ("plain", "anchors", "low", "random", "kawhi")
CATEGORIES = ("existence", "count", "position", "color")
# synth_items streams (one per seed and category): training questions, held-out evaluation and
# the connectivity probe never share a stream; none is the built-in model's own held-out seed 7
# or one of its training streams ("vlmcredit-train:<seed>:<step>").
TRAIN_SEED = 1001
EVAL_SEED = 2002
PROBE_SEED = 3003
RANDOM_SALT = 18  # the random arm's generator: default_rng([RANDOM_SALT, seed])
FILES = ("steps.jsonl", "evals.jsonl", "probes.jsonl", "summary.json")
FIGURES = ("accuracy.png", "accuracy.svg")
_ANSWER = re.compile(r"answer\s+is\W*(yes|no)\b", re.IGNORECASE)


@dataclass
class Settings:
    """Everything that decides a run (recorded in summary.json)."""

    ckpt: str = "builtin:tiny-qwen2.5-vl"
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1)
    # 5 arms x 2 seeds x 80 steps: about 30 min on an idle 2-core CPU (docs/experiments.md)
    steps: int = 80
    eval_every: int = 20
    prompts_per_step: int = 4
    num_generations: int = 4
    max_completion_length: int = 28  # the longest reference answer is 23 tokens + <|im_end|>
    learning_rate: float = 1e-4  # the built-in model's final pre-training learning rate
    temperature: float = 1.0
    ratio: float = 0.15  # the anchors' share; low and random take the same count per response
    train_images: int = 48  # per category, two questions each: 384 >= 80 steps x 4 prompts
    eval_images: int = 6  # per category, two questions each (and the same with a blank image)
    probe_images: int = 3  # per category, two reference answers each
    eval_batch: int = 32
    kawhi_heads: str = "all"  # "all" (the paper's w/o-critical-heads ablation) or "0,1,3"
    # torch threads. 1 by default: on a small CPU shared with another torch job, two OpenMP
    # threads per process oversubscribe the cores and single steps stall for 10-100 s.
    threads: int = 1
    smoke: bool = False

    def check(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise VlmCreditError(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
        if not self.seeds:
            raise VlmCreditError("--seeds: name at least one seed")
        for name in ("steps", "eval_every", "prompts_per_step", "max_completion_length"):
            if int(getattr(self, name)) < 1:
                raise VlmCreditError(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_generations < 2:
            raise VlmCreditError("--generations must be >= 2 (GRPO compares a group)")
        if not 0.0 < self.ratio <= 1.0:
            raise VlmCreditError(f"--ratio must be in (0, 1], got {self.ratio}")
        for name in ("train_images", "eval_images", "probe_images", "eval_batch"):
            if int(getattr(self, name)) < 1:
                raise VlmCreditError(f"--{name.replace('_', '-')} must be >= 1")
        kawhi_heads(self.kawhi_heads)


SMOKE = {
    "steps": 2,
    "eval_every": 2,
    "prompts_per_step": 2,
    "num_generations": 2,
    "max_completion_length": 8,
    "train_images": 2,
    "eval_images": 1,
    "probe_images": 1,
}


def kawhi_heads(spec: str) -> list[int] | None:
    """--kawhi-heads: None for "all", else the head indices."""
    if spec.strip() == "all":
        return None
    try:
        heads = [int(h) for h in spec.split(",") if h.strip()]
    except ValueError:
        raise VlmCreditError(f"--kawhi-heads {spec!r}: write all or a list like 0,1,3") from None
    if not heads or min(heads) < 0:
        raise VlmCreditError(f"--kawhi-heads {spec!r}: write all or a list like 0,1,3")
    return heads


# -- task -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """One reason-style question about a synthetic image, with its reference answer."""

    id: str
    category: str
    text: str  # the user text, REASON_SUFFIX included
    truth: str  # "yes" / "no"
    answer: str  # the reference answer the built-in model was taught
    image: Any  # PIL image


def questions(seed: int, per_category: int) -> list[Question]:
    """Both reason-style questions of `per_category` images of every category, interleaved."""
    from vlmcredit.data.mme_synth import synth_items
    from vlmcredit.data.synth_dialogs import dialogs

    by_category = []
    for category in CATEGORIES:
        rows = []
        for k, item in enumerate(synth_items(category, per_category, seed)):
            for j, d in enumerate(dialogs(item, ("reason",))):
                qid = f"{seed}/{category}/{k}/{j}"
                rows.append(
                    Question(qid, category, d.question, d.truth.lower(), d.answer, item.image)
                )
        by_category.append(rows)
    return [q for group in zip(*by_category, strict=True) for q in group]


def parse_answer(text: str) -> str | None:
    """The last "answer is yes/no" of a completion, lower case; None when there is none."""
    found = _ANSWER.findall(text)
    return found[-1].lower() if found else None


def completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, Mapping))


def verifiable_reward(completions: Sequence[Any], truth: Sequence[str], **_: Any) -> list[float]:
    """1.0 when the completion's last "answer is yes/no" is the truth, else 0.0."""
    return [
        float(parse_answer(completion_text(c)) == t)
        for c, t in zip(completions, truth, strict=True)
    ]


def messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def train_dataset(rows: Sequence[Question]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "sample_id": q.id,
                "prompt": messages(q.text),
                "image": q.image,
                "truth": q.truth,
                "category": q.category,
            }
            for q in rows
        ]
    )


def blank_like(image: Any) -> Any:
    from PIL import Image

    return Image.new("RGB", image.size, (255, 255, 255))


# -- evaluation -----------------------------------------------------------------------------------
def generate(
    model: Any, processor: Any, rows: Sequence[Question], images: Sequence[Any], settings: Settings
) -> list[str]:
    """Greedy completions of the questions (left-padded batches of --eval-batch)."""
    import torch

    texts = [
        processor.apply_chat_template(messages(q.text), add_generation_prompt=True) for q in rows
    ]
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), settings.eval_batch):
                enc = processor(
                    text=texts[start : start + settings.eval_batch],
                    images=list(images[start : start + settings.eval_batch]),
                    return_tensors="pt",
                    padding=True,
                    padding_side="left",
                )
                enc = {k: v.to(model.device) for k, v in enc.items()}
                ids = model.generate(
                    **enc,
                    max_new_tokens=settings.max_completion_length,
                    do_sample=False,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
                new = ids[:, enc["input_ids"].shape[1] :]
                out.extend(processor.tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def evaluate(model: Any, processor: Any, rows: Sequence[Question], settings: Settings) -> dict:
    """Held-out accuracy (and per category), parse rate, and the blank-image control."""
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    for name, images in (
        ("", [q.image for q in rows]),
        ("blank_", [blank_like(q.image) for q in rows]),
    ):
        texts = generate(model, processor, rows, images, settings)
        said = [parse_answer(t) for t in texts]
        right = [s == q.truth for s, q in zip(said, rows, strict=True)]
        result[f"{name}accuracy"] = float(np.mean(right))
        result[f"{name}parse_rate"] = float(np.mean([s is not None for s in said]))
        result[f"{name}yes_rate"] = float(np.mean([s == "yes" for s in said]))
        if not name:
            result["by_category"] = {
                c: float(np.mean([r for r, q in zip(right, rows, strict=True) if q.category == c]))
                for c in CATEGORIES
            }
            result["examples"] = texts[:2]
    result["eval_s"] = round(time.perf_counter() - t0, 3)
    return result


# -- weights --------------------------------------------------------------------------------------
def selection(
    arm: str, anchor: np.ndarray, conn: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The (T,) bool selection of one response: the anchors, or as many low / random tokens."""
    anchor = np.asarray(anchor, dtype=bool)
    if arm == "anchors":
        return anchor.copy()
    count = int(anchor.sum())
    out = np.zeros(anchor.size, dtype=bool)
    if arm == "low":
        others = np.flatnonzero(~anchor)
        order = others[np.argsort(conn[others], kind="stable")]  # ties: earlier token first
        out[order[:count]] = True
    elif arm == "random":
        out[rng.choice(anchor.size, size=count, replace=False)] = True
    else:
        raise VlmCreditError(f"arm {arm!r} does not select from the anchor pass")
    return out


@dataclass
class ArmWeights:
    """The `weights_fn` of one arm: (model, batch) -> (B, T) weights, plus per-batch stats.

    anchors / low / random run the anchors method's own pass and selection (what
    `online.compute(method="anchors")` runs; the smoke test checks the weights are equal) and
    keep each response's connectivity, which `online.weights` does not return.
    """

    arm: str
    settings: Settings
    seed: int
    processor: Any = None
    calls: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from vlmcredit.analysis.anchors import AnchorConfig

        self.anchor_config = AnchorConfig(ratio=self.settings.ratio)
        self.anchor_config.check()
        self.rng = np.random.default_rng([RANDOM_SALT, int(self.seed)])

    def loss_denominator(self) -> str:
        from vlmcredit.methods import registry

        if self.arm == "kawhi":
            return registry.get("kawhi").denominator_for(self.kawhi_config())
        # the anchors method's denominator (selected tokens with other_weight 0), for all three
        return registry.get("anchors").denominator_for(self.anchor_config)

    def kawhi_config(self) -> Any:
        from vlmcredit.methods.kawhi import KawhiConfig

        heads = kawhi_heads(self.settings.kawhi_heads)
        cfg = KawhiConfig(heads="all" if heads is None else "critical")
        cfg.check()
        return cfg

    def __call__(self, model: Any, batch: Mapping[str, Any]) -> Any:
        import torch

        self.calls += 1
        mask = batch["response_mask"]
        valid = mask.bool()
        if self.arm == "kawhi":
            from vlmcredit import online

            heads = kawhi_heads(self.settings.kawhi_heads)
            w = online.weights(
                model,
                batch,
                method="kawhi",
                config=self.kawhi_config(),
                heads=heads,
                processor=self.processor,
            )
            on = w.to(mask.device)[valid]
            self.last = {
                "selected_share": float((on != 0).float().mean()) if on.numel() else 0.0,
                "weight_mean": float(on.mean()) if on.numel() else 0.0,
                "weight_min": float(on.min()) if on.numel() else 0.0,
            }
            return w
        from vlmcredit import online
        from vlmcredit.methods import registry

        method = registry.get("anchors")
        passes = online.batch_passes(model, batch, method.needs(self.anchor_config), None, None)
        outputs = method.run(passes, self.anchor_config)
        out = torch.ones(mask.shape, dtype=torch.float32)
        picked, anchors, conn_all, conn_picked = [], [], [], []
        for b, (p, o) in enumerate(zip(passes, outputs, strict=True)):
            n = len(p.token_ids)
            if n == 0:
                continue
            conn = np.asarray(o.detail.connectivity, dtype=np.float64)
            pick = selection(self.arm, o.mask, conn, self.rng)
            out[b, :n] = torch.from_numpy(pick.astype(np.float32))
            picked.append(pick)
            anchors.append(np.asarray(o.mask, dtype=bool))
            conn_all.append(conn)
            conn_picked.append(conn[pick])
        pick_all = np.concatenate(picked) if picked else np.zeros(0, dtype=bool)
        anchor_all = np.concatenate(anchors) if anchors else np.zeros(0, dtype=bool)
        conn_cat = np.concatenate(conn_all) if conn_all else np.zeros(0)
        conn_sel = np.concatenate(conn_picked) if conn_picked else np.zeros(0)
        self.last = {
            "selected_share": float(pick_all.mean()) if pick_all.size else 0.0,
            "anchor_share": float(anchor_all.mean()) if anchor_all.size else 0.0,
            "selected_anchor_overlap": (
                float((pick_all & anchor_all).sum() / pick_all.sum()) if pick_all.any() else 0.0
            ),
            "connectivity_mean": float(conn_cat.mean()) if conn_cat.size else 0.0,
            "connectivity_selected_mean": float(conn_sel.mean()) if conn_sel.size else 0.0,
        }
        return out.to(mask.device)


# -- connectivity probe ---------------------------------------------------------------------------
def teacher_forced_batch(processor: Any, rows: Sequence[Question]) -> dict[str, Any]:
    """The trainer-batch layout (vlmcredit.online) of prompts + their reference answers."""
    import torch

    tok = processor.tokenizer
    texts = [
        processor.apply_chat_template(messages(q.text), add_generation_prompt=True) for q in rows
    ]
    enc = processor(
        text=texts, images=[q.image for q in rows], return_tensors="pt", padding=True,
        padding_side="left",
    )  # fmt: skip
    answers = [tok(q.answer, add_special_tokens=False)["input_ids"] for q in rows]
    width = max(map(len, answers))
    response = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, ids in enumerate(answers):
        response[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
    return {
        "input_ids": torch.cat([enc["input_ids"], response], dim=1),
        "attention_mask": torch.cat([enc["attention_mask"], mask], dim=1),
        "response_mask": mask,
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": enc["image_grid_thw"],
    }


def grounded_tokens(processor: Any, answer: str) -> np.ndarray:
    """(T,) bool: the tokens of the grounded sentence (before the blank line), not the verdict."""
    enc = processor.tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    cut = answer.index("\n\n")
    return np.array([start < cut for start, _end in enc["offset_mapping"]], dtype=bool)


def probe(model: Any, processor: Any, rows: Sequence[Question], settings: Settings) -> dict:
    """Connectivity of the reference answers: distribution, anchors, grounded vs verdict."""
    import torch

    from vlmcredit import online
    from vlmcredit.analysis.anchors import AnchorConfig
    from vlmcredit.analysis.connectivity import connectivity_stats
    from vlmcredit.methods import registry

    t0 = time.perf_counter()
    cfg = AnchorConfig(ratio=settings.ratio)
    cfg.check()
    method = registry.get("anchors")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = teacher_forced_batch(processor, rows)
            passes = online.batch_passes(model, batch, method.needs(cfg), None, None)
    finally:
        model.train(was_training)
    outputs = method.run(passes, cfg)
    conn = np.concatenate([o.detail.connectivity for o in outputs])
    anchor = np.concatenate([np.asarray(o.mask, dtype=bool) for o in outputs])
    grounded = np.concatenate([grounded_tokens(processor, q.answer) for q in rows])
    if grounded.shape != conn.shape:
        raise VlmCreditError("probe: the reference answers tokenised differently in the batch")
    stats = connectivity_stats(conn, anchor)
    threshold = np.concatenate([o.detail.threshold_anchor for o in outputs])
    return {
        "responses": len(rows),
        "tokens": int(conn.size),
        "connectivity_mean": float(conn.mean()),
        "connectivity_median": float(np.median(conn)),
        "connectivity_std": float(conn.std()),
        "bimodality": float(stats.bimodality_coefficient),
        "anchor_share": float(anchor.mean()),
        "share_above_cut": float(stats.share_above_cut),
        "anchor_share_grounded": float(anchor[grounded].mean()) if grounded.any() else 0.0,
        "anchor_share_verdict": float(anchor[~grounded].mean()) if (~grounded).any() else 0.0,
        "connectivity_grounded": float(conn[grounded].mean()) if grounded.any() else 0.0,
        "connectivity_verdict": float(conn[~grounded].mean()) if (~grounded).any() else 0.0,
        "threshold_agreement": float((threshold == anchor).mean()),
        "histogram": stats.to_dict()["histogram"],
        "probe_s": round(time.perf_counter() - t0, 3),
    }


# -- one run --------------------------------------------------------------------------------------
class JsonLines:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def make_recorder(
    arm: str,
    seed: int,
    settings: Settings,
    weights: ArmWeights | None,
    on_eval: Callable[[Any, int], None],
    steps_out: JsonLines,
) -> Any:
    """A TrainerCallback: wall time per step, TRL's logs + the weights' stats, periodic evals."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.pending: dict[str, Any] = {}
            self.rows: list[dict[str, Any]] = []
            self.train_logs: dict[str, Any] = {}

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.pending = {"wall_s": round(time.perf_counter() - self.t0, 4)}
            if weights is not None:
                self.pending.update({f"w/{k}": v for k, v in weights.last.items()})
            step = state.global_step
            if step % settings.eval_every == 0 or step == state.max_steps:
                on_eval(model, step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "train_runtime" in logs:
                self.train_logs = logs
                return
            record = {"arm": arm, "seed": seed, "step": state.global_step}
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            record.update(self.pending)
            self.pending = {}
            if "completions/mean_length" in record and "wall_s" in record:
                size = settings.prompts_per_step * settings.num_generations
                tokens = record["completions/mean_length"] * size
                record["wall_ms_per_completion_token"] = round(1e3 * record["wall_s"] / tokens, 4)
            self.rows.append(record)
            steps_out.write(record)

    return Recorder()


def load(settings: Settings) -> Any:
    from vlmcredit.models.loading import load_checkpoint

    return load_checkpoint(settings.ckpt, dtype="fp32")


def run_arm(
    arm: str,
    seed: int,
    settings: Settings,
    data: Mapping[str, Any],
    out: Path,
    sinks: Mapping[str, JsonLines],
    start: Mapping[str, Any],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Train one arm with one seed; returns its step records and end-of-run numbers."""
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlmcredit.export.trl import VlmCreditGRPOTrainer

    ck = load(settings)
    model, processor = ck.model, ck.processor
    weights = None if arm == "plain" else ArmWeights(arm, settings, seed, processor)
    sinks["evals"].write({"arm": arm, "seed": seed, "step": 0, "shared": True, **start["eval"]})

    def on_eval(model_: Any, step: int) -> None:
        result = evaluate(model_, processor, data["eval"], settings)
        sinks["evals"].write({"arm": arm, "seed": seed, "step": step, **result})
        echo(
            f"  {arm} seed {seed} step {step}: accuracy {result['accuracy']:.3f}, blank "
            f"{result['blank_accuracy']:.3f}, parsed {result['parse_rate']:.2f} "
            f"({result['eval_s']:.1f}s)"
        )

    recorder = make_recorder(arm, seed, settings, weights, on_eval, sinks["steps"])
    args = GRPOConfig(
        output_dir=str(out / "trainer" / f"{arm}-seed{seed}"),
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    common = {
        "model": model,
        "reward_funcs": verifiable_reward,
        "args": args,
        "train_dataset": data["train"],
        "processing_class": processor,
        "callbacks": [recorder],
    }
    if weights is None:
        trainer = GRPOTrainer(**common)
    else:
        trainer = VlmCreditGRPOTrainer(
            **common, weights_fn=weights, loss_denominator=weights.loss_denominator()
        )
    trainer.remove_callback(PrinterCallback)  # the step records go to steps.jsonl instead
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    end_probe = probe(model, processor, data["probe"], settings)
    sinks["probes"].write(
        {"arm": arm, "seed": seed, "when": "end", "step": settings.steps, **end_probe}
    )
    shutil.rmtree(out / "trainer" / f"{arm}-seed{seed}", ignore_errors=True)
    return {"rows": recorder.rows, "train_s": train_s, "probe_end": end_probe}


def kawhi_preflight(settings: Settings, data: Mapping[str, Any]) -> str | None:
    """None when KAWHI's online weights run on a probe batch, else the reason they do not."""
    ck = load(settings)
    batch = teacher_forced_batch(ck.processor, data["probe"][:2])
    try:
        w = ArmWeights("kawhi", settings, 0, ck.processor)(ck.model, batch)
    except (VlmCreditError, ValueError, RuntimeError, KeyError, IndexError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if tuple(w.shape) != tuple(batch["response_mask"].shape):
        shape = tuple(batch["response_mask"].shape)
        return f"weights of shape {tuple(w.shape)} for a batch of {shape}"
    return None


# -- the whole ablation ---------------------------------------------------------------------------
def prepare(out: Path, force: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    taken = [n for n in (*FILES, *FIGURES) if (out / n).exists()]
    if taken and not force:
        raise VlmCreditError(
            f"--out {out}: already holds {', '.join(taken)}; choose a new folder or pass --force"
        )
    for name in taken:
        (out / name).unlink()


def overlap(a: Iterable[Question], b: Iterable[Question]) -> int:
    """Questions asked about identical images in both sets (should be 0)."""
    key = lambda q: (q.text, q.image.tobytes())  # noqa: E731
    return len({key(q) for q in a} & {key(q) for q in b})


def run(
    settings: Settings, out: Path, force: bool = False, echo: Callable[[str], None] = print
) -> dict:
    """The ablation: every arm for every seed, then summary.json and the figures."""
    import torch

    settings.check()
    prepare(out, force)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, out, echo)
    finally:
        torch.set_num_threads(threads)


def _run(settings: Settings, out: Path, echo: Callable[[str], None]) -> dict:
    import torch

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    sinks = {name: JsonLines(out / f"{name}.jsonl") for name in ("steps", "evals", "probes")}
    data = {
        "questions_train": questions(TRAIN_SEED, settings.train_images),
        "eval": questions(EVAL_SEED, settings.eval_images),
        "probe": questions(PROBE_SEED, settings.probe_images),
    }
    data["train"] = train_dataset(data["questions_train"])
    echo(
        f"credit ablation: {settings.ckpt}, arms {','.join(settings.arms)}, seeds "
        f"{','.join(map(str, settings.seeds))}, {settings.steps} steps of "
        f"{settings.prompts_per_step} prompts x {settings.num_generations} completions"
    )
    skipped: dict[str, str] = {}
    arms = list(settings.arms)
    if "kawhi" in arms:
        reason = kawhi_preflight(settings, data)
        if reason is not None:
            skipped["kawhi"] = f"KAWHI's online weights do not run on this batch: {reason}"
            echo(f"skipping arm kawhi: {skipped['kawhi']}")
            arms.remove("kawhi")
    # The start is the same checkpoint for every arm and seed, and evaluation is greedy: once.
    ck = load(settings)
    start = {
        "eval": evaluate(ck.model, ck.processor, data["eval"], settings),
        "probe": probe(ck.model, ck.processor, data["probe"], settings),
    }
    del ck
    sinks["probes"].write({"arm": "*", "seed": "*", "when": "start", "step": 0, **start["probe"]})
    ev, pr = start["eval"], start["probe"]
    echo(
        f"start: accuracy {ev['accuracy']:.3f}, blank {ev['blank_accuracy']:.3f}, parsed "
        f"{ev['parse_rate']:.2f}; probe connectivity mean {pr['connectivity_mean']:.4f}, "
        f"bimodality {pr['bimodality']:.3f}"
    )
    results: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in arms}
    total, done, t_runs = len(arms) * len(settings.seeds), 0, time.perf_counter()
    for seed in settings.seeds:  # seeds outside, arms inside: load drift hits every arm alike
        for arm in arms:
            echo(f"{arm} seed {seed}: {settings.steps} steps")
            results[arm][seed] = run_arm(arm, seed, settings, data, out, sinks, start, echo)
            done += 1
            spent = time.perf_counter() - t_runs
            echo(
                f"  run {done}/{total} done; {spent / 60:.1f} min so far, about "
                f"{spent / done * (total - done) / 60:.1f} min to go"
            )
    shutil.rmtree(out / "trainer", ignore_errors=True)
    summary = summarize(settings, results, start, skipped, out)
    summary["data"] = {
        "train_questions": len(data["questions_train"]),
        "eval_questions": len(data["eval"]),
        "probe_responses": len(data["probe"]),
        "seeds": {"train": TRAIN_SEED, "eval": EVAL_SEED, "probe": PROBE_SEED},
        "train_eval_overlap": overlap(data["questions_train"], data["eval"]),
    }
    summary["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    summary["versions"] = versions()
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["figures"] = [str(p) for p in plot(out)]
    echo(f"wrote {out} in {summary['wall_s']:.0f}s")
    return summary


def versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    import vlmcredit

    return {
        "vlmcredit": vlmcredit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def _spread(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {}
    return {
        "mean": statistics.fmean(vals),
        "min": min(vals),
        "max": max(vals),
        "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


PROBE_KEYS = (
    "connectivity_mean",
    "bimodality",
    "anchor_share",
    "share_above_cut",
    "anchor_share_grounded",
    "anchor_share_verdict",
    "connectivity_grounded",
    "connectivity_verdict",
)


def summarize(
    settings: Settings,
    results: Mapping[str, Mapping[int, Mapping[str, Any]]],
    start: Mapping[str, Any],
    skipped: Mapping[str, str],
    out: Path,
) -> dict[str, Any]:
    """Per arm: final accuracy over seeds, its gain, step time and overhead against plain, grad
    norms, the weights' shares, and the probe at the end."""
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    final = {
        (e["arm"], e["seed"]): e
        for e in evals
        if e["step"] == settings.steps and not e.get("shared")
    }
    wall = {
        (arm, seed): statistics.median([r["wall_s"] for r in res["rows"] if "wall_s" in r])
        for arm, by_seed in results.items()
        for seed, res in by_seed.items()
        if res["rows"]
    }
    per_token = {
        (arm, seed): statistics.median(
            [r["wall_ms_per_completion_token"] for r in res["rows"]]
            if all("wall_ms_per_completion_token" in r for r in res["rows"])
            else [math.nan]
        )
        for arm, by_seed in results.items()
        for seed, res in by_seed.items()
        if res["rows"]
    }
    arms: dict[str, Any] = {}
    for arm, by_seed in results.items():
        seeds = sorted(by_seed)
        rows = [r for s in seeds for r in by_seed[s]["rows"]]
        entry: dict[str, Any] = {
            "seeds": seeds,
            "steps_run": {str(s): len(by_seed[s]["rows"]) for s in seeds},
            "final_accuracy": _spread(
                [final[(arm, s)]["accuracy"] for s in seeds if (arm, s) in final]
            ),
            "final_blank_accuracy": _spread(
                [final[(arm, s)]["blank_accuracy"] for s in seeds if (arm, s) in final]
            ),
            "final_parse_rate": _spread(
                [final[(arm, s)]["parse_rate"] for s in seeds if (arm, s) in final]
            ),
            "accuracy_gain": _spread(
                [
                    final[(arm, s)]["accuracy"] - start["eval"]["accuracy"]
                    for s in seeds
                    if (arm, s) in final
                ]
            ),
            "step_wall_s_median": _spread([wall[(arm, s)] for s in seeds if (arm, s) in wall]),
            "trl_step_time_median": _spread(
                [
                    statistics.median(
                        [r["step_time"] for r in by_seed[s]["rows"] if "step_time" in r]
                        or [math.nan]
                    )
                    for s in seeds
                ]
            ),
            "grad_norm": _spread([r["grad_norm"] for r in rows if "grad_norm" in r]),
            "reward": _spread([r["reward"] for r in rows if "reward" in r]),
            "frac_reward_zero_std": _spread(
                [r["frac_reward_zero_std"] for r in rows if "frac_reward_zero_std" in r]
            ),
            "train_s": _spread([by_seed[s]["train_s"] for s in seeds]),
        }
        if "plain" in results:
            entry["overhead_vs_plain"] = _spread(
                [
                    wall[(arm, s)] / wall[("plain", s)]
                    for s in seeds
                    if (arm, s) in wall and ("plain", s) in wall and wall[("plain", s)] > 0
                ]
            )
            # completions grow or shrink differently per arm: the same ratio per completion token
            entry["overhead_vs_plain_per_token"] = _spread(
                [
                    per_token[(arm, s)] / per_token[("plain", s)]
                    for s in seeds
                    if (arm, s) in per_token and ("plain", s) in per_token
                ]
            )
        for key in ("selected_share", "anchor_share", "selected_anchor_overlap",
                    "connectivity_mean", "connectivity_selected_mean", "weight_mean"):  # fmt: skip
            values = [r[f"w/{key}"] for r in rows if f"w/{key}" in r]
            if values:
                entry[f"batch_{key}"] = _spread(values)
        entry["probe_end"] = {
            k: _spread([by_seed[s]["probe_end"][k] for s in seeds]) for k in PROBE_KEYS
        }
        arms[arm] = entry
    return {
        "settings": asdict(settings),
        "start": {
            "eval": {k: v for k, v in start["eval"].items() if k != "examples"},
            "probe": {k: start["probe"][k] for k in PROBE_KEYS},
        },
        "arms": arms,
        "skipped": dict(skipped),
        "files": [*FILES, *FIGURES],
    }


# -- figures --------------------------------------------------------------------------------------
COLORS = {
    "plain": "#4c4c4c",
    "anchors": "#e6550d",
    "low": "#3182bd",
    "random": "#31a354",
    "kawhi": "#756bb1",
}


def plot(out: Path) -> list[Path]:
    """accuracy.png / .svg: held-out and blank-image accuracy against step, one line per arm
    (mean over seeds), the band spanning the seeds' min..max."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    arms = [a for a in ARMS if any(e["arm"] == a for e in evals)]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2, sharey=True)
    for ax, key, title in (
        (panels[0], "accuracy", "held-out accuracy (greedy)"),
        (panels[1], "blank_accuracy", "same questions, blank image"),
    ):
        for arm in arms:
            by_step: dict[int, list[float]] = {}
            for e in evals:
                if e["arm"] == arm:
                    by_step.setdefault(int(e["step"]), []).append(float(e[key]))
            steps = sorted(by_step)
            mean = [float(np.mean(by_step[s])) for s in steps]
            lo = [min(by_step[s]) for s in steps]
            hi = [max(by_step[s]) for s in steps]
            color = COLORS.get(arm)
            ax.plot(steps, mean, marker="o", ms=3, color=color, label=arm)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.axhline(0.5, color="#bbbbbb", linewidth=0.8, linestyle=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.spines[["top", "right"]].set_visible(False)
    panels[0].set_ylabel("accuracy")
    panels[1].legend(frameon=False, fontsize=8, loc="lower right")
    written = []
    for name in FIGURES:
        buf = io.BytesIO()
        fmt = name.rsplit(".", 1)[1]
        meta = {"Software": None} if fmt == "png" else {"Date": None}
        fig.savefig(buf, format=fmt, dpi=130, metadata=meta)
        (out / name).write_bytes(buf.getvalue())
        written.append(out / name)
    return written


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the results")
    p.add_argument("--ckpt", default=d.ckpt, help=f"checkpoint (default {d.ckpt})")
    p.add_argument("--arms", default=",".join(d.arms), help="comma list of " + ",".join(ARMS))
    p.add_argument("--seeds", default=None, help="comma list (default 0,1; --smoke: 0)")
    p.add_argument(
        "--steps", type=int, default=None, help=f"GRPO steps per arm (default {d.steps})"
    )
    p.add_argument("--eval-every", type=int, default=None, help=f"default {d.eval_every}")
    p.add_argument(
        "--prompts", type=int, default=None, help=f"prompts per step ({d.prompts_per_step})"
    )
    p.add_argument(
        "--generations", type=int, default=None, help=f"group size ({d.num_generations})"
    )
    p.add_argument(
        "--max-completion-length", type=int, default=None, help=str(d.max_completion_length)
    )
    p.add_argument("--lr", type=float, default=d.learning_rate, help=f"default {d.learning_rate}")
    p.add_argument("--ratio", type=float, default=d.ratio, help=f"anchor share ({d.ratio})")
    p.add_argument(
        "--train-images", type=int, default=None, help=f"per category ({d.train_images})"
    )
    p.add_argument("--eval-images", type=int, default=None, help=f"per category ({d.eval_images})")
    p.add_argument(
        "--probe-images", type=int, default=None, help=f"per category ({d.probe_images})"
    )
    p.add_argument("--kawhi-heads", default=d.kawhi_heads, help="all, or head indices 0,1,3")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch threads (default 1; 0: torch's default)",
    )
    p.add_argument("--smoke", action="store_true", help="2 steps per arm, tiny eval (a check)")
    p.add_argument("--force", action="store_true", help="overwrite the results in --out")
    p.add_argument("--plot-only", action="store_true", help="redraw the figures of --out")
    a = p.parse_args(argv)
    base = replace(d, **SMOKE) if a.smoke else d
    given = {
        "steps": a.steps,
        "eval_every": a.eval_every,
        "prompts_per_step": a.prompts,
        "num_generations": a.generations,
        "max_completion_length": a.max_completion_length,
        "train_images": a.train_images,
        "eval_images": a.eval_images,
        "probe_images": a.probe_images,
    }
    try:
        seeds = tuple(
            int(s) for s in (a.seeds or ("0" if a.smoke else "0,1")).split(",") if s.strip()
        )
    except ValueError:
        raise VlmCreditError(f"--seeds {a.seeds!r}: write a comma list like 0,1") from None
    settings = replace(
        base,
        **{k: v for k, v in given.items() if v is not None},
        ckpt=a.ckpt,
        arms=tuple(x.strip() for x in a.arms.split(",") if x.strip()),
        seeds=seeds,
        learning_rate=a.lr,
        ratio=a.ratio,
        kawhi_heads=a.kawhi_heads,
        threads=a.threads,
        smoke=a.smoke,
    )
    return settings, a


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, a = parse_args(argv)
        if a.plot_only:
            for path in plot(a.out):
                print(f"wrote {path}")
            return 0
        run(settings, a.out, force=a.force)
    except VlmCreditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
