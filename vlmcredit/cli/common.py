"""What every command shares: the user-error frame and the global --debug flag.

Commands are thin: parse, call the library, print. A `VlmCreditError` becomes one line on
stderr and exit status 2; `--debug` (or VLMCREDIT_DEBUG=1) keeps the traceback instead.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer

from vlmcredit.errors import VlmCreditError

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    debug: bool = os.environ.get("VLMCREDIT_DEBUG", "") not in ("", "0")


state = _State()


_OS_ADVICE = {
    errno.ENOSPC: "free disk space and rerun (a run continues with --resume, its finished "
    "batches kept), or choose another --out",
    errno.EDQUOT: "free quota and rerun (a run continues with --resume, its finished batches "
    "kept), or choose another --out",
    errno.EFBIG: "larger than this system lets a file grow (ulimit -f, or the filesystem's "
    "limit); raise the limit or choose another --out, then rerun",
    errno.EROFS: "the filesystem is read-only; choose a writable --out",
    errno.EACCES: "no permission; choose a folder you can write (or fix its permissions)",
    errno.EPERM: "choose a folder you can write",
    errno.ENOTDIR: "a file stands where a folder is needed; choose another path",
    errno.EISDIR: "a folder stands where a file is needed; choose a file path",
}


def user_errors(func: F) -> F:
    """Turn `VlmCreditError` into a one-line message and exit 2 (traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except VlmCreditError as exc:
            if state.debug:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            # the user's filesystem said no: one line naming the path and what to do
            advice = _OS_ADVICE.get(exc.errno or 0)
            if state.debug or advice is None:
                raise
            where = exc.filename or "output"
            typer.echo(f"error: {where}: {exc.strerror}; {advice}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def echo_err(message: str) -> None:
    print(message, file=sys.stderr)


def silence_libraries() -> None:
    """--quiet: no weight-loading bars or library deprecation chatter either."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextmanager
def progress_bar(label: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar with ETA on stderr; yields `update(done, total)`.

    The bar appears at the first update, so option and input errors (found before any work
    starts) print as one line with no bar around them.
    """
    if quiet:
        silence_libraries()
        yield lambda _done, _total: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=Console(stderr=True), transient=False)
    task: list[Any] = []

    def update(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task(label, total=None))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    finally:
        if task:
            bar.stop()
