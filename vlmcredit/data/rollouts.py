"""Rollout readers: JSONL, parquet and VERL/EasyR1-style parquet files -> `Sample`s.

Every format holds one rollout per row: `id`, `images` (a list of image refs: paths relative to
the data file, bytes, or {"bytes", "path"} structs), `response`, and either `prompt` (text) or
`messages` (a chat list in the processor's format). VERL/EasyR1 files keep the chat list in
`prompt`, with string contents holding `<image>` placeholders; those become processor-style
parts here, so everything downstream sees one shape.

Rows are numbered from 0 in file order. A bad row stops the read with a one-line
`VlmCreditError`, or is skipped and recorded in `RolloutSet.bad_rows` with `skip_bad=True`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmcredit.data.images import ImageLoadError, image_ref, load_image
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError

IMAGE_PLACEHOLDER = "<image>"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("jsonl", "parquet", "verl")

_BATCH_ROWS = 64  # parquet rows decoded at a time: bounded memory when images are inline bytes
_SAMPLE_FIELDS = frozenset({"id", "images", "prompt", "messages", "response"})
_SKIP_HINT = "fix the row or pass --skip-bad to skip bad rows"


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
) -> RolloutSet:
    """Read a rollout file (format detected from its suffix and columns) into memory.

    Without `skip_bad` the first bad row raises `VlmCreditError`; with it, bad rows are skipped
    and listed in `bad_rows`. `max_samples` stops after that many good samples.
    `require_response=False` reads prompt-only files (missing responses become "").
    """
    src, fmt, rows = _open(path, max_samples, require_response)
    bad_rows: list[BadRow] = []
    samples = list(_samples(src, rows, skip_bad, max_samples, require_response, bad_rows))
    return RolloutSet(samples=samples, bad_rows=bad_rows, format=fmt, path=src)


def iter_rollouts(
    path: str | Path,
    *,
    skip_bad: bool = False,
    max_samples: int | None = None,
    require_response: bool = True,
    bad_rows: list[BadRow] | None = None,
) -> Iterator[Sample]:
    """Like `read_rollouts`, but yield samples one at a time (images decoded as rows are read).

    File-level problems raise at once; row problems raise (or are appended to `bad_rows` with
    `skip_bad`) when the iteration reaches that row.
    """
    src, _fmt, rows = _open(path, max_samples, require_response)
    return _samples(src, rows, skip_bad, max_samples, require_response, bad_rows)


def detect_format(path: str | Path) -> str:
    """ "jsonl", "parquet" or "verl" for a rollout file; raises `VlmCreditError` otherwise."""
    src = _check_file(Path(path))
    suffix = src.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        _refuse_json_array(src)
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return _parquet_format(_parquet_schema(src))
    raise VlmCreditError(
        f"{src}: unknown rollout file type {suffix or '(no suffix)'!r}; "
        f"give a .jsonl (one JSON object per line) or .parquet file"
    )


def split_image_placeholders(text: str) -> list[dict[str, Any]]:
    """Turn "<image>Describe it." into [{"type": "image"}, {"type": "text", "text": ...}]."""
    parts: list[dict[str, Any]] = []
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k > 0:
            parts.append({"type": "image"})
        if chunk:  # text around adjacent or edge placeholders is empty: no part for it
            parts.append({"type": "text", "text": chunk})
    return parts


# --- opening files ------------------------------------------------------------------------


@dataclass
class _RawRow:
    """One row as read from disk, before validation; `error` is set when it did not parse."""

    row: int
    record: dict[str, Any] | None
    error: str | None = None
    line: int | None = None  # JSONL line number (1-based), for people opening the file

    @property
    def label(self) -> str:
        return f"row {self.row}" if self.line is None else f"row {self.row} (line {self.line})"


class _RowError(Exception):
    """A problem confined to one row, so `skip_bad` can skip it."""

    def __init__(self, message: str, sample_id: str | None = None) -> None:
        super().__init__(message)
        self.sample_id = sample_id


def _open(
    path: str | Path, max_samples: int | None, require_response: bool
) -> tuple[Path, str, Iterator[_RawRow]]:
    """Check everything file-level now, so lazy readers fail before their first row."""
    if max_samples is not None and max_samples < 0:
        raise VlmCreditError(f"max_samples must be >= 0, got {max_samples}")
    src = Path(path)
    fmt = detect_format(src)
    if fmt == "jsonl":
        return src, fmt, _jsonl_rows(src)
    _check_columns(src, _parquet_schema(src).names, require_response)
    return src, fmt, _parquet_rows(src)


def _check_file(path: Path) -> Path:
    if path.is_dir():
        raise VlmCreditError(f"{path}: is a directory; give a .jsonl or .parquet rollout file")
    if not path.is_file():
        raise VlmCreditError(f"{path}: rollout file not found; check the path")
    return path


def _refuse_json_array(path: Path) -> None:
    # A .json file holding one big array would otherwise fail as "invalid JSON" on every line.
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        raise VlmCreditError(
            f"{path}: holds a JSON array; write one JSON object per line (.jsonl) instead"
        )


def _jsonl_rows(path: Path) -> Iterator[_RawRow]:
    row = 0
    with path.open("rb") as fh:  # bytes: a bad encoding on one line only spoils that row
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            yield _parse_json_line(raw, row, line_no)
            row += 1


def _parse_json_line(raw: bytes, row: int, line_no: int) -> _RawRow:
    try:
        record = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return _RawRow(row, None, f"invalid JSON ({exc})", line_no)
    if not isinstance(record, dict):
        return _RawRow(row, None, f"expected a JSON object, got {_type(record)}", line_no)
    return _RawRow(row, record, None, line_no)


def _parquet_schema(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise VlmCreditError(
            f"{path}: cannot read as parquet ({_one_line(str(exc))}); check the file is a "
            f"complete parquet file"
        ) from exc


def _parquet_rows(path: Path) -> Iterator[_RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    with pq.ParquetFile(path) as pf:
        batches = pf.iter_batches(batch_size=_BATCH_ROWS)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise VlmCreditError(
                    f"{path}: cannot read parquet data after row {row} ({_one_line(str(exc))}); "
                    f"check the file is a complete parquet file"
                ) from exc
            for record in batch.to_pylist():  # plain Python values: same shapes as JSON
                yield _RawRow(row, record)
                row += 1


def _parquet_format(schema: Any) -> str:
    """ "verl" when `prompt` holds chat messages with string contents and images are structs."""
    names = schema.names
    if "prompt" not in names or "images" not in names:
        return "parquet"
    message = _list_value_type(schema.field("prompt").type)
    image = _list_value_type(schema.field("images").type)
    if not (_is_struct_with(message, "role", "content") and _is_struct_with(image, "bytes")):
        return "parquet"
    import pyarrow as pa

    content = message.field("content").type
    return "verl" if pa.types.is_string(content) or pa.types.is_large_string(content) else "parquet"


def _list_value_type(arrow_type: Any) -> Any:
    import pyarrow as pa

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return arrow_type.value_type
    return None


def _is_struct_with(arrow_type: Any, *names: str) -> bool:
    import pyarrow as pa

    if arrow_type is None or not pa.types.is_struct(arrow_type):
        return False
    return all(arrow_type.get_field_index(name) >= 0 for name in names)


def _check_columns(path: Path, names: list[str], require_response: bool) -> None:
    # A column missing from the whole file spoils every row; skipping rows cannot help.
    missing = [] if "images" in names else ["'images'"]
    if "prompt" not in names and "messages" not in names:
        missing.append("'prompt' or 'messages'")
    if require_response and "response" not in names:
        missing.append("'response'")
    if not missing:
        return
    only_response = missing == ["'response'"]
    hint = "; or read prompts only with require_response=False" if only_response else ""
    raise VlmCreditError(
        f"{path}: no {', '.join(missing)} column (columns: {', '.join(names)}); add it{hint}"
    )


# --- rows -> samples ----------------------------------------------------------------------


def _samples(
    path: Path,
    rows: Iterator[_RawRow],
    skip_bad: bool,
    max_samples: int | None,
    require_response: bool,
    bad_rows: list[BadRow] | None,
) -> Iterator[Sample]:
    seen: dict[str, int] = {}  # id -> first row, for duplicate detection
    count = 0
    if max_samples == 0:
        return
    for raw in rows:
        try:
            sample = _build_sample(path, raw, seen, require_response)
        except _RowError as exc:
            bad = BadRow(raw.row, exc.sample_id, _one_line(f"{raw.label}: {exc}"))
            if not skip_bad:
                raise VlmCreditError(f"{path}: {bad.error}; {_SKIP_HINT}") from None
            if bad_rows is not None:
                bad_rows.append(bad)
            continue
        seen[sample.id] = raw.row
        yield sample
        count += 1
        if max_samples is not None and count >= max_samples:
            return  # stop before reading (and decoding images of) further rows


def _build_sample(path: Path, raw: _RawRow, seen: dict[str, int], require_response: bool) -> Sample:
    if raw.record is None:
        raise _RowError(raw.error or "unreadable row")
    record = raw.record
    explicit_id = _explicit_id(record)
    try:
        sample_id = explicit_id if explicit_id is not None else f"row-{raw.row}"
        if sample_id in seen:
            raise _RowError(f"duplicate id {sample_id!r} (first seen at row {seen[sample_id]})")
        prompt = _prompt(record)
        response = _response(record, require_response)
        refs = _image_list(record)
        column = "messages" if record.get("messages") is not None else "prompt"
        _check_image_parts(prompt, len(refs), column)
        images = _load_images(path, raw.row, refs)
    except _RowError as exc:
        exc.sample_id = explicit_id
        raise
    meta: dict[str, Any] = {
        "row": raw.row,
        "image_refs": [image_ref(ref) for ref in refs],
        "source": str(path),
        "extra": {k: v for k, v in record.items() if k not in _SAMPLE_FIELDS},
    }
    if raw.line is not None:
        meta["line"] = raw.line
    return Sample(images=images, prompt=prompt, response=response, id=sample_id, meta=meta)


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
        raise _RowError(f"id must be text or an integer, got {_type(value)}")
    return str(value)


def _prompt(record: dict[str, Any]) -> str | list[dict[str, Any]]:
    # `messages` wins when both are present: it is the more specific of the two.
    if record.get("messages") is not None:
        return _normalize_messages(record["messages"], "messages")
    prompt = record.get("prompt")
    if prompt is None:
        raise _RowError("missing 'prompt' (text) or 'messages' (chat list)")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return _normalize_messages(prompt, "prompt")
    raise _RowError(f"'prompt' must be text or a list of chat messages, got {_type(prompt)}")


def _normalize_messages(messages: Any, column: str) -> list[dict[str, Any]]:
    """Validate a chat list and give every message processor-style list content."""
    if not isinstance(messages, list):
        raise _RowError(f"'{column}' must be a list of chat messages, got {_type(messages)}")
    if not messages:
        raise _RowError(f"'{column}' is an empty message list")
    return [_normalize_message(msg, f"{column}[{i}]") for i, msg in enumerate(messages)]


def _normalize_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise _RowError(f"{where} must be a dict with 'role' and 'content', got {_type(message)}")
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
        raise _RowError(f"{where} 'content' must be text or a list of parts, got {_type(content)}")
    return {**msg, "content": parts}


def _normalize_part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise _RowError(f"{where} must be a dict with a 'type', got {_type(part)}")
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


def _check_image_parts(prompt: str | list[dict[str, Any]], n_images: int, column: str) -> None:
    if isinstance(prompt, str):
        return  # text prompts get the images placed before the text when encoded
    n_parts = sum(1 for msg in prompt for part in msg["content"] if part.get("type") == "image")
    if n_parts != n_images:
        label = "messages" if column == "messages" else "prompt messages"
        raise _RowError(f"{label} have {n_parts} image parts but {n_images} images were given")


def _response(record: dict[str, Any], require_response: bool) -> str | list[int]:
    value = record.get("response")
    if value is None:
        if require_response:
            raise _RowError("missing 'response'")
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(_is_token_id(t) for t in value):
        return [int(t) for t in value]
    raise _RowError(f"'response' must be text or a list of token ids, got {_type(value)}")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _image_list(record: dict[str, Any]) -> list[Any]:
    refs = record.get("images")
    if refs is None:
        raise _RowError("missing 'images' (use [] for a text-only row)")
    if not isinstance(refs, list):
        raise _RowError(f"'images' must be a list of image references, got {_type(refs)}")
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


def _type(value: Any) -> str:
    return type(value).__name__


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).strip()
