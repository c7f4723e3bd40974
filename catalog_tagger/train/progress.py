"""Progress bars for decoding and epochs: rich on a terminal, nothing otherwise (every epoch is logged anyway)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class ProgressBar:
    """A rich progress bar on stderr when ``enabled`` and stderr is a terminal; every method is a no-op otherwise."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self._progress: Progress | None = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._task: TaskID = self._progress.add_task(description, total=total, info="")
            self._progress.start()

    def update(self, completed: int | None = None, *, advance: int = 0, info: str | None = None) -> None:
        """Set ``completed`` or add ``advance``; ``info`` is the text after the bar (the running loss)."""
        if self._progress is not None:
            kw: dict[str, Any] = {"advance": advance}
            if completed is not None:
                kw = {"completed": completed}
            if info is not None:
                kw["info"] = info
            self._progress.update(self._task, **kw)

    def reset(self, description: str, total: int) -> None:
        """Start over (the next epoch) with a new description and total."""
        if self._progress is not None:
            self._progress.reset(self._task, total=total, description=description, info="")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
