"""Rollout checks that need the checkpoint, run before a run folder is written.

The reader (`vlmcredit.data.rollouts`) checks what a file alone can say; token ids given by a
trainer also have to fit this checkpoint's vocabulary, and `prompt_ids` have to be the prompt
the chat template gives (`vlmcredit.models.inputs.check_token_ids`). A failing sample stops the
command before any output, or with `--skip-bad` becomes a recorded bad row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmcredit.data.rollouts import RolloutKeys
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError
from vlmcredit.models.inputs import check_token_ids

ROLLOUT_KEY_FIELDS = ("prompt_key", "image_key", "response_key")


def rollout_keys(cfg: Any) -> RolloutKeys:
    """The column names a pipeline config carries (`--prompt-key` and friends)."""
    return RolloutKeys(prompt=cfg.prompt_key, images=cfg.image_key, response=cfg.response_key)


def screen_samples(
    ck: Any, samples: Sequence[Sample], skip_bad: bool
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """(good samples, samples.parquet rows of the bad ones); raises at the first bad one
    unless `skip_bad`."""
    good: list[Sample] = []
    bad: list[dict[str, Any]] = []
    for sample in samples:
        if not isinstance(sample.response, list) and sample.prompt_ids is None:
            good.append(sample)  # nothing given as ids: the tokenizer makes them in range
            continue
        try:
            check_token_ids(ck.processor, ck.geometry, sample)
        except VlmCreditError as exc:
            if not skip_bad:
                raise VlmCreditError(f"{exc} (or pass --skip-bad to skip such rows)") from None
            bad.append(
                {
                    "id": sample.id,
                    "sample_id": sample.trainer_id,
                    "completion_index": sample.completion_index,
                    "row": sample.meta.get("row"),
                    "status": "bad",
                    "error": str(exc),
                }
            )
            continue
        good.append(sample)
    return good, bad


def load_and_screen(cfg: Any, samples: Sequence[Sample]) -> tuple[Any, list[Sample], list[dict]]:
    """(checkpoint, screened samples, bad rows) for a pipeline config with the usual checkpoint
    options; refuses a data file left with no usable sample before or after screening."""
    from vlmcredit.models.loading import load_checkpoint

    if not samples:
        raise VlmCreditError(f"--data {cfg.data}: no usable samples")
    ck = load_checkpoint(cfg.ckpt, cfg.dtype, cfg.device, cfg.device_map, cfg.trust_remote_code)
    good, bad = screen_samples(ck, samples, cfg.skip_bad)
    if not good:
        raise VlmCreditError(f"--data {cfg.data}: no usable samples")
    return ck, good, bad
