"""Worker plugins of a run: standard error into the run's logs, the run's storage options, a fast exit.

Each acts in the worker processes only, not in the process that registered it, where
:func:`~agriland_scale.pipeline.runtime.main_process_worker` runs a worker of the same cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os

from distributed import WorkerPlugin

from agriland_scale.files import use_storage_options

__all__ = ["FastExit", "StderrToFile", "StorageOptions"]


class _OtherProcesses(WorkerPlugin):
    """A worker plugin for worker processes only.

    Its setup does nothing in the process that registered it, where
    :func:`~agriland_scale.pipeline.runtime.main_process_worker` runs a worker of the same cluster.
    """

    def __init__(self) -> None:
        self.registered_by = os.getpid()

    def setup(self, worker) -> None:
        """Call :meth:`setup_process`, except in the process that registered the plugin."""
        if os.getpid() != self.registered_by:
            self.setup_process(worker)

    def setup_process(self, worker) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class StderrToFile(_OtherProcesses):
    """Send a worker process's standard error to a file, in the run's log folder.

    Standard error (file descriptor 2) carries TensorFlow's C++ log lines such as
    ``I0000 … oneDNN`` or ``E0000 … remapper failed``, warnings and tracebacks; they land in
    the run's log folder instead of the user's terminal. Only for the LocalCluster a run
    starts itself: the workers of an existing cluster keep their own logging.
    """

    name = "agriland-stderr-to-file"

    def __init__(self, path: str, *, per_process: bool = False, earlier: str | None = None):
        super().__init__()
        self.path, self.per_process, self.earlier = path, per_process, earlier

    def setup_process(self, worker) -> None:  # noqa: ARG002 - WorkerPlugin signature
        """Redirect the worker process's file descriptor 2 to the plugin's file (appending).

        With ``per_process``, the file is ``PATH.PID`` (one per worker process: a temporary
        file, see :class:`~.launch.ClusterLaunch`). With ``earlier``, what this process wrote
        to ``EARLIER.PID`` so far is moved into the file first, and ``EARLIER.PID`` removed.
        """
        pid = os.getpid()
        fd = os.open(
            f"{self.path}.{pid}" if self.per_process else self.path,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o644,
        )
        try:
            if self.earlier is None:
                os.dup2(fd, 2)
                return
            before = f"{self.earlier}.{pid}"
            try:
                with open(before, "rb") as f:
                    os.write(fd, f.read())
                    os.dup2(fd, 2)
                    os.write(fd, f.read())  # written between the first read and the switch
                os.unlink(before)
            except FileNotFoundError:
                os.dup2(fd, 2)
        finally:
            os.close(fd)


class StorageOptions(_OtherProcesses):
    """Give a worker the run's ``output.storage_options`` (:func:`~agriland_scale.files.use_storage_options`).

    So that a worker that writes a block of the product store or fetches a model given as a
    URL uses the credentials of the pipeline file, as the ``agriland`` process does, not its
    environment or the cloud metadata address. Forgotten when the plugin is removed (the run
    unregisters it when it ends: an existing cluster does not keep them).
    """

    name = "agriland-storage-options"

    def __init__(self, location: str, storage_options: dict):
        super().__init__()
        self.location, self.storage_options = location, dict(storage_options)

    def setup_process(self, worker) -> None:  # noqa: ARG002 - WorkerPlugin signature
        """Make the options this worker process's for URLs of the run's kind."""
        use_storage_options(self.location, self.storage_options)

    def teardown(self, worker) -> None:  # noqa: ARG002 - WorkerPlugin signature
        """Forget them (not in the process that registered the plugin: the run's own)."""
        if os.getpid() != self.registered_by:
            use_storage_options(self.location, None)


class FastExit(_OtherProcesses):
    """Let a worker process of the run's own LocalCluster exit without the interpreter's teardown.

    A process that imported TensorFlow spends about a second tearing its modules down after
    its last line (1.16 s against 0.05 s with :func:`os._exit`, measured here), and the run
    waits for its LocalCluster to close. At setup this registers an exit handler that flushes
    the logs and standard streams and ends the process at once. Exit handlers registered
    after it (TensorFlow's, imported later by the model warm-up) still run first. Only for the
    LocalCluster a run starts: the workers of an existing cluster are not the run's to end.
    """

    name = "agriland-fast-exit"

    def setup_process(self, worker) -> None:  # noqa: ARG002 - WorkerPlugin signature
        """Register :func:`_exit_now` to run at the worker process's exit."""
        import atexit

        atexit.register(_exit_now)


def _exit_now() -> None:
    """Flush logging and the standard streams, then end the process (status 0) at once."""
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
