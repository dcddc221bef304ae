"""Rollout readers: JSONL, parquet and VERL/EasyR1-style parquet files -> `Sample`s.

Every format holds one rollout per row: `id`, `images` (a list of image refs: paths relative to
the data file, bytes, or {"bytes", "path"} structs), `response` and/or `response_ids`, and
either `prompt` (text) or `messages` (a chat list in the processor's format). VERL files keep
the chat list in `prompt`, EasyR1 files a plain string (its `prompt_key`, e.g. `problem`); in
both, `<image>` placeholders in string contents are split into processor-style parts with each
image at its placeholder (what VERL's `RLHFDataset._build_messages` and EasyR1's dataset do), so
the prompt analysed is the prompt trained on. `RolloutKeys` names the columns (`--prompt-key`,
`--image-key`, `--response-key`).

Trainer rollouts (docs/FORMATS.md "Rollout files"): `id` is the trainer's sample id and repeats
across a GRPO group; `completion_index` tells the group's rows apart (or their responses do);
`response_ids` are the sampled token ids, EOS included, used as given; `prompt_ids` the prompt
ids the trainer fed (checked against the templated prompt, or used as the prompt); `reward` and
`advantage` go into `Sample.meta`. A group member's run id is `f"{id}#{completion_index}"`
(without an index: `id`, then `id#1`, `id#2`... in file order); `Sample.sample_id` keeps `id`.

Rows are numbered from 0 in file order. A bad row stops the read with a one-line
`VlmCreditError`, or is skipped and recorded in `RolloutSet.bad_rows` with `skip_bad=True`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmcredit.data.images import ImageLoadError, image_ref, load_image
from vlmcredit.data.rollout_files import (
    RawRow,
    check_file,
    jsonl_rows,
    one_line,
    parquet_format,
    parquet_rows,
    parquet_schema,
    refuse_json_array,
    type_name,
)
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError

IMAGE_PLACEHOLDER = "<image>"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("jsonl", "parquet", "verl")

_TRAINER_FIELDS = ("response_ids", "prompt_ids", "completion_index", "reward", "advantage")
_SKIP_HINT = "fix the row or pass --skip-bad to skip bad rows"


@dataclass(frozen=True)
class RolloutKeys:
    """Which columns hold the prompt, the images and the response (EasyR1: prompt="problem")."""

    prompt: str = "prompt"
    images: str = "images"
    response: str = "response"

    def fields(self) -> frozenset[str]:
        """The columns a Sample is built from (everything else goes to meta["extra"])."""
        return frozenset({"id", "messages", self.prompt, self.images, self.response})


DEFAULT_KEYS = RolloutKeys()


@dataclass
class BadRow:
    """A row that could not be read; `error` is one line starting with "row N"."""

    row: int
    id: str | None
    error: str

    def record(self) -> dict[str, object]:
        """The run table row (samples.parquet) that records this skipped row."""
        sample_id = f"row-{self.row}" if self.id is None else self.id
        return {"id": sample_id, "row": self.row, "status": "bad", "error": self.error}


@dataclass
class RolloutSet:
    """The samples read from one file, plus the rows skipped with `skip_bad`."""

    samples: list[Sample]
    bad_rows: list[BadRow] = field(default_factory=list)
    format: str = "jsonl"
    path: Path = field(default_factory=Path)

    def __len__(self) -> int:
        return len(self.samples)


def read_rollouts(
    path: str | Path,
    *,
    skip_bad: bool = False,
    max_samples: int | None = None,
    require_response: bool = True,
    keys: RolloutKeys = DEFAULT_KEYS,
) -> RolloutSet:
    """Read a rollout file (format detected from its suffix and columns) into memory.

    Without `skip_bad` the first bad row raises `VlmCreditError`; with it, bad rows are skipped
    and listed in `bad_rows`. `max_samples` stops after that many good samples.
    `require_response=False` reads prompt-only files (missing responses become "").
    """
    src, fmt, rows = _open(path, max_samples, require_response, keys)
    bad_rows: list[BadRow] = []
    samples = list(_samples(src, rows, skip_bad, max_samples, require_response, bad_rows, keys))
    return RolloutSet(samples=samples, bad_rows=bad_rows, format=fmt, path=src)


def iter_rollouts(
    path: str | Path,
    *,
    skip_bad: bool = False,
    max_samples: int | None = None,
    require_response: bool = True,
    bad_rows: list[BadRow] | None = None,
    keys: RolloutKeys = DEFAULT_KEYS,
) -> Iterator[Sample]:
    """Like `read_rollouts`, but yield samples one at a time (images decoded as rows are read).

    File-level problems raise at once; row problems raise (or are appended to `bad_rows` with
    `skip_bad`) when the iteration reaches that row.
    """
    src, _fmt, rows = _open(path, max_samples, require_response, keys)
    return _samples(src, rows, skip_bad, max_samples, require_response, bad_rows, keys)


def detect_format(path: str | Path, keys: RolloutKeys = DEFAULT_KEYS) -> str:
    """ "jsonl", "parquet" or "verl" for a rollout file; raises `VlmCreditError` otherwise."""
    src = check_file(Path(path))
    suffix = src.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        refuse_json_array(src)
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return parquet_format(parquet_schema(src), keys.prompt, keys.images)
    raise VlmCreditError(
        f"{src}: unknown rollout file type {suffix or '(no suffix)'!r}; "
        f"give a .jsonl (one JSON object per line) or .parquet file"
    )


def split_image_placeholders(text: str) -> list[dict[str, Any]]:
    """Turn "<image>Describe it." into [{"type": "image"}, {"type": "text", "text": ...}].

    The rule of EasyR1's dataset and VERL's `_build_messages`: split on "<image>", an image part
    at each placeholder, a text part for each non-empty piece.
    """
    parts: list[dict[str, Any]] = []
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k > 0:
            parts.append({"type": "image"})
        if chunk:  # text around adjacent or edge placeholders is empty: no part for it
            parts.append({"type": "text", "text": chunk})
    return parts


# --- opening files ------------------------------------------------------------------------


class _RowError(Exception):
    """A problem confined to one row, so `skip_bad` can skip it."""

    def __init__(self, message: str, sample_id: str | None = None) -> None:
        super().__init__(message)
        self.sample_id = sample_id


def _open(
    path: str | Path, max_samples: int | None, require_response: bool, keys: RolloutKeys
) -> tuple[Path, str, Iterator[RawRow]]:
    """Check everything file-level now, so lazy readers fail before their first row."""
    if max_samples is not None and max_samples < 0:
        raise VlmCreditError(f"max_samples must be >= 0, got {max_samples}")
    src = Path(path)
    fmt = detect_format(src, keys)
    if fmt == "jsonl":
        return src, fmt, jsonl_rows(src)
    _check_columns(src, parquet_schema(src).names, require_response, keys)
    return src, fmt, parquet_rows(src)


def _check_columns(path: Path, names: list[str], require_response: bool, keys: RolloutKeys) -> None:
    # A column missing from the whole file spoils every row; skipping rows cannot help.
    missing = [] if keys.images in names else [f"'{keys.images}'"]
    prompts = [keys.prompt, *(["messages"] if keys.prompt == "prompt" else []), "prompt_ids"]
    if not set(prompts) & set(names):
        missing.append(" or ".join(f"'{k}'" for k in prompts))
    if require_response and keys.response not in names and "response_ids" not in names:
        missing.append(f"'{keys.response}' or 'response_ids'")
    if not missing:
        return
    only_response = len(missing) == 1 and "response_ids" in missing[0]
    hint = "; or read prompts only with require_response=False" if only_response else ""
    hint += "; or name the columns with --prompt-key/--image-key/--response-key"
    raise VlmCreditError(
        f"{path}: no {', '.join(missing)} column (columns: {', '.join(names)}); add it{hint}"
    )


# --- rows -> samples ----------------------------------------------------------------------


@dataclass
class _Seen:
    """What earlier good rows claimed: for duplicate detection and unique run ids."""

    group: dict[tuple[str, int], int] = field(default_factory=dict)  # (id, index) -> row
    response: dict[tuple[str, str], int] = field(default_factory=dict)  # (id, digest) -> row
    run_ids: dict[str, int] = field(default_factory=dict)  # run id -> row
    unindexed: dict[str, int] = field(default_factory=dict)  # id -> rows without an index


@dataclass
class _Claim:
    """The keys a row claims once it is known to be good."""

    trainer_id: str
    index: int | None
    digest: str
    run_id: str


def _samples(
    path: Path,
    rows: Iterator[RawRow],
    skip_bad: bool,
    max_samples: int | None,
    require_response: bool,
    bad_rows: list[BadRow] | None,
    keys: RolloutKeys = DEFAULT_KEYS,
) -> Iterator[Sample]:
    seen = _Seen()
    count = 0
    if max_samples == 0:
        return
    for raw in rows:
        try:
            sample, claim = _build_sample(path, raw, seen, require_response, keys)
        except _RowError as exc:
            bad = BadRow(raw.row, exc.sample_id, one_line(f"{raw.label}: {exc}"))
            if not skip_bad:
                raise VlmCreditError(f"{path}: {bad.error}; {_SKIP_HINT}") from None
            if bad_rows is not None:
                bad_rows.append(bad)
            continue
        # only a good row claims its keys: a skipped row's id stays free for a later row
        if claim.index is None:
            seen.response[(claim.trainer_id, claim.digest)] = raw.row
            seen.unindexed[claim.trainer_id] = seen.unindexed.get(claim.trainer_id, 0) + 1
        else:
            seen.group[(claim.trainer_id, claim.index)] = raw.row
        seen.run_ids[claim.run_id] = raw.row
        yield sample
        count += 1
        if max_samples is not None and count >= max_samples:
            return  # stop before reading (and decoding images of) further rows


def _build_sample(
    path: Path, raw: RawRow, seen: _Seen, require_response: bool, keys: RolloutKeys
) -> tuple[Sample, _Claim]:
    if raw.record is None:
        raise _RowError(raw.error or "unreadable row")
    record = raw.record
    explicit_id = _explicit_id(record)
    try:
        index = _completion_index(record)
        response_ids = _token_ids(record, "response_ids")
        prompt_ids = _token_ids(record, "prompt_ids")
        if explicit_id is None and (
            index is not None or response_ids is not None or prompt_ids is not None
        ):
            raise _RowError(
                "missing 'id': a row with completion_index, response_ids or prompt_ids is a "
                "trainer rollout; give the trainer's sample id (signals are looked up by it)"
            )
        trainer_id = explicit_id if explicit_id is not None else f"row-{raw.row}"
        text = _response(record, keys.response, require_response and response_ids is None)
        response = response_ids if response_ids is not None else text
        claim = _claim(seen, trainer_id, index, response)
        refs = _image_list(record, keys.images)
        prompt, label = _prompt(record, keys, prompt_ids is not None)
        _check_image_parts(prompt, len(refs), label)
        images = _load_images(path, raw.row, refs)
    except _RowError as exc:
        exc.sample_id = explicit_id
        raise
    meta: dict[str, Any] = {
        "row": raw.row,
        "image_refs": [image_ref(ref) for ref in refs],
        "source": str(path),
        "extra": {
            k: v for k, v in record.items() if k not in keys.fields() and k not in _TRAINER_FIELDS
        },
    }
    if raw.line is not None:
        meta["line"] = raw.line
    if response_ids is not None and text:
        meta["response_text"] = text  # the ids are what is analysed; the text is kept beside
    for name in ("reward", "advantage"):
        value = _number(record, name)
        if value is not None:
            meta[name] = value
    sample = Sample(
        images=images,
        prompt=prompt,
        response=response,
        id=claim.run_id,
        meta=meta,
        sample_id=trainer_id,
        completion_index=index,
        prompt_ids=prompt_ids,
    )
    return sample, claim


def _claim(seen: _Seen, trainer_id: str, index: int | None, response: str | list[int]) -> _Claim:
    """The row's run id; refuses a row no index or response tells apart from an earlier one."""
    digest = _digest(response)
    if index is not None:
        first = seen.group.get((trainer_id, index))
        if first is not None:
            raise _RowError(
                f"duplicate id {trainer_id!r} with completion_index {index} (first seen at row "
                f"{first})"
            )
        run_id = f"{trainer_id}#{index}"
    else:
        first = seen.response.get((trainer_id, digest))
        if first is not None:
            raise _RowError(
                f"duplicate id {trainer_id!r} (first seen at row {first}) with the same "
                "response; give the completions of a group their completion_index"
            )
        n = seen.unindexed.get(trainer_id, 0)
        run_id = trainer_id if n == 0 else f"{trainer_id}#{n}"
    taken = seen.run_ids.get(run_id)
    if taken is not None:
        raise _RowError(
            f"run id {run_id!r} is already the id of row {taken}; give every row of the "
            f"group {trainer_id!r} a completion_index"
        )
    return _Claim(trainer_id, index, digest, run_id)


