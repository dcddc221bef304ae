"""Record a TRL GRPO run's rollouts, as sampled, into a rollouts file vlmcredit reads.

    recorder = record_rollouts(trainer, "runs/rollouts.jsonl")   # any trl.GRPOTrainer
    VlmCreditGRPOTrainer(..., record_rollouts="runs/rollouts.jsonl")   # or built in

One JSONL row per completion of every training batch: `id` (the dataset's sample id, the same
for every completion of a prompt), `completion_index` (index within its group; a prompt
sampled again later continues the count, so (id, completion_index) stays unique), `images`
(PNG files in `<file stem>.images/`, named by content hash, paths relative to the file),
`messages` (the chat list exactly as TRL rendered it, with an `{"type": "image"}` part where
each image went) or `prompt` (text), `prompt_ids` (the prompt token ids TRL fed, no padding),
`response_ids` (the completion token ids exactly as sampled, EOS included), `response` (the
decoded text, informational), `reward` (weighted sum over the reward functions), `advantage`
(TRL's, before any vlmcredit weighting) and `step`. The file is what `vlmcredit anchors` /
`weights` read and what a replay with `signals=` then matches: signals rows are keyed by
(id, sha1 of response_ids), the key the trainer looks up.

Only the training batches are recorded. Completions whose loss mask TRL zeroed
(`mask_truncated_completions`) carry no loss and no recoverable length; they are skipped and
counted in `RolloutRecorder.skipped`. With several processes each writes its own file
(`<stem>.rank<k>.jsonl`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_bytes

log = logging.getLogger(__name__)


class RolloutRecorder:
    """Appends the rollouts of each training batch of one trainer to a JSONL file."""

    def __init__(self, path: str | os.PathLike[str], sample_id_column: str = "sample_id") -> None:
        self.path = Path(path)
        self.sample_id_column = sample_id_column
        self.rows_written = 0
        self.skipped = 0
        self._groups_seen: dict[str, int] = {}
        self._rewards: Any = None  # the last batch's rewards per function (all processes)
        self._file: Path | None = None

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, trainer: Any, wrap_generation: bool = True) -> RolloutRecorder:
        """Hook into `trainer` (a `trl.GRPOTrainer`): capture its rewards and, with
        `wrap_generation`, record every batch it generates."""
        columns = getattr(trainer.train_dataset, "column_names", None)
        if columns is not None and self.sample_id_column not in columns:
            raise VlmCreditError(
                f"train_dataset has no {self.sample_id_column!r} column; rollouts are recorded "
                "under the dataset's sample ids (pass sample_id_column=...)"
            )
        target = self.path
        if trainer.accelerator.num_processes > 1:
            rank = trainer.accelerator.process_index
            target = self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")
        if target.exists() and target.stat().st_size > 0:
            raise VlmCreditError(f"{target}: exists and is not empty; choose a new rollouts file")
        target.parent.mkdir(parents=True, exist_ok=True)
        self._file = target
        calculate = trainer._calculate_rewards

        def calculate_and_keep(*args: Any, **kwargs: Any) -> Any:
            self._rewards = calculate(*args, **kwargs)
            return self._rewards

        trainer._calculate_rewards = calculate_and_keep
        if wrap_generation:
            generate: Callable[..., Any] = trainer._generate_and_score_completions

            def generate_and_record(inputs: list[dict[str, Any]]) -> Any:
                output = generate(inputs)
                self.record(trainer, inputs, output)
                return output

            trainer._generate_and_score_completions = generate_and_record
        return self

    # -- recording ----------------------------------------------------------------------------
    def record(self, trainer: Any, inputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
        """Append the rows of one generated batch (`inputs` as the trainer received them,
        `output` as `_generate_and_score_completions` returned them, before any weighting)."""
        if self._file is None:
            raise VlmCreditError("RolloutRecorder: call attach(trainer) before recording")
        if not trainer.model.training:
            return  # evaluation batches are not rollouts a replay trains on
        if output.get("tool_mask") is not None:
            raise VlmCreditError(
                "record_rollouts: tool-calling completions hold tool output tokens the model did "
                "not sample; recording them is not supported"
            )
        advantages = output["advantages"]
        if advantages.dim() != 1:
            raise VlmCreditError(
                "record_rollouts: the advantages are already weighted per token; record with "
                "VlmCreditGRPOTrainer(record_rollouts=...) instead of wrapping it"
            )
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        rewards = self._local_rewards(trainer, len(inputs))
        generations = trainer.num_generations
        first = trainer.accelerator.process_index * len(inputs)
        group_offset: dict[int, int] = {}
        lines = []
        for i, example in enumerate(inputs):
            sample_id = self._sample_id(example)
            group, within = divmod(first + i, generations)
            if group not in group_offset:
                group_offset[group] = self._groups_seen.get(sample_id, 0)
                self._groups_seen[sample_id] = group_offset[group] + 1
            mask = output["completion_mask"][i].bool()
            if not bool(mask.any()):
                self.skipped += 1
                continue
            response_ids = output["completion_ids"][i][mask].tolist()
            prompt_ids = output["prompt_ids"][i][output["prompt_mask"][i].bool()].tolist()
            images = _example_images(example)
            row: dict[str, Any] = {
                "id": sample_id,
                "completion_index": group_offset[group] * generations + within,
                "images": [self._save_image(image) for image in images],
                "prompt_ids": prompt_ids,
                "response_ids": response_ids,
                "response": tokenizer.decode(response_ids, skip_special_tokens=True),
                "reward": rewards[i],
                "advantage": float(advantages[i]),
                "step": int(trainer.state.global_step),
            }
            row.update(_prompt_fields(example["prompt"], images))
            lines.append(json.dumps(row, ensure_ascii=False))
        if self.skipped:
            log.warning("record_rollouts: %d completions with an empty loss mask", self.skipped)
        with open(self._file, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        self.rows_written += len(lines)

    def _sample_id(self, example: dict[str, Any]) -> str:
        value = example.get(self.sample_id_column)
        if value is None or value == "":
            raise VlmCreditError(
                f"a training example has no {self.sample_id_column!r}; every row needs its id"
            )
        return str(value)

    def _local_rewards(self, trainer: Any, n: int) -> list[float | None]:
        """This process's rewards (TRL's weighted sum; None where every function gave None)."""
        import torch

        if self._rewards is None:
            raise VlmCreditError("record_rollouts: the trainer computed no rewards for this batch")
        per_func = self._rewards
        weights = trainer.reward_weights.to(per_func.device).unsqueeze(0)
        total = (per_func * weights).nansum(dim=1)
        total[torch.isnan(per_func).all(dim=1)] = torch.nan
        start = trainer.accelerator.process_index * n
        local = total[start : start + n].tolist()
        self._rewards = None
        return [None if v != v else float(v) for v in local]

    def _save_image(self, image: Any) -> str:
        """The image as a PNG beside the rollouts file (lossless), by content hash."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        assert self._file is not None
        folder = self._file.with_name(f"{self._file.stem}.images")
        name = f"{hashlib.sha1(data).hexdigest()[:20]}.png"
        if not (folder / name).exists():
            atomic_write_bytes(folder / name, data)
        return f"{folder.name}/{name}"


def record_rollouts(
    trainer: Any, path: str | os.PathLike[str], sample_id_column: str = "sample_id"
) -> RolloutRecorder:
    """Record the rollouts of a `trl.GRPOTrainer` into `path` (JSONL) as it trains."""
    if hasattr(trainer, "weights_fn"):
        raise VlmCreditError(
            "record_rollouts: pass record_rollouts=PATH to VlmCreditGRPOTrainer instead (it "
            "records the advantages before weighting them)"
        )
    return RolloutRecorder(path, sample_id_column).attach(trainer)


def _example_images(example: dict[str, Any]) -> list[Any]:
    """The images TRL gives this example (its `images` list, or its single `image`)."""
    if "images" in example:
        return list(example.get("images") or [])
    image = example.get("image")
    return [] if image is None else [image]


def _prompt_fields(prompt: Any, images: list[Any]) -> dict[str, Any]:
    """`messages` as TRL renders them (image parts placed where TRL places them), or `prompt`."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    from trl.data_utils import prepare_multimodal_messages

    messages = prepare_multimodal_messages(prompt, images=images) if images else prompt
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image"} if part.get("type") == "image" else dict(part) for part in content
            ]
        out.append({**message, "content": content})
    return {"messages": out}
