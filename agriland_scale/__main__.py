"""``agriland`` (the console script) and ``python -m agriland_scale``: the command line, ended at once."""

from __future__ import annotations

import logging
import os
import sys

from agriland_scale.cli import main

__all__ = ["entry"]


def _exit_at_once(status: list[int]) -> None:
    """Flush logging and the standard streams, then end the process with ``status[0]`` at once."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone away, a closed stream: nothing to keep
            pass
    os._exit(status[0])


def entry() -> int:
    """Run the ``agriland`` console script: :func:`main`, then an exit without the interpreter's teardown.

    After a run, Python spent about a second tearing down the modules and objects the
    ``agriland`` process holds (0.9-1.2 s measured after ``agriland run`` on the Virginia
    scene, on 2 cores) before the shell got its prompt back. The exit handler registered
    here runs last: the interpreter has joined the process's non-daemon threads and run every
    other exit handler (distributed's, multiprocessing's, temporary files') by then; it
    flushes the logs and the standard streams and ends the process with :func:`main`'s
    status (argparse's for ``--help``, 1 for an uncaught exception). Only the console script
    (and ``python -m agriland_scale``) does this, never a caller of :func:`main` (nor
    ``python -m agriland_scale.cli``, which runs :func:`main` alone: this module imports the
    CLI, never the other way round).
    """
    import atexit

    status = [1]
    atexit.register(_exit_at_once, status)  # the first registered runs last
    try:
        status[0] = main()
    except SystemExit as e:  # argparse: --help, --version, a usage error
        status[0] = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    return status[0]


if __name__ == "__main__":
    sys.exit(entry())
