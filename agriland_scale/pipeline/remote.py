"""A run whose ``--out`` is on object storage (``s3://``, ``gs://``, ``az://``).

The products go straight to the run's Icechunk store at ``OUT/agriland.icechunk`` (see
:mod:`.resume`). Every other file (``run.json``, ``items.json``, COGs, pictures, the report,
STAC, logs, models) is built in a local working copy of the run, a cache folder of this
machine (:func:`working_copy`), and put on the store one object each (one PUT, never half
visible) by :class:`Mirror` after every stage. A run continued on another machine starts by
fetching those files, so the object store is the only place a run lives.

One writer: :class:`RemoteLock` holds ``OUT/.agriland.lock``, an object created with a
conditional PUT (``If-None-Match``: a second ``agriland run`` is refused at once) and
refreshed by a heartbeat; a lock whose heartbeat stopped for :data:`STALE_S` seconds (a
killed process), or whose holder was a process of this host that no longer runs, is taken
over, conditionally on the e-tag it had.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agriland_scale.errors import RunLocked
from agriland_scale.files import (
    TMP_SUFFIX,
    cache_dir,
    delete_object,
    download,
    join_url,
    list_objects,
    object_store,
    upload_file,
)
from agriland_scale.layout import LOCK_NAME, STORE, load_run_record

__all__ = ["HEARTBEAT_S", "STALE_S", "Mirror", "RemoteLock", "checked_out", "fresh_copy", "run_folder",
           "working_copy"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0
STALE_S = 90.0


def working_copy(location: str) -> Path:
    """Return this machine's working copy of the run at ``location`` (a cache folder)."""
    key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:20]
    return cache_dir() / "runs" / key


def _skip(rel: str) -> bool:
    """Paths that are not the run's files: the product store, the locks, temporary files."""
    return rel.startswith(STORE + "/") or rel == STORE or rel == LOCK_NAME or rel.endswith(TMP_SUFFIX)


class Mirror:
    """Keep the run's files at ``location`` equal to the working copy ``local``.

    :meth:`pull` makes the working copy what the store holds; :meth:`push` puts what changed
    locally since the last pull or push, and deletes on the store what the run deleted
    locally (``--force``, ``--overwrite``: only files of ours, see :mod:`.outdir`).
    """

    def __init__(self, location: str, local: Path, storage_options: dict[str, Any] | None = None):
        self.location, self.local, self.options = location.rstrip("/"), Path(local), storage_options
        self._known: dict[str, tuple[int, int]] = {}

    def _local_files(self) -> dict[str, tuple[int, int]]:
        found = {}
        for p in self.local.rglob("*"):
            rel = p.relative_to(self.local).as_posix()
            if p.is_file() and not _skip(rel):
                st = p.stat()
                found[rel] = (st.st_size, st.st_mtime_ns)
        return found

    def pull(self, prefix: str = "") -> list[str]:
        """Fetch the run's files (under ``prefix``) from the store; with no prefix, replace the copy.

        Returns the paths fetched.
        """
        remote = {rel: size for rel, size in list_objects(self.location, self.options).items()
                  if not _skip(rel) and rel.startswith(prefix)}
        if not prefix:  # the whole copy: what is not on the store is not the run's any more
            for rel in self._local_files():
                if rel not in remote:
                    (self.local / rel).unlink(missing_ok=True)
        got = []
        for rel, size in sorted(remote.items()):
            p = self.local / rel
            if not (p.is_file() and p.stat().st_size == size and rel in self._known):
                download(join_url(self.location, rel), p, self.options)
                got.append(rel)
        self._known.update({k: v for k, v in self._local_files().items() if k in remote})
        return got

    def push(self) -> int:
        """Put the files changed since the last pull/push; delete those removed. Returns objects put."""
        now = self._local_files()
        put = 0
        for rel, sig in sorted(now.items()):
            if self._known.get(rel) != sig:
                upload_file(self.local / rel, join_url(self.location, rel), self.options)
                put += 1
        for rel in sorted(set(self._known) - set(now)):
            delete_object(join_url(self.location, rel), self.options)
        self._known = now
        return put


