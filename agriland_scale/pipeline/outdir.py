"""The output folder of a run: one writer at a time, and only our own files deleted.

Two guarantees live here, used by every command that writes into a run folder
(``run``, ``demo``, ``train-cae``, ``train-unet``, ``report``, ``export-labels``,
``import-labels``):

**One writer.** :class:`RunLock` takes ``OUT/.agriland.lock``: an exclusive ``flock`` on the
file, held for the command's lifetime, and in the file the holder's host, pid, command and
start time. A second process finds the lock held and refuses with :class:`RunLocked`,
naming the holder; the first is not touched. The kernel drops a ``flock`` when its process
dies, so a lock file left by a killed process is recognised as stale; it is reported and
taken over only when the holder is on this host and its pid no longer runs. A stale-looking
lock from another host (a shared filesystem) is never taken over: the message says how to
remove it once you know that run has ended.

**Our files only.** A run records in ``run.json`` (``files``: ``{stage: [relative path,
...]}``) every file each stage created or rewrote where stages write (:data:`OUTPUT_PATTERNS`),
found by comparing the folder before and after the stage (:func:`snapshot`,
:func:`changed_since`). The Zarr store and the staging
folder are ours as wholes (a new run only starts in an empty folder). ``--overwrite`` and
``--force`` delete exactly what the record lists (:func:`remove_files`) and then the
folders this left empty, never a file a run of ours did not write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from agriland_scale.errors import OutputError, RunLocked
from agriland_scale.files import TMP_SUFFIX
from agriland_scale.layout import LOCK_NAME, LOGS_DIR, PARTIAL_DIR, RECORD, STAGE_FILES, STORE

__all__ = [
    "LOCK_NAME",
    "OUTPUT_PATTERNS",
    "OWNED_DIRS",
    "RunLock",
    "changed_since",
    "check_writable",
    "foreign_entries",
    "foreign_keys",
    "is_output",
    "locked",
    "remove_files",
    "run_keys",
    "snapshot",
]

log = logging.getLogger(__name__)

# folders that belong to a run as a whole (never mixed with a user's files)
OWNED_DIRS = (STORE, PARTIAL_DIR)  # PARTIAL_DIR: staging of versions before the Icechunk store
# entries a run folder may hold before any run: what earlier invocations of ours leave
_NEUTRAL = {LOCK_NAME, LOGS_DIR}


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder this process cannot write into.

    Raises
    ------
    OutputError
        ``out`` (or a parent) is a file, or is read-only.
    """
    for p in [out, *out.parents]:
        if p.exists():
            if not p.is_dir():
                what = f"--out {out}" if p == out else f"{p}, a parent of --out {out},"
                raise OutputError(
                    f"{what} is a file, not a folder: choose a folder for the run's "
                    f"outputs (it is created if missing), e.g. {out.with_suffix('')}-run"
                )
            if not os.access(p, os.W_OK | os.X_OK):
                raise OutputError(
                    f"cannot write into {p} (permission denied): choose an --out folder you can write to"
                )
            return


def foreign_entries(out: Path) -> list[str]:
    """Names in ``out`` that no earlier command of ours leaves in a folder without a run."""
    if not out.is_dir():
        return []
    return foreign_keys(p.name for p in out.iterdir())


def foreign_keys(keys: Iterable[str]) -> list[str]:
    """Paths that no earlier command of ours leaves in a location without a run.

    :func:`foreign_entries` for a listing: ``keys`` are paths relative to OUT, with ``/``
    (an object store's keys under an ``--out`` prefix). Returns them sorted.
    """
    return sorted(k for k in keys if k.split("/", 1)[0] not in _NEUTRAL)


