"""Data-parallel runs under `torchrun`: who this process is, and the few messages ranks exchange.

`torchrun --nproc-per-node N -m vlmcredit capture|anchors|weights|probe-heads ...` starts N
copies of the command with WORLD_SIZE / RANK / LOCAL_RANK set; the run skeleton
(`pipelines/skeleton.py`) does the rest, the same way for every command:

- every rank loads its own model (`--device cuda` -> cuda:LOCAL_RANK);
- rank 0 alone checks and opens the run folder (or resumes it), then tells the others, who join;
- the batches not yet committed are dealt round-robin by index, each rank commits its own
  shards and rows under RUN/rank-R/ (rank 0 under RUN/);
- a rank that fails leaves a flag file (RUN/.rank-R.failed) that the others see between two
  batches, so they stop instead of working on; every rank then meets the others at one final
  exchange, where each learns which ranks failed and why, and raises naming them;
- after that exchange rank 0 merges the ranks' rows tables, writes the merged tables and the
  manifest, and tells the others how that went; they return the finished run as read from disk.

Only small Python objects travel between ranks (errors, timings, one means tensor), over gloo
(on GPU runs the process group is "cpu:gloo,cuda:nccl"; torch's object collectives pick its CPU
backend, so the same objects still go by gloo). The farewell barrier is `dist.monitored_barrier`,
which torch allows only on a group whose backend is exactly "gloo": a combined group gets a gloo
subgroup of all ranks for it (`_BARRIER_GROUP`).
Every exchange waits at most VLMCREDIT_DIST_TIMEOUT seconds (default 1800), so a rank that
vanishes without a word makes the others fail instead of hanging; under torchrun a rank that
exits ends the others at once anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vlmcredit.errors import VlmCreditError

TIMEOUT_ENV = "VLMCREDIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
FAILED_FLAG = ".rank-{rank}.failed"  # matches the ".*.*" leftovers a resume removes
# Tests make this rank fail on its own before the run is opened (the others wait for it there).
FAIL_AT_START_ENV = "VLMCREDIT_TEST_FAIL_RANK_AT_START"

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (world 1: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank} of {self.world}"


def ranks() -> Ranks:
    """What torchrun (or any launcher speaking its variables) says this process is."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        raw = os.environ.get(name, default) or default
        try:
            values[name] = int(raw)
        except ValueError:
            raise VlmCreditError(
                f"{name}={raw!r}: not an integer; launch with torchrun, which sets it"
            ) from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise VlmCreditError(
            f"WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local}: inconsistent; launch with "
            "torchrun, which sets them"
        )
    return Ranks(rank, world, local)


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "") or str(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise VlmCreditError(f"{TIMEOUT_ENV}={raw!r}: give the seconds a rank may wait (> 0)")
    return value


def join(backend: str | None = None) -> Ranks:
    """Join the process group when this process is one of several (idempotent); world 1 needs
    nothing. The backend: gloo, plus nccl for CUDA tensors where CUDA is there (`backend`
    overrides it; tests pass the combined form "cpu:gloo" to take the GPU runs' path on CPU)."""
    import torch
    import torch.distributed as dist

    me = ranks()
    if not me.parallel or dist.is_initialized():
        return me
    if not dist.is_available():
        raise VlmCreditError(
            f"WORLD_SIZE={me.world}: this torch build has no torch.distributed; run one process"
        )
    from datetime import timedelta

    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s())
    try:
        dist.init_process_group(backend, timeout=timeout)
        # collective: every rank creates it here, at the same point, before any other exchange
        _BARRIER_GROUP[:] = [
            None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        ]
    except (RuntimeError, ValueError) as exc:  # no rendezvous variables, unreachable master
        raise VlmCreditError(
            f"{me.label()}: could not join the other ranks ({_first_line(exc)}); launch with "
            "torchrun"
        ) from None
    atexit.register(_leave)
    return me


# The group of the farewell barrier: None (the default group) when that is plain gloo, else a
# gloo subgroup of all ranks. `dist.monitored_barrier` checks `get_backend(group) == "gloo"`, and
# for a group made with "cpu:gloo,cuda:nccl" get_backend returns that whole string, so on the
# default group of a GPU run it raises ValueError (torch/distributed/distributed_c10d.py).
_BARRIER_GROUP: list[Any] = []


# Set where every rank is known to leave from the same point: the run concluded, or an error
# every rank learnt at the same exchange. Only then do the ranks wait for each other at exit.
_TOGETHER: list[bool] = []


def leaving_together() -> None:
    _TOGETHER.append(True)


