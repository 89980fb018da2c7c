"""The lease of one writer on a run on object storage: ``OUT/.agriland.lock``.

:class:`RemoteLock` creates the lock with a conditional PUT (``If-None-Match``: a second
``agriland run`` is refused at once) naming its holder with a random token, its host, pid,
boot id and PID namespace, and refreshes it by a heartbeat every :data:`HEARTBEAT_S` seconds,
conditionally on its e-tag. A lease not refreshed for :data:`STALE_S` seconds has expired and
is taken over (a killed process, or one paused or cut off from the store), as is the lock of a
process that provably ended: one of this very machine (same boot id) and PID namespace whose
pid no longer runs (a host name proves nothing: containers and machines may share one). A
holder whose heartbeat finds the lock taken over, or that cannot refresh it before it expires,
stops at once with :class:`~agriland_scale.errors.LeaseLost`. Both timings can be shortened
with the variables ``AGRILAND_LOCK_HEARTBEAT_S`` and ``AGRILAND_LOCK_STALE_S`` (read at
import) or by setting this module's attributes. :mod:`.remote` holds the run's files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agriland_scale.errors import LeaseLost, RunLocked
from agriland_scale.files import join_url, object_store, short_error
from agriland_scale.layout import LOCK_NAME

__all__ = ["HEARTBEAT_S", "STALE_S", "RemoteLock"]

log = logging.getLogger(__name__)


def _seconds(variable: str, default: float) -> float:
    """Read a positive number of seconds from the environment variable ``variable``, else ``default``."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        log.warning("%s=%r is not a positive number of seconds: %g s is used", variable, raw, default)
        return default
    return value


HEARTBEAT_S = _seconds("AGRILAND_LOCK_HEARTBEAT_S", 20.0)  # how often a holder refreshes its lease
STALE_S = _seconds("AGRILAND_LOCK_STALE_S", 90.0)  # a lease not refreshed for this long has expired