def _digest(response: str | list[int]) -> str:
    """A short key of a response: text and token ids never compare equal."""
    data = response if isinstance(response, str) else ",".join(map(str, response))
    kind = "text" if isinstance(response, str) else "ids"
    return f"{kind}:{hashlib.sha1(data.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _explicit_id(record: dict[str, Any]) -> str | None:
    """The `id` field, else VERL's extra_info sample_id/index; None when there is none."""
    value = record.get("id")
    if value is None or value == "":
        extra = record.get("extra_info")
        if not isinstance(extra, dict):
            return None
        value = extra.get("sample_id")
        if value is None or value == "":
            value = extra.get("index")
        if value is None or value == "":
            return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(f"id must be text or an integer, got {type_name(value)}")
    return str(value)


def _completion_index(record: dict[str, Any]) -> int | None:
    value = record.get("completion_index")
    if value is None:
        return None
    if not _is_token_id(value):  # same rule: a non-negative integer, not a bool
        raise _RowError(f"'completion_index' must be an integer >= 0, got {value!r}")
    return int(value)


def _token_ids(record: dict[str, Any], column: str) -> list[int] | None:
    """A list of token ids as given (None when the column is absent or null)."""
    value = record.get(column)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _RowError(f"'{column}' must be a list of token ids, got {type_name(value)}")
    if not value:
        raise _RowError(f"'{column}' is empty; give the token ids (EOS included) or leave it out")
    for k, token in enumerate(value):
        if not _is_token_id(token):
            raise _RowError(f"'{column}'[{k}] must be a token id (an integer >= 0), got {token!r}")
    return [int(t) for t in value]


