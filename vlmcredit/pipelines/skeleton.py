"""The run skeleton every command pipeline shares: refuse a taken folder, open or resume the
run, work through fixed batches, commit each as one unit, report progress, finish.

Batches are fixed slices of the work list and each is committed as one shard (rows + tensors),
so a resumed run recomputes exactly the batches that were not committed, with the same
composition (and so the same padding and the same numbers) as an uninterrupted run.

Under torchrun the same skeleton shares the work among ranks (`pipelines/distributed.py`,
docs/scale-out.md): `refuse_taken(..., parallel=True)` joins the ranks, `open_run` lets rank 0
open the folder, `drive` deals the uncommitted batches round-robin by index, and `conclude`
lets rank 0 alone write the merged tables and finish the manifest. A command whose pipeline does
not pass `parallel=True` refuses to run under torchrun.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.run import MANIFEST, OPENED, Run, out_manifest
from vlmcredit.pipelines import distributed
from vlmcredit.pipelines.distributed import PeerFailed

# Tests simulate a kill -9 after this many committed units (a real process exit, no cleanup).
CRASH_ENV = "VLMCREDIT_TEST_CRASH_AFTER_BATCHES"
# Tests make this rank of a data-parallel run raise before its first batch.
FAIL_RANK_ENV = "VLMCREDIT_TEST_FAIL_RANK"

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
                    # a disk that is full may refuse this too: the first error is the news
                    with contextlib.suppress(OSError):
                        run.fail(str(exc) or type(exc).__name__)
            me = distributed.ranks()
            if me.parallel and isinstance(exc, VlmCreditError) and not str(exc).startswith("rank"):
                raise VlmCreditError(f"{me.label()}: {exc}") from None  # which rank says so
            raise
        finally:
            del OPENED[opened:]

    return wrapper  # type: ignore[return-value]


def refuse_taken(out: Path, resume: bool, parallel: bool = False) -> None:
    """Fail fast (before loading a model) when `out` holds a run and --resume was not given.

    Under torchrun (WORLD_SIZE > 1) a `parallel` pipeline joins the other ranks here and rank 0
    alone looks at the folder (the others would race with it); any other pipeline refuses.
    """
    me = distributed.ranks()
    if me.parallel and not parallel:
        raise VlmCreditError(
            f"{me.label()}: this command does not share its work among processes; run it "
            "without torchrun (capture, anchors, weights and probe-heads do)"
        )
    if me.parallel:
        distributed.join()
        distributed.from_lead(lambda: _refuse_taken(Path(out), resume))
    else:
        _refuse_taken(Path(out), resume)


def _refuse_taken(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise VlmCreditError(f"--out {out}: is a file; choose a folder for the run")
    if not (out / MANIFEST).exists():
        return
    failed = out_manifest(out).get("status") == "failed"  # damaged: one line saying what works
    if not resume and not failed:
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


def batched(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def open_run(
    path: Path,
    command: str,
    parameters: dict[str, Any],
    resume: bool,
    extra: dict[str, Any] | None = None,
    first_rows: Sequence[dict[str, Any]] = (),
) -> Run:
    """`Run.open`, and on a new run commit `first_rows` (e.g. the bad input rows) first.

    Under torchrun rank 0 opens (or resumes: it merges what every rank committed and drops the
    leftovers of a kill) while the others wait; then they join the run rank 0 opened.
    """
    me = distributed.ranks()
    opened: list[Run] = []

    def lead() -> None:
        run = Run.open(Path(path), command, parameters, resume, extra)
        run.world = me.world
        if me.parallel:
            run.manifest["processes"] = me.world
        else:
            run.manifest.pop("processes", None)  # a single-process resume of a shared run
        run.write_manifest()
        if not run.rows and first_rows:
            run.commit(first_rows)
        opened.append(run)

    distributed.from_lead(lead)
    run = opened[0] if me.lead else Run.join(Path(path), me.rank, me.world)
    if me.parallel:  # every rank has read the same rows before any commits: same shares
        distributed.gather(None)
    return run


def shares(run: Run, batches: Sequence[Sequence[Any]], key: Callable[[Any], str]) -> list[int]:
    """Indices of the batches this rank computes: the uncommitted ones, dealt round-robin."""
    done = run.done_ids()
    pending = [i for i, b in enumerate(batches) if not all(key(x) in done for x in b)]
    return pending[run.rank :: run.world]


def conclude(run: Run, finish: Callable[[], None]) -> Run:
    """Run `finish()` (merged tables, `run.finish`) on rank 0 alone; the other ranks wait for
    it and return the finished run as read from disk (one process: just `finish()`)."""
    if run.world == 1:
        finish()
        return run
    distributed.from_lead(finish)
    distributed.leaving_together()
    return run if run.rank == 0 else Run.load(run.path)


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

    With several ranks each computes its `shares` and commits them; a rank that fails tells the
    others, who stop before their next batch; all meet once at the end (`distributed.settle`),
    which raises naming the failed ranks; then rank 0 merges the ranks' rows into the run's
    table. On rank 0 (or alone) the table ends in batch order, as an unsplit run writes it.
    """
    done = run.done_ids()
    mine = shares(run, batches, key)
    lead = run.rank == 0
    finished = sum(len(b) for b in batches if all(key(x) in done for x in b))
    total = finished + sum(len(batches[i]) for i in mine)  # rank 0 counts its own share
    if lead:
        where = f"; rank 0 of {run.world} takes {len(mine)} batches" if run.world > 1 else ""
        log(
            f"{sum(len(b) for b in batches)} samples in {len(batches)} batches; {finished} "
            f"already done{where}"
        )
    if progress and lead:
        progress(finished, total)
    kill = KillSwitch()
    error: BaseException | None = None
    try:
        for i in mine:
            if run.world > 1:
                _check_peers(run)
            rows, tensors = work(batches[i])
            run.commit(rows, tensors)
            finished += len(batches[i])
            if progress and lead:
                progress(finished, total)
            kill.committed()
    except BaseException as exc:
        if run.world == 1:
            raise
        if not isinstance(exc, PeerFailed):
            distributed.announce_failure(run.path, run.rank, exc)
        error = exc
    if run.world > 1:
        distributed.settle(run.path, error)
    if lead:
        if run.world > 1:
            run.merge_ranks()
        run.order_rows([key(x) for b in batches for x in b])


def _check_peers(run: Run) -> None:
    failing = os.environ.get(FAIL_RANK_ENV, "")
    if failing and int(failing) == run.rank:
        raise VlmCreditError(f"rank {run.rank} fails on purpose ({FAIL_RANK_ENV}={failing})")
    peer = distributed.failed_peer(run.path, run.rank)
    if peer is not None:
        raise PeerFailed(*peer)
