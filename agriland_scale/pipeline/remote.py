"""A run whose ``--out`` is on object storage (``s3://``, ``gs://``, ``az://``).

The products go straight to the run's Icechunk store at ``OUT/agriland.icechunk`` (see
:mod:`.resume`). Every other file (``run.json``, ``items.json``, COGs, pictures, the report,
STAC, logs, models) is built in a local working copy of the run, a cache folder of this
machine that belongs to one lock holder (:func:`working_copy`), and put on the store one
object each (one PUT, never half visible) by :class:`Mirror` after every stage. A run
continued on another machine starts by fetching the run's own files (:func:`.outdir.run_keys`:
an object that is not the run's is never downloaded), so the object store is the only place
a run lives.

One writer: :class:`~.lease.RemoteLock` holds ``OUT/.agriland.lock`` (see :mod:`.lease`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agriland_scale.errors import CorruptInput, LeaseLost, OutputExists
from agriland_scale.files import (
    TMP_SUFFIX,
    cache_dir,
    delete_object,
    download,
    join_url,
    list_objects,
    short_error,
    upload_file,
)
from agriland_scale.layout import LOCK_NAME, RECORD, STORE, load_run_record
from agriland_scale.pipeline.lease import RemoteLock
from agriland_scale.pipeline.outdir import foreign_keys, is_output, run_keys

__all__ = [
    "Mirror",
    "RemoteLock",
    "checked_out",
    "fresh_copy",
    "run_folder",
    "working_copy",
]

log = logging.getLogger(__name__)


_TOKEN = re.compile(r"[0-9a-f]{16,64}")


def working_copy(location: str, holder: str = "") -> Path:
    """Return this machine's working copy of the run at ``location`` (a cache folder).

    Parameters
    ----------
    location : str
        The run's object-storage URL.
    holder : str
        The token of the :class:`RemoteLock` held for the run: every holder gets a folder of
        its own (two processes on one URL never share one), which :func:`checked_out` empties
        when it starts and removes when it ends.

    Returns
    -------
    Path
        ``CACHE/runs/KEY-HOLDER`` (``CACHE/runs/KEY`` without a holder), KEY a hash of
        ``location``.
    """
    key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:20]
    return cache_dir() / "runs" / (f"{key}-{holder}" if holder else key)


def _skip(rel: str) -> bool:
    """Paths that are not the run's files: the product store, the locks, temporary files."""
    return rel.startswith(STORE + "/") or rel == STORE or rel == LOCK_NAME or rel.endswith(TMP_SUFFIX)


def _size_text(size: int) -> str:
    """Return ``size`` (bytes) as people read it: MB from 0.1 MB on."""
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


def _refuse_foreign(location: str, listing: dict[str, int]) -> None:
    """Refuse a location without a run that holds objects no agriland run wrote, naming them.

    The same refusal as :func:`.preflight.prepare_output` gives for a local folder, decided
    from the listing (nothing is downloaded).

    Raises
    ------
    OutputExists
        ``listing`` (path relative to ``location`` -> size) holds such objects.
    """
    foreign = foreign_keys(listing)
    if not foreign:
        return
    shown = ", ".join(f"{k} ({_size_text(listing[k])})" for k in foreign[:5])
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    raise OutputExists(
        f"{location} already holds files that no agriland run wrote ({shown}{more}). agriland writes a "
        "new run only into an empty or new location, and never deletes (or downloads) files it did "
        "not write: choose an empty or new --out prefix"
    )


class Mirror:
    """Keep the run's files at ``location`` equal to the working copy ``local``.

    :meth:`pull` makes the working copy what the store holds of the run's own files;
    :meth:`push` puts what changed locally since the last pull or push, and deletes on the
    store what the run deleted locally (``--force``, ``--overwrite``: only files of ours,
    see :mod:`.outdir`). With the run's ``lock``, :meth:`push` first checks that its lease
    still holds (:meth:`RemoteLock.check`): a run that lost it never writes over the run
    that took over.
    """

    def __init__(
        self,
        location: str,
        local: Path,
        storage_options: dict[str, Any] | None = None,
        lock: RemoteLock | None = None,
    ):
        self.location, self.local, self.options = location.rstrip("/"), Path(local), storage_options
        self.lock = lock
        self._known: dict[str, tuple[int, int]] = {}

    def _local_files(self) -> dict[str, tuple[int, int]]:
        found = {}
        for p in self.local.rglob("*"):
            rel = p.relative_to(self.local).as_posix()
            if p.is_file() and not _skip(rel):
                st = p.stat()
                found[rel] = (st.st_size, st.st_mtime_ns)
        return found

    def _record(self, listing: dict[str, int]) -> dict[str, Any] | None:
        """Fetch ``run.json`` (when listed) and return it, or None (none, or unreadable)."""
        if RECORD not in listing:
            return None
        p = download(join_url(self.location, RECORD), self.local / RECORD, self.options)
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None  # the runner names the damage (layout.read_record)
        return record if isinstance(record, dict) else None

    def pull(self, prefix: str = "", *, refuse_foreign: bool = False) -> list[str]:
        """Fetch the run's own files (under ``prefix``) from the store; with no prefix, replace the copy.

        Which objects are the run's is decided from the listing before any download: with
        no prefix, ``run.json`` is fetched first and the files it records are the run's
        (:func:`.outdir.run_keys`); under a prefix (models a training task put there), the
        paths where stages write (:func:`.outdir.is_output`). Any other object is left
        alone: never downloaded, never deleted.

        Parameters
        ----------
        prefix : str
            Only paths starting with it; ``""``: the whole working copy.
        refuse_foreign : bool
            With no prefix, refuse a location without ``run.json`` that holds other
            objects (a new run goes only into an empty location).

        Returns
        -------
        list of str
            The paths fetched.

        Raises
        ------
        OutputExists
            ``refuse_foreign`` and the location holds files of no run (named, with the URL).
        """
        listing = {
            rel: size
            for rel, size in list_objects(self.location, self.options).items()
            if not _skip(rel) and rel.startswith(prefix)
        }
        if prefix:
            remote = {rel: size for rel, size in listing.items() if is_output(rel)}
        else:
            if refuse_foreign and RECORD not in listing:
                _refuse_foreign(self.location, listing)
            record = self._record(listing)
            remote = {rel: listing[rel] for rel in run_keys(listing, record)}
            for rel in self._local_files():  # what is not on the store is not the run's any more
                if rel not in remote:
                    (self.local / rel).unlink(missing_ok=True)
        got = [RECORD] if RECORD in remote else []
        for rel, size in sorted(remote.items()):
            p = self.local / rel
            if rel != RECORD and not (p.is_file() and p.stat().st_size == size and rel in self._known):
                download(join_url(self.location, rel), p, self.options)
                got.append(rel)
        self._known.update({k: v for k, v in self._local_files().items() if k in remote})
        return got

    def push(self) -> int:
        """Put the files changed since the last pull/push; delete those removed. Returns objects put.

        Raises
        ------
        LeaseLost
            The run's lock was taken over (nothing is put).
        """
        if self.lock is not None:
            self.lock.check()
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