def _number(record: dict[str, Any], column: str) -> float | None:
    value = record.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RowError(f"'{column}' must be a finite number, got {value!r}")
    return float(value)


def _prompt(
    record: dict[str, Any], keys: RolloutKeys, has_prompt_ids: bool
) -> tuple[str | list[dict[str, Any]] | None, str]:
    """The prompt as text or processor-style messages (None when only prompt_ids carry it), and
    how errors name it."""
    # `messages` wins when both are present: it is the more specific of the two. A named
    # --prompt-key is the only prompt column the trainer reads, so it is the only one read here.
    if keys.prompt == DEFAULT_KEYS.prompt and record.get("messages") is not None:
        return _normalize_messages(record["messages"], "messages"), "messages"
    prompt = record.get(keys.prompt)
    if prompt is None:
        if has_prompt_ids:
            return None, "prompt_ids"
        other = " or 'messages' (chat list)" if keys.prompt == DEFAULT_KEYS.prompt else ""
        raise _RowError(f"missing '{keys.prompt}' (text){other}")
    if isinstance(prompt, str):
        if IMAGE_PLACEHOLDER in prompt:
            # EasyR1: the string becomes one user turn with each image at its placeholder
            parts = split_image_placeholders(prompt)
            return [{"role": "user", "content": parts}], f"'{keys.prompt}' text"
        return prompt, f"'{keys.prompt}' text"
    if isinstance(prompt, list):
        label = "prompt messages" if keys.prompt == "prompt" else f"'{keys.prompt}' messages"
        return _normalize_messages(prompt, keys.prompt), label
    raise _RowError(
        f"'{keys.prompt}' must be text or a list of chat messages, got {type_name(prompt)}"
    )