def run_keys(keys: Iterable[str], record: Mapping[str, Any] | None) -> list[str]:
    """Pick from a listing the paths that are files of the run recorded in ``record``.

    Decided from the names alone (nothing is read): ``run.json``, the logs, the folders
    that are the run's as wholes (:data:`OWNED_DIRS`), and what the record lists as the
    run's (``files``, and ``pending_removal``: files a ``--force`` is still to delete); for
    a record of an older agriland-scale without ``files``, every path where a stage writes
    (:func:`is_output`). A path of no run (a user's object beside the run) is never
    picked, so it is never fetched nor deleted.

    Parameters
    ----------
    keys : iterable of str
        Paths relative to OUT, with ``/``.
    record : mapping or None
        The run's ``run.json``; ``None`` when there is none (or it is unreadable): only
        ``run.json``, the logs and the owned folders are the run's.

    Returns
    -------
    list of str
        The run's paths, sorted.
    """
    files = record.get("files") if record is not None else None
    recorded: set[str] = set()
    if isinstance(files, dict):
        recorded = {f for fs in files.values() if isinstance(fs, list) for f in fs if isinstance(f, str)}
    pending = record.get("pending_removal") if record is not None else None
    if isinstance(pending, list):
        recorded |= {f for f in pending if isinstance(f, str)}
    older = record is not None and not isinstance(files, dict)

    def ours(key: str) -> bool:
        top = key.split("/", 1)[0]
        return (
            key == RECORD
            or top == LOGS_DIR
            or top in OWNED_DIRS
            or key in recorded
            or (older and is_output(key))
        )

    return sorted(k for k in keys if ours(k))


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Record ``{relative path: (size, mtime_ns)}`` of the files under ``out``.

    The owned folders (:data:`OWNED_DIRS`), the logs, the lock, ``run.json`` and temporary
    files are left out (cheap: a few hundred files).

    Parameters
    ----------
    out : Path
        The run's output folder.

    Returns
    -------
    dict
        Path relative to ``out`` (with ``/``) -> (size in bytes, mtime in ns); empty when
        ``out`` is not a folder.
    """
    found: dict[str, tuple[int, int]] = {}
    if not out.is_dir():
        return found
    for root, dirs, files in os.walk(out):
        rel_root = os.path.relpath(root, out)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d not in OWNED_DIRS and d != LOGS_DIR]
        for f in files:
            rel = f if rel_root == "." else os.path.join(rel_root, f)
            if rel == LOCK_NAME or rel == RECORD or rel.endswith(TMP_SUFFIX):
                continue
            try:
                st = os.stat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            found[rel.replace(os.sep, "/")] = (st.st_size, st.st_mtime_ns)
    return found


# where the stages write (relative to OUT, fnmatch patterns): only files created or rewritten
# there during a stage are recorded as the run's, so that a file a user saves into the run
# folder while a stage runs (labels being drawn, a notebook) is never taken for ours
# (each stage's row of layout.STAGE_TABLE names its own)
OUTPUT_PATTERNS = STAGE_FILES


def is_output(rel: str) -> bool:
    """Tell whether ``rel`` (relative to OUT, with ``/``) is where a stage writes its files."""
    return any(fnmatch.fnmatchcase(rel, pat) for pat in OUTPUT_PATTERNS)


def changed_since(out: Path, before: dict[str, tuple[int, int]]) -> list[str]:
    """List the output files under ``out`` created or rewritten since ``before``.

    Output files match :data:`OUTPUT_PATTERNS`; ``before`` is a :func:`snapshot`.

    Parameters
    ----------
    out : Path
        The run's output folder.
    before : dict
        A :func:`snapshot` taken earlier.

    Returns
    -------
    list of str
        Paths relative to ``out`` (with ``/``), sorted.
    """
    return sorted(k for k, v in snapshot(out).items() if before.get(k) != v and is_output(k))


def remove_files(out: Path, rels: Iterable[str]) -> list[str]:
    """Delete the listed files (paths relative to ``out``) and the folders this empties.

    A path that leaves ``out`` (``..``, absolute) is ignored. Folders are removed only when
    they end up empty (``rmdir``), so a user's file beside ours keeps its folder. Returns
    the paths deleted.
    """
    root = out.resolve()
    gone: list[str] = []
    parents: set[Path] = set()
    for rel in rels:
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            continue
        p = root / rel  # not resolved: a link is removed itself, never what it points to
        if root not in p.parent.resolve().parents and p.parent.resolve() != root:
            continue  # a folder on the way is a link out of the run folder
        if p.is_dir() and not p.is_symlink():
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not delete %s: %s", p, e)
        else:
            gone.append(rel)
        parents.update(q for q in p.parents if root in q.parents)
    for d in sorted(parents, key=lambda q: len(q.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty
    return gone


class RunLock:
    """Exclusive lock of an output folder (see the module doc).

    ``RunLock(out, "agriland run").acquire()`` creates ``out`` if needed; :meth:`release`
    (or leaving the ``with`` block) removes the lock file. ``notice`` receives a line when a
    stale lock of a dead process is taken over.
    """

    def __init__(self, out: str | Path, command: str, notice=None):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.command = command
        self.notice = notice
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None

    def _holder(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        if not raw.strip():
            return None
        try:
            info = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"host": "?", "pid": None, "command": "?", "started": "?"}
        return info if isinstance(info, dict) else {"host": "?", "pid": None}

    @staticmethod
    def describe(h: dict[str, Any]) -> str:
        """Describe the holder ``h`` of a lock: its command, pid, host and start time."""
        return (
            f"'{h.get('command', '?')}' (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
            f"started {h.get('started', '?')})"
        )

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunLocked` naming the process that holds it.

        Raises
        ------
        RunLocked
            Another live process holds the lock, or a process on another host left it.
        OutputError
            ``out`` is a file or not writable.
        """
        check_writable(self.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(
                f"cannot create the output folder {self.out} ({e.strerror}): choose another --out"
            ) from None
        holder: dict[str, Any] | None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                raise OutputError(
                    f"cannot write into {self.out} (permission denied): choose an "
                    "--out folder you can write to"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise OutputError(
                        f"the file system of {self.out} does not support file locks ({e.strerror}), "
                        "so agriland cannot make sure that one process writes this run: choose an "
                        "--out folder on a local disk or a file system with locks (NFSv4, ...)"
                    ) from None
                holder = self._holder(fd) or {}
                os.close(fd)
                raise RunLocked(
                    f"{self.out} is in use by {self.describe(holder)}: one process writes a run "
                    "at a time. Wait for it to finish (or stop it), or choose another --out "
                    "folder"
                ) from None
            # the file we locked must still be the one at the path (a holder that was
            # releasing may have unlinked it between our open and our flock)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = self._holder(fd)
            if holder is not None:  # left by a process that ended without releasing it
                # on this host the free flock proves the holder has ended (the kernel drops a
                # process's flock when it dies); a holder on another host cannot be checked
                if holder.get("host") != socket.gethostname():
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                    raise RunLocked(
                        f"{self.out} holds a lock of {self.describe(holder)}, from another host, "
                        "so agriland cannot tell whether that run still writes here. If it has "
                        f"ended, delete {self.path} and run again; otherwise wait for it or choose "
                        "another --out folder"
                    )
                self.took_over = holder
                if self.notice:
                    self.notice(
                        f"note: the previous run in {self.out}, {self.describe(holder)}, "
                        "ended without releasing its lock (killed?): its lock is taken over"
                    )
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "command": self.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv[:8],
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunLocked(
            f"could not lock {self.out}: the lock file keeps changing (another process "
            "is starting a run there); try again"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:  # only our own file: someone may have deleted it and another run made a new one
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # a folder turned read-only: the file stays, unlocked (the next run takes it)
            log.warning("could not remove the lock file %s: %s", self.path, e)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(out: str | Path, command: str, notice=None) -> Iterator[RunLock]:
    """``with locked(out, "agriland report"):`` — :class:`RunLock` as a context manager.

    When the block fails and ``out`` did not exist before, the folder this created is
    removed again if it is empty (a refused run leaves nothing behind).
    """
    out = Path(out)
    existed = out.exists()
    lock = RunLock(out, command, notice).acquire()
    try:
        yield lock
    except BaseException:
        lock.release()
        if not existed:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    else:
        lock.release()