def fresh_copy(local: Path) -> None:
    """Empty the working copy ``local`` (before :meth:`Mirror.pull` fills it)."""
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)


def _forget(location: str, holder: dict[str, Any] | None) -> None:
    """Remove the working copy a holder of this machine left when its process ended (killed)."""
    token = (holder or {}).get("token")
    if isinstance(token, str) and _TOKEN.fullmatch(token):
        shutil.rmtree(working_copy(location, token), ignore_errors=True)


def _put_back(mirror: Mirror) -> bool:
    """Put what changed in the working copy on the store; return whether it is all there.

    A holder that lost its lease puts nothing (:class:`RemoteLock` says why when its block
    ends); a failure is logged, never hiding the block's own error.
    """
    try:
        mirror.push()
    except LeaseLost:
        log.warning("the files this run had not yet put on %s are kept in %s", mirror.location, mirror.local)
        return False
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning(
            "could not put the run's files on %s: %s; they are kept in %s",
            mirror.location,
            short_error(e),
            mirror.local,
        )
        return False
    return True


@contextlib.contextmanager
def checked_out(
    location: str,
    command: str,
    storage_options: dict[str, Any] | None = None,
    notice=None,
    *,
    new_run: bool = True,
) -> Iterator[tuple[Path, Mirror]]:
    """Lock the run at ``location`` and fetch its own files into a working copy of this holder.

    Yields the working copy and its :class:`Mirror`; what changed there is put back when the
    block ends, also after a failure, and the copy is removed (kept, and logged, when it
    could not all be put back). Two holders on one URL never share a copy
    (:func:`working_copy`); the copy of a holder of this machine whose process ended is
    removed when its lock is taken over.

    Parameters
    ----------
    location : str
        The run's object-storage URL.
    command : str
        Names this process in the lock (``"agriland run"``).
    storage_options : dict, optional
        Credentials and endpoint (see :func:`~agriland_scale.files.s3_settings`).
    notice : callable, optional
        Receives a line when a lock is taken over.
    new_run : bool
        The location may take a new run: without ``run.json``, objects of no run there are
        refused (:class:`OutputExists`, naming the URL and them) before any download.

    Raises
    ------
    RunLocked
        Another process holds the run's lease.
    LeaseLost
        Another run took the lease over while the block ran (the block is interrupted, and
        nothing more is put on the store).
    OutputExists
        ``new_run`` and the location holds objects of no run.
    """
    lock = RemoteLock(location, command, storage_options, notice=notice, interrupt=True)
    with lock:
        _forget(location, lock.ended_holder)
        local = working_copy(location, lock.token)
        fresh_copy(local)
        mirror = Mirror(location, local, storage_options, lock=lock)
        try:
            mirror.pull(refuse_foreign=new_run)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        try:
            yield local, mirror
        finally:
            if _put_back(mirror):
                shutil.rmtree(local, ignore_errors=True)


def _run_record(run: str, local: Path) -> None:
    """Check that the copy ``local`` of the run at the URL ``run`` holds its ``run.json``.

    Raises
    ------
    CorruptInput
        There is none: ``run`` is not an agriland run (the message names the URL).
    """
    if not (local / RECORD).is_file():
        raise CorruptInput(
            f"{run} holds no run.json, so it is not the output of an agriland run: pass the "
            "URL given as --out to 'agriland run' / 'agriland demo'"
        )
    load_run_record(local)


@contextlib.contextmanager
def run_folder(run: Path | str, command: str | None = None) -> Iterator[Path]:
    """Give the folder of the run ``run`` (a folder, or an object-storage URL) to read or change.

    ``command`` names a command that writes into the run: the run is locked (its folder's
    lock, or :class:`RemoteLock`), and for object storage the changes are put back. A reader
    of a run on object storage gets a temporary copy of the run's files, never the working
    copy a run on this machine may be writing.

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
            _run_record(run, Path(tmp))
            yield Path(tmp)
        return
    with checked_out(run, command, new_run=False) as (local, _):
        _run_record(run, local)
        yield local
