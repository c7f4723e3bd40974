"""Interrupting ``catalog-tagger tag``: SIGINT/SIGTERM stop the run, which prints the command that resumes it."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import typer
from rich.console import Console

from catalog_tagger.errors import Terminated

# Exit codes (README "Exit codes"): 0 done, 1 a bug (traceback), 2 bad input or usage (one line), and:
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: the store, network or cluster failed; rerunning later may succeed (one line)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): the run id and the command that resumes it are printed
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM): likewise


def _raise_terminated(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - a signal handler
    raise Terminated()


@contextmanager
def resumable_on_interrupt(run_id: str, console: Console) -> Iterator[None]:
    """Ctrl-C, or SIGTERM (raised as ``Terminated`` meanwhile), stops the run (the library shuts down the Ray it
    started) and prints its id and the command that resumes it; exit 130 (143 for SIGTERM)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        yield
    except KeyboardInterrupt as err:
        console.print(f"interrupted: run {run_id} did not finish; what it staged is kept. Resume it with:",
                      soft_wrap=True, markup=False, highlight=False)  # fmt: skip
        console.print(_resume_command(run_id), soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _resume_command(run_id: str) -> str:
    """This command line with ``--run-id`` (added when missing), credentials in URLs redacted."""
    from catalog_tagger.storage import redact  # lazy: fsspec is not needed to start the CLI

    args = sys.argv[1:]
    if not any(a == "--run-id" or a.startswith("--run-id=") for a in args):
        args = [*args, "--run-id", run_id]
    return shlex.join(["catalog-tagger", *(redact(a) for a in args)])
