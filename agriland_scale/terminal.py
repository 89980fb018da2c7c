"""What a run shows on the terminal (stderr): its message lines and progress bars (rich)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["Display", "ShownByDisplay"]

RUN_LOG = "agriland_scale.run"
"""The run's own log (``pipeline.runner``): each of its lines also goes to :meth:`Display.line`."""


class ShownByDisplay(logging.Filter):
    """Leave the run log's lines out of a terminal's log handler: the run's Display prints them.

    A run passes every line of its log (logger ``agriland_scale.run``) to ``report=``, which
    the CLI points at :meth:`Display.line`; with ``-v`` the stderr log handler printed the same
    line a second time. Other loggers' records pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for a record of the run log (``agriland_scale.run`` and below)."""
        return record.name != RUN_LOG and not record.name.startswith(RUN_LOG + ".")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Display:
    """What a run shows on the terminal (stderr): its message lines and progress bars.

    A progress bar follows a stage's blocks or a training's steps (rich; epoch, loss and
    metrics beside a training bar, or the phase it is in before its first step: TensorFlow's
    import, the model's build, the first step's tracing). A bar's clock starts with the first
    call for its label (a training task's first phase). Nothing but errors with ``--quiet``.
    When the stream is not a terminal (a batch job, ``2> file``, a CI log), plain lines
    instead of bars: each phase and finished epoch of a training, every tenth of a stage's
    blocks (every run also logs progress to ``OUT/logs/``).

    Parameters
    ----------
    quiet : bool
        Show errors only.
    file : file-like, optional
        Where to write (standard error by default).
    """

    def __init__(self, quiet: bool, file: TextIO | None = None):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(file=file, stderr=file is None, highlight=False, markup=False, soft_wrap=True)
        self.bars = not quiet and self.console.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._started: dict[str, float] = {}  # label -> its first call (time.monotonic)
        self._tenths: dict[str, int] = {}  # label -> the last tenth of its blocks printed

    def line(self, text: str) -> None:
        """Print a message line (not with ``--quiet``)."""
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def __call__(self, label: str, done: int, total: int, info: str = "", milestone: bool = False) -> None:
        """Show ``done`` of ``total`` on the bar named ``label`` (``info`` beside it).

        ``total`` 0: not known yet (a training's phase before its steps are counted).
        ``milestone``: a training's phase or finished epoch, a line of its own without a
        terminal.
        """
        if self.quiet:
            return
        start = self._started.setdefault(label, time.monotonic())
        info = info.strip()
        if not self.bars:
            self._plain(label, done, total, info, milestone, time.monotonic() - start)
            return
        if total <= 0 and not info:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._progress is None:
            self._progress = Progress(
                TextColumn("  {task.description:<22}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self._progress.start()
        task = self._tasks.get(label)
        if task is None:
            task = self._tasks[label] = self._progress.add_task(label, total=total or None, info=info)
        self._progress.update(task, completed=done, total=total or None, info=info)

    def _plain(self, label: str, done: int, total: int, info: str, milestone: bool, elapsed: float) -> None:
        """Print a line for a training's milestone, or for each tenth of a stage's blocks."""
        if info:  # a training: its phases and finished epochs
            if milestone:
                steps = f"{done}/{total} steps, " if done > 0 else ""
                self.line(f"  {label}: {info} ({steps}{_clock(elapsed)})")
            return
        if total <= 0:
            return
        tenth = 10 * done // total
        if tenth > self._tenths.get(label, 0):
            self._tenths[label] = tenth
            self.line(f"  {label}: {done}/{total} blocks ({_clock(elapsed)})")

    def close(self) -> None:
        """Stop the progress bars, leaving them on the terminal."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
