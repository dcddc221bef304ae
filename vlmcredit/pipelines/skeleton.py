"""The run skeleton every command pipeline shares: refuse a taken folder, open or resume the
run, work through fixed batches, commit each as one unit, report progress, finish.

Batches are fixed slices of the work list and each is committed as one shard (rows + tensors),
so a resumed run recomputes exactly the batches that were not committed, with the same
composition (and so the same padding and the same numbers) as an uninterrupted run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.run import MANIFEST, OPENED, Run, read_manifest

# Tests simulate a kill -9 after this many committed units (a real process exit, no cleanup).
CRASH_ENV = "VLMCREDIT_TEST_CRASH_AFTER_BATCHES"

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Progress = Callable[[int, int], None]
Work = Callable[[Sequence[Any]], tuple[list[dict[str, Any]], dict[str, Any]]]


def marks_failure(pipeline: F) -> F:
    """A pipeline that raises marks the run it opened as failed (status, error, time), so the
    same command continues it and a corrected one starts over instead of being refused."""

    @functools.wraps(pipeline)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opened = len(OPENED)
        try:
            return pipeline(*args, **kwargs)
        except BaseException as exc:
            for run in OPENED[opened:]:
                if run.manifest.get("status") == "running":
                    run.fail(str(exc) or type(exc).__name__)
            raise
        finally:
            del OPENED[opened:]

    return wrapper  # type: ignore[return-value]


def refuse_taken(out: Path, resume: bool) -> None:
    """Fail fast (before loading a model) when `out` holds a run and --resume was not given."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmCreditError(f"--out {out}: is a file; choose a folder for the run")
    if (out / MANIFEST).exists() and not resume and not _failed(out):
        raise VlmCreditError(
            f"--out {out}: already holds a run; pass --resume to continue it or choose a new folder"
        )


def checkpoint_record(ck: Any, ckpt_id: str) -> dict[str, Any]:
    """What a manifest says of the checkpoint: id as given, where it was, family, hashes."""
    from dataclasses import asdict

    from vlmcredit.formats.provenance import tokenizer_hash, weights_hash

    return {
        "id": ckpt_id,
        "path": str(ck.path),
        "family": ck.adapter.cli_name,
        "weights_sha1": weights_hash(ck.path),
        "tokenizer_sha1": tokenizer_hash(ck.processor),
        "geometry": asdict(ck.geometry),
    }


def _failed(out: Path) -> bool:
    try:
        return read_manifest(out).get("status") == "failed"
    except VlmCreditError:
        return False


def batched(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class KillSwitch:
    """Exits the process like kill -9 after N commits when the test variable asks for it."""

    def __init__(self) -> None:
        self.after = int(os.environ.get(CRASH_ENV, "0") or 0)
        self.commits = 0

    def committed(self) -> None:
        self.commits += 1
        if self.after and self.commits >= self.after:
            os._exit(137)  # simulated kill -9: no cleanup, no finally blocks


def drive(
    run: Run,
    batches: Sequence[Sequence[Any]],
    key: Callable[[Any], str],
    work: Work,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> None:
    """Run `work` on every batch not yet committed and commit its rows and tensors.

    `key(item)` is the id a committed row records for `item`; a batch whose items are all done
    is skipped. `work(batch)` returns (rows, tensors) for the batch.
    """
    done = run.done_ids()
    total = sum(len(b) for b in batches)
    finished = sum(len(b) for b in batches if all(key(x) in done for x in b))
    log(f"{total} samples in {len(batches)} batches; {finished} already done")
    if progress:
        progress(finished, total)
    kill = KillSwitch()
    for batch in batches:
        if all(key(x) in done for x in batch):
            continue
        rows, tensors = work(batch)
        run.commit(rows, tensors)
        finished += len(batch)
        if progress:
            progress(finished, total)
        kill.committed()