def _this_machine() -> dict[str, str | None]:
    """Return this process's boot id and PID namespace: a pid names the same process only where both match."""
    here: dict[str, str | None] = {"boot_id": None, "pid_ns": None}
    with contextlib.suppress(OSError):  # Linux only: elsewhere no holder is known to have ended
        here["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
        here["pid_ns"] = os.readlink("/proc/self/ns/pid")
    return here


def _heartbeat(holder: dict[str, Any]) -> float:
    """Return when the lock's holder last refreshed it (seconds since the epoch; 0 if unknown)."""
    try:
        return float(holder.get("heartbeat") or 0)
    except (TypeError, ValueError):
        return 0.0


class RemoteLock:
    """The lease of one writer on the run at ``location`` (see the module doc).

    ``notice`` receives a line when an expired lock, or one of a process that ended, is taken
    over. ``interrupt``: when the lease is lost, the heartbeat interrupts the main thread (as
    Ctrl-C would, where SIGINT is handled) and leaving the ``with`` block raises
    :class:`~agriland_scale.errors.LeaseLost`; without it, :meth:`check` raises it.
    """

    def __init__(
        self,
        location: str,
        command: str,
        storage_options: dict[str, Any] | None = None,
        notice=None,
        *,
        interrupt: bool = False,
    ):
        self.location = location.rstrip("/")
        self.command, self.notice, self.interrupt = command, notice, interrupt
        self.store = object_store(self.location, storage_options)
        self.token = secrets.token_hex(16)
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **_this_machine(),
            "token": self.token,
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv[:8],
        }
        self.ended_holder: dict[str, Any] | None = None  # a holder taken over because its process ended
        self._etag: str | None = None
        self._refreshed = 0.0  # time.time() of the last refresh that succeeded
        self._lost: str | None = None  # why the lease was lost
        self._held = False
        self._guard = threading.Lock()  # one refresh at a time, and none after release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, mode: Any) -> None:
        import obstore

        now = time.time()
        self._etag = obstore.put(
            self.store, LOCK_NAME, json.dumps(self.info | {"heartbeat": now}).encode(), mode=mode
        ).get("e_tag")
        self._refreshed = now

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
        return (
            f"'{h.get('command', '?')}' (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
            f"started {h.get('started', '?')})"
        )

    def acquire(self) -> RemoteLock:
        """Take the lease, or raise :class:`RunLocked` naming the process that holds it.

        Raises
        ------
        RunLocked
            A holder refreshed the lock less than :data:`STALE_S` seconds ago and is not a
            process of this machine and PID namespace that has ended.
        """
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        lock_url = join_url(self.location, LOCK_NAME)
        for _ in range(5):
            try:
                self._put("create")
                break
            except (FileExistsError, AlreadyExistsError):
                pass
            found = self._read()
            if found is None:
                continue  # released in between: try again
            holder, etag = found
            age = time.time() - _heartbeat(holder)
            ended = _ended_here(holder)
            if age < STALE_S and not ended:
                raise RunLocked(
                    f"{self.location} is in use by {self.describe(holder)} (its lock {lock_url} was "
                    f"refreshed {max(age, 0):.0f} s ago; a lock not refreshed for {STALE_S:.0f} s is taken "
                    "over): one process writes a run at a time. Wait for it to finish (or stop it), or "
                    "choose another --out"
                ) from None
            try:  # an expired lease, or a holder that ended: take it over, if still so
                self._put(_if_match(etag))
            except (PreconditionError, NotFoundError, FileNotFoundError, AlreadyExistsError, FileExistsError):
                continue  # someone else was first
            self._took_over(holder, age, ended)
            break
        else:
            raise RunLocked(
                f"could not lock {self.location}: its lock keeps changing (another process is "
                "starting a run there); try again"
            )
        self._held, self._lost = True, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="agriland-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _took_over(self, holder: dict[str, Any], age: float, ended: bool) -> None:
        if ended:
            self.ended_holder = holder
            what = "ended without releasing its lock (its process no longer runs on this machine)"
        else:
            silent = f"for {age:.0f} s" if _heartbeat(holder) > 0 else "(its lock holds no heartbeat)"
            what = (
                f"did not refresh its lock {silent} (a lease expires after {STALE_S:.0f} s: that "
                "process ended, or was paused or cut off from the object store; should it still run, it "
                "stops when it finds its lease taken)"
            )
        if self.notice:
            self.notice(
                f"note: the previous run in {self.location}, {self.describe(holder)}, {what}: its "
                "lock is taken over"
            )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._refresh():
                self._interrupt_main()
                return

    def _refresh(self) -> bool:
        """Refresh the lease if the lock is still this holder's; else record why it is lost.

        A refresh that fails for another reason (the network) is tried again at the next beat,
        unless the lease would expire before it: then it is lost too. Returns whether the
        lease is held.
        """
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        with self._guard:
            if self._lost is not None or not self._held:
                return self._lost is None
            silent = time.time() - self._refreshed
            try:
                self._put(_if_match(self._etag))
            except (PreconditionError, NotFoundError, FileNotFoundError, AlreadyExistsError, FileExistsError):
                self._lost = self._loss(silent)
            except Exception as e:  # noqa: BLE001 - the network: the next beat tries again, in time
                if silent + HEARTBEAT_S < STALE_S:
                    log.warning(
                        "could not refresh the lock of %s (tried again in %.0f s): %s",
                        self.location,
                        HEARTBEAT_S,
                        short_error(e),
                    )
                    return True
                self._lost = self._loss(silent, e)
            else:
                if silent >= STALE_S:
                    log.warning(
                        "the lease on %s was not refreshed for %.0f s; no other run took it over, so "
                        "this one goes on",
                        self.location,
                        silent,
                    )
                return True
        log.info("%s", self._lost)
        return False

    def _loss(self, silent: float, error: Exception | None = None) -> str:
        """Say why the lease is lost: who took it over, or why it could not be refreshed."""
        try:
            found = self._read()
        except Exception:  # noqa: BLE001 - only for the message
            found = None
        holder = found[0] if found is not None else None
        stopped = (
            "; this run stopped so that two runs never write there at once; its finished work is "
            "kept (what it had put on the object store)"
        )
        if holder is not None and holder.get("token") != self.token:
            return (
                f"another run, {self.describe(holder)}, took over {self.location} after this one's lease "
                f"was not refreshed for {silent:.0f} s (a lease expires after {STALE_S:.0f} s: was this "
                f"process paused, or cut off from the object store?){stopped}. Wait for that run to finish "
                "(or stop it), then run the same command again to continue"
            )
        if holder is None and error is None:
            return (
                f"the lock of this run on {self.location} was removed (by another run that took it over, "
                f"or by hand) after this one's lease was not refreshed for {silent:.0f} s{stopped}. Run "
                "the same command again to continue"
            )
        return (
            f"this run could not refresh its lease on {self.location} for {silent:.0f} s "
            f"({short_error(error) if error else 'no answer'}), and "
            f"after {STALE_S:.0f} s another run may take it over{stopped}. Run the same command again "
            "once the object store answers"
        )

    def _interrupt_main(self) -> None:
        """Interrupt the main thread (as Ctrl-C) if asked to and SIGINT is handled in Python."""
        with self._guard:
            if not self.interrupt or self._stop.is_set() or not hasattr(signal, "pthread_kill"):
                return
            main = threading.main_thread()
            if main is threading.current_thread() or not main.is_alive() or main.ident is None:
                return
            if callable(signal.getsignal(signal.SIGINT)):  # else it would kill, or be ignored
                signal.pthread_kill(main.ident, signal.SIGINT)
            else:
                log.warning("%s (it stops at its next check: SIGINT is not handled here)", self._lost)

    def check(self) -> None:
        """Make sure the lease still holds; call it between stages (:meth:`Mirror.push` does).

        A lease not refreshed for :data:`STALE_S` seconds (the heartbeat was held up) is
        refreshed now, if no other run took it over meanwhile.

        Raises
        ------
        LeaseLost
            Another run took the lock over, or it could not be refreshed in time; the
            message says which and what to do.
        """
        if self._held and self._lost is None and time.time() - self._refreshed >= STALE_S:
            self._refresh()
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, if it is still ours (idempotent).

        A lock whose token is another holder's, or a lease that is lost, is left alone.
        """
        import obstore

        if not self._held:
            return
        with self._guard:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._lost is None and time.time() - self._refreshed >= STALE_S:
            self._refresh()  # an expired lease is ours only while nobody took it over
        self._held = False
        if self._lost is not None:
            return
        found = self._read()
        if found is not None and found[0].get("token") == self.token:
            obstore.delete(self.store, LOCK_NAME)

    def __enter__(self) -> RemoteLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Release; a block that ran while the lease was lost ends with :class:`LeaseLost`."""
        try:
            self.release()
        except KeyboardInterrupt as late:  # the heartbeat's interrupt, arriving here
            if self._lost is None:
                raise
            exc = exc or late
        if self._lost is not None and not isinstance(exc, LeaseLost):
            raise LeaseLost(self._lost) from exc


def _if_match(etag: str | None) -> Any:
    """Return the put mode that replaces an object only while its e-tag is ``etag`` (If-Match)."""
    return {"e_tag": etag} if etag else "create"


def _ended_here(holder: dict[str, Any]) -> bool:
    """Tell whether a lock's holder was a process of this machine and PID namespace that no longer runs.

    The host name proves nothing (containers, machines named alike); the holder's boot id
    and PID namespace, recorded in its lock, must be this process's, or its pid may be
    another process's.
    """
    here, pid = _this_machine(), holder.get("pid")
    if None in here.values() or any(holder.get(k) != v for k, v in here.items()):
        return False
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False