def _normalize_messages(messages: Any, column: str) -> list[dict[str, Any]]:
    """Validate a chat list and give every message processor-style list content."""
    if not isinstance(messages, list):
        raise _RowError(f"'{column}' must be a list of chat messages, got {type_name(messages)}")
    if not messages:
        raise _RowError(f"'{column}' is an empty message list")
    return [_normalize_message(msg, f"{column}[{i}]") for i, msg in enumerate(messages)]


def _normalize_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise _RowError(
            f"{where} must be a dict with 'role' and 'content', got {type_name(message)}"
        )
    # Parquet structs carry every field on every row; absent ones come back as None.
    msg = {k: v for k, v in message.items() if v is not None}
    role = msg.get("role")
    if not isinstance(role, str) or not role:
        raise _RowError(f"{where} has no 'role' text")
    content = msg.get("content")
    if isinstance(content, str):
        parts = split_image_placeholders(content)
    elif isinstance(content, list):
        parts = [_normalize_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    else:
        raise _RowError(
            f"{where} 'content' must be text or a list of parts, got {type_name(content)}"
        )
    return {**msg, "content": parts}


def _normalize_part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise _RowError(f"{where} must be a dict with a 'type', got {type_name(part)}")
    kind = part.get("type")
    if kind == "image":
        # Pixels come from the row's `images` list only; inline refs in parts are not used.
        return {"type": "image"}
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _RowError(f"{where} is a text part without 'text'")
        return {"type": "text", "text": text}
    raise _RowError(f"{where} has unsupported part type {kind!r}; use 'image' or 'text'")


def _check_image_parts(
    prompt: str | list[dict[str, Any]] | None, n_images: int, label: str
) -> None:
    if not isinstance(prompt, list):
        return  # text without placeholders gets the images first; prompt_ids are checked later
    n_parts = sum(1 for msg in prompt for part in msg["content"] if part.get("type") == "image")
    if n_parts == n_images:
        return
    if label.endswith("text"):
        raise _RowError(
            f"{label} has {n_parts} {IMAGE_PLACEHOLDER} placeholders but {n_images} images were "
            "given"
        )
    raise _RowError(f"{label} have {n_parts} image parts but {n_images} images were given")


def _response(record: dict[str, Any], column: str, require_response: bool) -> str | list[int]:
    value = record.get(column)
    if value is None:
        if require_response:
            raise _RowError(f"missing '{column}' (or 'response_ids')")
        return ""
    if isinstance(value, str):
        if require_response and not value.strip():
            # nothing to weigh: refused here, naming the row, not at the end of a run
            shown = "empty" if not value else f"only whitespace ({value!r})"
            raise _RowError(f"'{column}' is {shown}: no response to weigh")
        return value
    if isinstance(value, list) and value and all(_is_token_id(t) for t in value):
        return [int(t) for t in value]
    raise _RowError(f"'{column}' must be text or a list of token ids, got {type_name(value)}")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _image_list(record: dict[str, Any], column: str) -> list[Any]:
    refs = record.get(column)
    if refs is None:
        raise _RowError(f"missing '{column}' (use [] for a text-only row)")
    if not isinstance(refs, list):
        raise _RowError(f"'{column}' must be a list of image references, got {type_name(refs)}")
    return refs


def _load_images(path: Path, row: int, refs: list[Any]) -> list[Any]:
    base_dir = path.absolute().parent  # no symlink resolution: refs are relative to the file
    images = []
    for k, ref in enumerate(refs):
        try:
            images.append(load_image(ref, base_dir, f"{path.name} row {row} image {k}"))
        except ImageLoadError as exc:
            raise _RowError(f"image {k}: {exc.problem}") from exc
    return images