def _leave() -> None:
    """Leave together: rank 0 merges the tables after the last collective, and a peer that
    destroys its gloo group and exits meanwhile makes rank 0's own teardown abort (SIGABRT,
    "terminate called without an active exception"). A last barrier (bounded by the same
    timeout) keeps every rank until all are done.

    Not after a rank failed on its own (outside the exchanges, e.g. loading its model): the
    others then wait in an exchange that is not this barrier, so it would only hold this rank
    for the whole timeout; it exits at once, and torchrun ends the others naming it."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if _TOGETHER:
        group = _BARRIER_GROUP[0] if _BARRIER_GROUP else None
        with contextlib.suppress(RuntimeError):  # a peer is gone: nothing left to wait for
            dist.monitored_barrier(group, timeout=timedelta(seconds=timeout_s()))
    dist.destroy_process_group()  # every group, the barrier's too


def rank_device(device: str | None, device_map: str | None) -> str | None:
    """The device this rank loads its model on: `--device cuda` means cuda:LOCAL_RANK when
    there are several ranks. One process is told nothing new."""
    me = ranks()
    if not me.parallel:
        return device
    if os.environ.get(FAIL_AT_START_ENV, "") == str(me.rank):  # tests: a rank failing alone
        raise VlmCreditError(f"rank {me.rank} fails on purpose ({FAIL_AT_START_ENV})")
    if device_map:
        raise VlmCreditError(
            f"--device-map {device_map} under torchrun ({me.world} processes): every rank would "
            "spread its model over all GPUs; run one process with --device-map, or torchrun "
            "with --device cuda (one model per GPU)"
        )
    if not device or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise VlmCreditError(
            f"--device {device} under torchrun: every rank would use that one GPU; pass "
            "--device cuda (rank on local GPU LOCAL_RANK)"
        )
    import torch

    count = torch.cuda.device_count()
    if me.local_rank >= count:
        raise VlmCreditError(
            f"{me.label()}: LOCAL_RANK {me.local_rank} but only {count} CUDA device(s) visible; "
            "start at most one process per GPU (torchrun --nproc-per-node)"
        )
    torch.cuda.set_device(me.local_rank)
    return f"cuda:{me.local_rank}"


# -- the messages ---------------------------------------------------------------------------
def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (one process: [obj])."""
    import torch.distributed as dist

    me = ranks()
    if not me.parallel:
        return [obj]
    out: list[Any] = [None] * me.world
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as exc:  # a rank vanished or the timeout passed
        raise VlmCreditError(
            f"{me.label()}: lost the other ranks while waiting for them ({_first_line(exc)}); "
            f"a rank died or took longer than {TIMEOUT_ENV}={timeout_s():g} s"
        ) from None
    return out


def from_lead(make: Callable[[], T]) -> T:
    """Rank 0 runs `make()`; every rank gets its value, or raises when it failed there (rank 0
    re-raises its own error, the others a one-line error naming rank 0)."""
    me = ranks()
    if not me.parallel:
        return make()
    value: Any = None
    error: BaseException | None = None
    if me.lead:
        try:
            value = make()
        except BaseException as exc:  # told to the others, then re-raised
            error = exc
    message = None if error is None else (str(error) or type(error).__name__)
    user_error = isinstance(error, VlmCreditError)
    told = _broadcast((message, user_error, value if error is None else None))
    if told[0] is not None:
        leaving_together()  # every rank raises here
    if error is not None:
        raise error
    if told[0] is not None:  # a user error reads the same on every rank
        raise VlmCreditError(told[0] if told[1] else f"rank 0 failed: {told[0]}")
    return told[2]


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    me = ranks()
    box = [obj if me.lead else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as exc:
        whom = "the other ranks" if me.lead else "rank 0"
        raise VlmCreditError(
            f"{me.label()}: lost {whom} while waiting for them ({_first_line(exc)}); a rank "
            f"died or took longer than {TIMEOUT_ENV}={timeout_s():g} s"
        ) from None
    return box[0]


# -- failing together -----------------------------------------------------------------------
def announce_failure(run_dir: Path, rank: int, error: BaseException) -> None:
    """Leave the flag the other ranks look for between batches."""
    from vlmcredit.formats.files import atomic_write_bytes

    message = str(error) or type(error).__name__
    atomic_write_bytes(Path(run_dir) / FAILED_FLAG.format(rank=rank), message.encode())


def failed_peer(run_dir: Path, me: int) -> tuple[int, str] | None:
    """(rank, error) of another rank that announced a failure, if any."""
    for flag in sorted(Path(run_dir).glob(FAILED_FLAG.format(rank="*"))):
        rank = int(flag.name.split(".")[1].split("-")[1])
        if rank != me:
            return rank, flag.read_text(errors="replace")
    return None


def settle(run_dir: Path, error: BaseException | None) -> None:
    """The final meeting after every rank's share: each learns who failed; raises if any did
    (a rank that failed re-raises its own error, the others one line naming the failed ranks)."""
    me = ranks()
    mine = None
    if error is not None:
        mine = str(error) or type(error).__name__
    reports = gather(mine)
    if any(m is not None for m in reports):
        leaving_together()  # every rank raises here
    if error is not None and not isinstance(error, PeerFailed):
        raise error
    failed = [(r, m) for r, m in enumerate(reports) if m is not None and not m.startswith(_PEER)]
    if failed:
        named = "; ".join(f"rank {r} failed: {m}" for r, m in failed)
        raise VlmCreditError(
            f"{named} ({me.label()} stopped with it; the batches every rank committed are "
            "kept: rerun the same command to continue)"
        )


_PEER = "stopped: rank "


class PeerFailed(VlmCreditError):
    """This rank stopped because another one announced a failure."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"{_PEER}{rank} failed: {message}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