class RemoteLock:
    """The lease of one writer on the run at ``location`` (see the module doc)."""

    def __init__(self, location: str, command: str, storage_options: dict[str, Any] | None = None,
                 notice=None):
        self.location = location.rstrip("/")
        self.command, self.notice = command, notice
        self.store = object_store(self.location, storage_options)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(self.info | {"heartbeat": time.time()}).encode()

    def _read(self) -> tuple[dict[str, Any], str | None] | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            res = obstore.get(self.store, LOCK_NAME)
        except (FileNotFoundError, NotFoundError):
            return None
        try:
            holder = json.loads(bytes(res.bytes()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder = {}
        return (holder if isinstance(holder, dict) else {}), res.meta.get("e_tag")

    @staticmethod
    def describe(h: dict[str, Any]) -> str:
        """Describe the holder ``h`` of a lock: its command, pid, host and start time."""
        return (f"'{h.get('command', '?')}' (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
                f"started {h.get('started', '?')})")

    def acquire(self) -> RemoteLock:
        """Take the lease, or raise :class:`RunLocked` naming the process that holds it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        lock_url = join_url(self.location, LOCK_NAME)
        for _ in range(5):
            try:
                self._etag = obstore.put(self.store, LOCK_NAME, self._body(), mode="create").get("e_tag")
                break
            except (FileExistsError, AlreadyExistsError):
                pass
            found = self._read()
            if found is None:
                continue  # released in between: try again
            holder, etag = found
            age = time.time() - float(holder.get("heartbeat") or 0)
            if age < STALE_S and not _ended_here(holder):
                raise RunLocked(
                    f"{self.location} is in use by {self.describe(holder)} (its lock {lock_url} was "
                    f"refreshed {age:.0f} s ago): one process writes a run at a time. Wait for it to finish "
                    "(or stop it), or choose another --out") from None
            try:  # a holder that stopped refreshing its lock has ended: take it over, if still so
                self._etag = obstore.put(self.store, LOCK_NAME, self._body(),
                                         mode=_if_match(etag)).get("e_tag")
            except (PreconditionError, NotFoundError):  # someone else was first: look again
                continue
            if self.notice:
                self.notice(f"note: the previous run in {self.location}, {self.describe(holder)}, ended "
                            f"without releasing its lock (killed? last refreshed {age:.0f} s ago): its lock "
                            "is taken over")
            break
        else:
            raise RunLocked(f"could not lock {self.location}: its lock keeps changing (another process is "
                            "starting a run there); try again")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="agriland-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        import obstore

        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._etag = obstore.put(self.store, LOCK_NAME, self._body(),
                                         mode=_if_match(self._etag)).get("e_tag")
            except Exception as e:  # noqa: BLE001 - logged; the next beat tries again
                log.warning("could not refresh the lock of %s: %s", self.location, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, if it is still ours (idempotent)."""
        import obstore

        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(10)
        self._thread = None
        found = self._read()
        if found is not None and found[0].get("pid") == self.info["pid"] \
                and found[0].get("host") == self.info["host"]:
            obstore.delete(self.store, LOCK_NAME)

    def __enter__(self) -> RemoteLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _if_match(etag: str | None) -> Any:
    """Return the put mode that replaces an object only while its e-tag is ``etag`` (If-Match)."""
    return {"e_tag": etag} if etag else "create"


def _ended_here(holder: dict[str, Any]) -> bool:
    """Tell whether a lock's holder ran on this host and its process no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def fresh_copy(local: Path) -> None:
    """Empty the working copy ``local`` (before :meth:`Mirror.pull` fills it)."""
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)


@contextlib.contextmanager
def checked_out(location: str, command: str, storage_options: dict[str, Any] | None = None,
                notice=None) -> Iterator[tuple[Path, Mirror]]:
    """Lock the run at ``location`` and fetch its files into this machine's working copy.

    Yields the working copy and its :class:`Mirror`; what changed there is put back when the
    block ends, also after a failure (a problem putting it back is logged, never hiding the
    block's own error: the next command on the run puts it back).
    """
    with RemoteLock(location, command, storage_options, notice=notice):
        local = working_copy(location)
        fresh_copy(local)
        mirror = Mirror(location, local, storage_options)
        mirror.pull()
        try:
            yield local, mirror
        finally:
            try:
                mirror.push()
            except Exception as e:  # noqa: BLE001 - see the docstring
                log.warning("could not put the run's files on %s: %s", location, e)


@contextlib.contextmanager
def run_folder(run: Path | str, command: str | None = None) -> Iterator[Path]:
    """Give the folder of the run ``run`` (a folder, or an object-storage URL) to read or change.

    ``command`` names a command that writes into the run: the run is locked (its folder's
    lock, or :class:`RemoteLock`), and for object storage the changes are put back. A reader
    of a run on object storage gets a temporary copy of its files, never the working copy a
    run on this machine may be writing.

    Raises
    ------
    CorruptInput
        ``run`` holds no run (no readable ``run.json``).
    """
    if isinstance(run, Path):
        load_run_record(run)
        if command is None:
            yield run
            return
        from agriland_scale.pipeline.outdir import locked

        with locked(run, command):
            yield run
        return
    if command is None:
        with tempfile.TemporaryDirectory(prefix="agriland-read-") as tmp:
            Mirror(run, Path(tmp)).pull()
            load_run_record(Path(tmp))
            yield Path(tmp)
        return
    with checked_out(run, command) as (local, _):
        load_run_record(local)
        yield local
