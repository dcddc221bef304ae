"""VERL rollouts -> the rollouts file vlmcredit reads (docs/FORMATS.md "Rollout files").

Two sources:

- a VERL batch (`DataProto` as the legacy trainer holds it, or the v1 trainer's TransferQueue
  fields padded with `to_padded_tensor()`): `VerlRolloutWriter(path).write(batch)` appends one
  JSONL row per response: `id` (`extra_info[sample_id_key]`, the key replay looks up; the same
  for a whole GRPO group), `completion_index` (order within the group; a prompt sampled again
  later continues the count), `prompt_ids` (unpadded), `response_ids` (the response tokens
  under `attention_mask`, EOS included, exactly as sampled), `messages` (VERL's `raw_prompt`
  with each `<image>` placeholder made an image part, where VERL's dataset puts the image),
  `images` (PNG files in `<stem>.images/`), `reward` (sum of `token_level_scores`/`rm_scores`),
  `advantage` (VERL's, before vlmcredit's weighting) and `uid`.
- `trainer.rollout_data_dir` dumps (`<step>.jsonl` from `_dump_generations`): VERL writes the
  prompt and response decoded with `skip_special_tokens=True` and no images, so token ids,
  EOS and image positions are gone. `read_generation_dump` turns them into text rows for
  inspection; it refuses to pretend they are replayable (they carry no `response_ids`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from vlmcredit.data.rollouts import IMAGE_PLACEHOLDER, split_image_placeholders
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_bytes

log = logging.getLogger(__name__)


def _has(batch: Any, key: str) -> bool:
    return key in batch.keys()  # noqa: SIM118  (TensorDict has no `in`)


def _messages(raw_prompt: Any) -> list[dict[str, Any]]:
    """VERL's chat list with `<image>` placeholders split into processor-style parts."""
    out = []
    for message in raw_prompt:
        content = message.get("content")
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            content = split_image_placeholders(content)
        out.append({**message, "content": content})
    return out


class VerlRolloutWriter:
    """Appends the responses of VERL batches to a rollouts JSONL file."""

    def __init__(self, path: str | os.PathLike[str], sample_id_key: str = "sample_id") -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size > 0:
            raise VlmCreditError(f"{self.path}: exists and is not empty; choose a new file")
        self.sample_id_key = sample_id_key
        self.rows_written = 0
        self._seen: dict[str, int] = {}

    def rows(self, data: Any) -> list[dict[str, Any]]:
        """The rows of one batch (images still PIL), completion indices assigned."""
        batch, extra = data.batch, data.non_tensor_batch
        for key in ("prompts", "responses", "attention_mask"):
            if not _has(batch, key):
                raise VlmCreditError(f"VERL batch has no {key!r}; record after generation")
        infos = extra.get("extra_info")
        if infos is None:
            raise VlmCreditError(
                f"VERL batch has no extra_info; put each prompt's id in extra_info."
                f"{self.sample_id_key} of the training parquet"
            )
        prompt_len = batch["prompts"].shape[1]
        scores_key = next((k for k in ("token_level_scores", "rm_scores") if _has(batch, k)), None)
        rows = []
        for b in range(len(batch["prompts"])):
            info = infos[b]
            if not isinstance(info, dict) or info.get(self.sample_id_key) is None:
                raise VlmCreditError(
                    f"VERL batch row {b}: extra_info has no {self.sample_id_key!r}; put the "
                    f"prompt id in extra_info.{self.sample_id_key} of the training parquet"
                )
            sample_id = str(info[self.sample_id_key])
            attention = batch["attention_mask"][b].bool()
            index = self._seen.get(sample_id, 0)
            self._seen[sample_id] = index + 1
            row: dict[str, Any] = {
                "id": sample_id,
                "completion_index": index,
                "prompt_ids": batch["prompts"][b][attention[:prompt_len]].tolist(),
                "response_ids": batch["responses"][b][attention[prompt_len:]].tolist(),
            }
            if "raw_prompt" in extra:
                row["messages"] = _messages(list(extra["raw_prompt"][b]))
            mm = extra.get("multi_modal_data")
            row["images"] = list((mm[b] or {}).get("image") or []) if mm is not None else []
            if scores_key is not None:
                row["reward"] = float(batch[scores_key][b].sum())
            if _has(batch, "advantages"):
                valid = batch["advantages"][b][attention[prompt_len:]]
                row["advantage"] = float(valid[0]) if len(valid) else 0.0
            if "uid" in extra:
                row["uid"] = str(extra["uid"][b])
            rows.append(row)
        return rows

    def write(self, data: Any) -> int:
        """Append the batch's rows; returns how many were written."""
        rows = self.rows(data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                row["images"] = [self._save_image(image) for image in row["images"]]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows_written += len(rows)
        return len(rows)

    def _save_image(self, image: Any) -> str:
        """The image as a PNG beside the rollouts file (lossless), named by content hash."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        folder = self.path.with_name(f"{self.path.stem}.images")
        name = f"{hashlib.sha1(data).hexdigest()[:20]}.png"
        if not (folder / name).exists():
            atomic_write_bytes(folder / name, data)
        return f"{folder.name}/{name}"


def read_generation_dump(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a `trainer.rollout_data_dir` dump (`<step>.jsonl`): `id` and `completion_index`
    from VERL's key `{uid}_{session}_{turn}` (`uid` column), `prompt` and `response` as VERL
    decoded them, `reward` (`score`), `step`. Text only: no token ids or images survive VERL's
    decode, so these rows are for reading, and a replay cannot match them."""
    path = Path(path)
    if not path.is_file():
        raise VlmCreditError(
            f"{path}: no such VERL rollout dump (trainer.rollout_data_dir/N.jsonl)"
        )
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = str(entry["uid"])
            uid, session, _turn = key.rsplit("_", 2)
            rows.append(
                {
                    "id": uid,
                    "completion_index": int(session),
                    "prompt": entry["input"],
                    "response": entry["output"],
                    "reward": entry.get("score"),
                    "step": entry.get("step"),
                }
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise VlmCreditError(
                f"{path} line {line_no}: not a VERL generation dump row with a "
                f"'{{uid}}_{{session}}_{{turn}}' uid ({type(exc).__name__}: {exc})"
            ) from None
    return rows
