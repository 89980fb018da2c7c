"""What a run shows on the terminal (stderr): its message lines and progress bars (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["Display"]


class Display:
    """What a run shows on the terminal (stderr): its message lines and progress bars.

    A progress bar follows a stage's blocks or a training's steps (rich; epoch, loss and
    metrics beside a training bar). Nothing but errors with ``--quiet``; lines without bars
    when stderr is not a terminal (every run also logs progress to ``OUT/logs/``).
    """

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
        self.bars = not quiet and self.console.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def line(self, text: str) -> None:
        """Print a message line (not with ``--quiet``)."""
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def __call__(self, label: str, done: int, total: int, info: str = "") -> None:
        """Show ``done`` of ``total`` on the bar named ``label`` (``info`` beside it)."""
        if not self.bars or total <= 0:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._progress is None:
            self._progress = Progress(TextColumn("  {task.description:<22}"), BarColumn(bar_width=30),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console)
            self._progress.start()
        task = self._tasks.get(label)
        if task is None:
            task = self._tasks[label] = self._progress.add_task(label, total=total, info=info.strip())
        self._progress.update(task, completed=done, total=total, info=info.strip())

    def close(self) -> None:
        """Stop the progress bars, leaving them on the terminal."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
