"""Atomic file writes shared by every artifact writer.

Every file is written to a temporary name in the same folder and renamed, so a killed process
leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def user_umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_user_file(path: Path | str) -> None:
    """Give a file the permissions a plain `open()` would: 0666 less the umask (mkstemp makes
    0600, which would hide outputs from the user's group and other accounts)."""
    os.chmod(path, 0o666 & ~user_umask())


def as_user_dir(path: Path | str) -> None:
    """Give a folder made by mkdtemp (0700) the permissions of a plain `mkdir`."""
    os.chmod(path, 0o777 & ~user_umask())


def make_temp_dir(beside: Path, prefix: str) -> Path:
    """A scratch folder next to `beside` (same filesystem, so it can be renamed into place),
    with the user's permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=beside))
    as_user_dir(tmp)
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        as_user_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            # a failed write() (disk full) names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def atomic_write_parquet(path: Path, frame: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def atomic_save_tensors(
    path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))


def sample_file_stem(sample_id: str) -> str:
    """A file-name-safe, collision-free stem for a per-sample file (ids may hold '/', spaces)."""
    import hashlib
    import re

    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._")[:60] or "sample"
    return f"{readable}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
