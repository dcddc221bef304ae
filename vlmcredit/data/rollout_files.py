"""Reading rollout files row by row, before any row is validated: JSONL lines and parquet
batches as plain dicts (`RawRow`), and the file-level checks that come first (exists, not a
JSON array, readable parquet, VERL chat layout detection)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcredit.errors import VlmCreditError

BATCH_ROWS = 64  # parquet rows decoded at a time: bounded memory when images are inline bytes


@dataclass
class RawRow:
    """One row as read from disk, before validation; `error` is set when it did not parse."""

    row: int
    record: dict[str, Any] | None
    error: str | None = None
    line: int | None = None  # JSONL line number (1-based), for people opening the file

    @property
    def label(self) -> str:
        return f"row {self.row}" if self.line is None else f"row {self.row} (line {self.line})"


def check_data_option(path: str | Path, option: str = "--data") -> None:
    """The rollouts option names a file: a folder is not "no such file" (it exists)."""
    if Path(path).is_dir():
        raise VlmCreditError(
            f"{option} {path}: is a folder; give the rollouts file in it (.jsonl or .parquet)"
        )
    if not Path(path).is_file():
        raise VlmCreditError(f"{option} {path}: no such file")


def check_file(path: Path) -> Path:
    if path.is_dir():
        raise VlmCreditError(f"{path}: is a directory; give a .jsonl or .parquet rollout file")
    if not path.is_file():
        raise VlmCreditError(f"{path}: rollout file not found; check the path")
    return path


def refuse_json_array(path: Path) -> None:
    # A .json file holding one big array would otherwise fail as "invalid JSON" on every line.
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        raise VlmCreditError(
            f"{path}: holds a JSON array; write one JSON object per line (.jsonl) instead"
        )


def jsonl_rows(path: Path) -> Iterator[RawRow]:
    row = 0
    with path.open("rb") as fh:  # bytes: a bad encoding on one line only spoils that row
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            yield parse_json_line(raw, row, line_no)
            row += 1


def parse_json_line(raw: bytes, row: int, line_no: int) -> RawRow:
    try:
        record = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return RawRow(row, None, f"invalid JSON ({exc})", line_no)
    if not isinstance(record, dict):
        return RawRow(row, None, f"expected a JSON object, got {type_name(record)}", line_no)
    return RawRow(row, record, None, line_no)


def parquet_schema(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise VlmCreditError(
            f"{path}: cannot read as parquet ({one_line(str(exc))}); check the file is a "
            f"complete parquet file"
        ) from exc


def parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    with pq.ParquetFile(path) as pf:
        batches = pf.iter_batches(batch_size=BATCH_ROWS)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise VlmCreditError(
                    f"{path}: cannot read parquet data after row {row} ({one_line(str(exc))}); "
                    f"check the file is a complete parquet file"
                ) from exc
            for record in batch.to_pylist():  # plain Python values: same shapes as JSON
                yield RawRow(row, record)
                row += 1


def parquet_format(schema: Any, prompt_key: str, images_key: str) -> str:
    """ "verl" when the prompt holds chat messages with string contents and images are structs."""
    names = schema.names
    if prompt_key not in names or images_key not in names:
        return "parquet"
    message = list_value_type(schema.field(prompt_key).type)
    image = list_value_type(schema.field(images_key).type)
    if not (is_struct_with(message, "role", "content") and is_struct_with(image, "bytes")):
        return "parquet"
    import pyarrow as pa

    content = message.field("content").type
    return "verl" if pa.types.is_string(content) or pa.types.is_large_string(content) else "parquet"


def list_value_type(arrow_type: Any) -> Any:
    import pyarrow as pa

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return arrow_type.value_type
    return None


def is_struct_with(arrow_type: Any, *names: str) -> bool:
    import pyarrow as pa

    if arrow_type is None or not pa.types.is_struct(arrow_type):
        return False
    return all(arrow_type.get_field_index(name) >= 0 for name in names)


def type_name(value: Any) -> str:
    return type(value).__name__


def one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).strip()
