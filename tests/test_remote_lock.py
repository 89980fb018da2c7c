"""The lease lock and the working copy of a run on object storage, against a real S3 server.

Issue 31 ("Nothing lost, round two"): a holder is its random token, not (host name, pid); a
lock is taken over only when its lease expired or its holder provably ended on this very
machine (boot id and PID namespace); a writer that lost its lease stops at once and never
releases or overwrites the lock of the run that took over; two runs never share one working
copy; objects that are not the run's are never downloaded, and a location holding some is
refused naming its URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agriland_scale.errors import LeaseLost, OutputExists, RunLocked
from agriland_scale.pipeline import lease
from agriland_scale.pipeline.remote import RemoteLock, checked_out, working_copy

LOCK = ".agriland.lock"
HERE = {
    "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
    "pid_ns": os.readlink("/proc/self/ns/pid"),
}
BIG = 5_000_000  # bytes of a foreign object that must never reach the cache


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """This test's own agriland cache (working copies)."""
    monkeypatch.setenv("AGRILAND_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def short_lease(monkeypatch) -> None:
    """A lease of 2 s refreshed every 0.25 s (instead of 90 s and 20 s)."""
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.25)
    monkeypatch.setattr(lease, "STALE_S", 2.0)


def _url(s3_env, what: str) -> str:
    return s3_env.url(f"{what}-{uuid.uuid4().hex[:8]}")


def _store(url: str):
    from agriland_scale.files import object_store

    return object_store(url)


def _put(url: str, key: str, data: bytes) -> None:
    import obstore

    obstore.put(_store(url), key, data)


def _get_json(url: str, key: str) -> dict:
    import obstore

    return json.loads(bytes(obstore.get(_store(url), key).bytes()))


def _keys(url: str) -> set[str]:
    from agriland_scale.files import list_objects

    return set(list_objects(url))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock_body(**holder) -> bytes:
    """A lock as another process would have written it: this host's name, a fresh heartbeat."""
    return json.dumps(
        {
            "host": socket.gethostname(),
            "command": "agriland run",
            "started": "2026-12-01T10:00:00",
            "heartbeat": time.time(),
            "token": uuid.uuid4().hex,
        }
        | holder
    ).encode()


def _biggest_file(folder: Path) -> int:
    return max((p.stat().st_size for p in folder.rglob("*") if p.is_file()), default=0)


# --- who holds the lock: a token, and "ended" only on this very machine -----------------------------


@pytest.mark.parametrize(
    "where",
    [
        {"boot_id": HERE["boot_id"], "pid_ns": "pid:[1]"},  # a container sharing the host name
        {"boot_id": str(uuid.uuid4()), "pid_ns": HERE["pid_ns"]},  # another machine named alike
        {},  # a lock that does not say (an older agriland-scale)
    ],
    ids=["other-pid-namespace", "other-boot", "unknown"],
)
def test_a_fresh_lock_of_a_pid_not_running_here_is_not_taken_over(s3_env, cache, where):
    """Same host name, a pid that no process of this namespace has, a fresh heartbeat: the holder
    may well be alive elsewhere, so a second run is refused."""
    url = _url(s3_env, "lock-elsewhere")
    pid = _dead_pid()
    _put(url, LOCK, _lock_body(pid=pid, **where))
    with pytest.raises(
        RunLocked, match=rf"is in use by 'agriland run' \(pid {pid} on host {socket.gethostname()}"
    ):
        RemoteLock(url, "agriland run").acquire()
    assert _get_json(url, LOCK)["pid"] == pid  # untouched


def test_the_lock_of_a_process_that_ended_on_this_machine_is_taken_over(s3_env, cache):
    """Same boot id and PID namespace, and the pid is gone: the holder has ended; its lock is
    taken over at once (no waiting for the lease), and its left-over working copy removed."""
    url = _url(s3_env, "lock-dead")
    dead_token = uuid.uuid4().hex
    _put(url, LOCK, _lock_body(pid=_dead_pid(), token=dead_token, **HERE))
    left = working_copy(url, dead_token)
    left.mkdir(parents=True)
    (left / "run.json").write_text("{}")
    notes: list[str] = []
    with checked_out(url, "agriland run", notice=notes.append) as (_, mirror):
        held = _get_json(url, LOCK)
        assert held["token"] == mirror.lock.token and held["pid"] == os.getpid()
        assert held["boot_id"] == HERE["boot_id"] and held["pid_ns"] == HERE["pid_ns"]
    assert len(notes) == 1 and "no longer runs on this machine" in notes[0] and "killed?" not in notes[0]
    assert not left.exists()
    assert LOCK not in _keys(url)


def test_an_expired_lease_is_taken_over_saying_how_long_it_was_not_refreshed(s3_env, cache):
    url = _url(s3_env, "lock-stale")
    _put(url, LOCK, _lock_body(host="elsewhere", pid=1, heartbeat=time.time() - 3600))
    notes: list[str] = []
    lock = RemoteLock(url, "agriland run", notice=notes.append).acquire()
    try:
        assert _get_json(url, LOCK)["token"] == lock.token
    finally:
        lock.release()
    assert len(notes) == 1 and "killed?" not in notes[0], notes
    assert "'agriland run' (pid 1 on host elsewhere" in notes[0]
    assert re.search(r"did not refresh its lock for 36\d\d s \(a lease expires after 90 s", notes[0]), notes
    assert notes[0].endswith("its lock is taken over")


# --- a holder that lost its lease -------------------------------------------------------------------


def test_a_holder_whose_lease_was_taken_over_leaves_the_new_lock_alone(
    s3_env, cache, short_lease, monkeypatch
):
    """A's heartbeat does not come in time (a paused process), B takes the expired lock over:
    A's release does not delete B's lock (same host and pid here: only the token tells them
    apart), and A's check raises LeaseLost naming B."""
    url = _url(s3_env, "lock-lost")
    monkeypatch.setattr(lease, "HEARTBEAT_S", 60.0)  # no beat during this test
    a = RemoteLock(url, "agriland run (A)").acquire()
    with pytest.raises(RunLocked):
        RemoteLock(url, "agriland run (B)").acquire()
    time.sleep(lease.STALE_S + 0.3)
    b = RemoteLock(url, "agriland run (B)").acquire()
    try:
        a.release()
        assert _get_json(url, LOCK)["command"] == "agriland run (B)"  # still there
        with pytest.raises(
            LeaseLost,
            match=r"another run, 'agriland run \(B\)' .*, took over s3://.* after "
            r"this one's lease was not refreshed for \d+ s.*this run stopped",
        ):
            a.check()
    finally:
        b.release()
    assert LOCK not in _keys(url)


def test_an_expired_lease_that_nobody_took_is_refreshed_and_goes_on(s3_env, cache, short_lease, monkeypatch):
    """The conditional refresh proves that no other run took the lock: the run goes on."""
    url = _url(s3_env, "lock-late")
    monkeypatch.setattr(lease, "HEARTBEAT_S", 60.0)
    lock = RemoteLock(url, "agriland run").acquire()
    time.sleep(lease.STALE_S + 0.3)
    lock.check()  # refreshed now
    assert time.time() - _get_json(url, LOCK)["heartbeat"] < 1.5
    lock.release()
    assert LOCK not in _keys(url)


CHILD = r"""
import signal, sys, time
from agriland_scale.errors import AgrilandError
# Ctrl-C handled in Python, as in a terminal: a test run started in the background (nohup,
# `&` without job control) hands its children SIGINT ignored, and the lost lease could then
# only stop the writer at its next check, which this one never makes
signal.signal(signal.SIGINT, signal.default_int_handler)
from agriland_scale.pipeline.remote import checked_out

try:
    with checked_out(sys.argv[1], "agriland run (A)") as (local, mirror):
        print("held", local, flush=True)
        while True:  # a stage computing
            time.sleep(0.05)
except AgrilandError as e:  # as the CLI: one paragraph, exit 2
    print(f"agriland: error: {e}", flush=True)
    sys.exit(2)
"""


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the first writer did not take the lock in time"
    return proc.stdout.readline()


def test_a_paused_writer_stops_when_another_run_took_over(s3_env, cache, short_lease, tmp_path):
    """A holds the lock; it is paused (SIGSTOP) past its lease; B takes over; A resumes
    (SIGCONT): A stops at once with LeaseLost (exit 2) naming B and how long its lease was not
    refreshed, and leaves B's lock, and B's working copy, alone."""
    url = _url(s3_env, "lock-paused")
    env = (
        os.environ
        | s3_env.env
        | {
            "AGRILAND_CACHE": str(cache),
            "AGRILAND_LOCK_HEARTBEAT_S": "0.25",
            "AGRILAND_LOCK_STALE_S": str(lease.STALE_S),
        }
    )
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = _first_line(proc, 60)
        assert line.startswith("held "), line + proc.stdout.read()
        local_a = Path(line.split(" ", 1)[1].strip())
        deadline = time.monotonic() + 10  # paused right after a refresh (the first PUT may be slow)
        while time.time() - _get_json(url, LOCK)["heartbeat"] > 0.5:
            assert time.monotonic() < deadline, "the first writer's heartbeat does not come"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)
        notes: list[str] = []
        refused, deadline = 0, time.monotonic() + 20
        with contextlib.ExitStack() as stack:
            while True:
                try:
                    local_b, mirror = stack.enter_context(
                        checked_out(url, "agriland run (B)", notice=notes.append)
                    )
                    break
                except RunLocked:
                    refused += 1
                    assert time.monotonic() < deadline, "the paused writer's lock was never taken over"
                    time.sleep(0.2)
            assert refused >= 1  # not while its lease held
            assert (
                len(notes) == 1 and "did not refresh its lock for" in notes[0] and "killed?" not in notes[0]
            )
            (local_b / "report.html").write_text("B's")
            os.kill(proc.pid, signal.SIGCONT)
            out, _ = proc.communicate(timeout=20)
            assert proc.returncode == 2, out
            assert (
                "another run, 'agriland run (B)'" in out
                and f"took over {url} after this one's lease was not refreshed for" in out
                and "this run stopped" in out
            ), out
            assert "ConflictError" not in out and "Traceback" not in out, out
            held = _get_json(url, LOCK)
            assert held["token"] == mirror.lock.token and held["command"] == "agriland run (B)"
            assert local_a != local_b and (local_b / "report.html").read_text() == "B's"
        assert LOCK not in _keys(url) and "report.html" in _keys(url)
        assert not local_b.exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


# --- working copies ---------------------------------------------------------------------------------


def test_every_holder_has_its_own_working_copy_removed_after_the_run(s3_env, cache):
    url = _url(s3_env, "copies")
    _put(url, "run.json", json.dumps({"config": {"name": "r"}, "files": {"search": ["items.json"]}}).encode())
    _put(url, "items.json", b"{}")
    with checked_out(url, "agriland run") as (first, mirror):
        assert first == working_copy(url, mirror.lock.token) != working_copy(url)
        assert (first / "items.json").is_file()
        (first / "items.json").write_text('{"v": 2}')
        with pytest.raises(RunLocked):  # a second run on the URL: refused, the copy untouched
            with checked_out(url, "agriland run"):
                pass
        assert (first / "items.json").read_text() == '{"v": 2}'
    assert not first.exists()
    with checked_out(url, "agriland report", new_run=False) as (second, _):
        assert second != first and (second / "items.json").read_text() == '{"v": 2}'
    assert not second.exists()


# --- only the run's own objects are downloaded ------------------------------------------------------


def test_foreign_objects_are_refused_before_any_download_naming_the_url(s3_env, cache):
    url = _url(s3_env, "foreign")
    _put(url, "big.bin", b"\0" * BIG)
    _put(url, "notes/readme.txt", b"not a run's")
    with pytest.raises(OutputExists) as refused:
        with checked_out(url, "agriland run"):
            pytest.fail("a location holding foreign objects was checked out")
    msg = str(refused.value)
    assert msg.startswith(
        f"{url} already holds files that no agriland run wrote (big.bin (5.0 MB), notes/readme.txt"
    ), msg
    assert "choose an empty or new --out" in msg and str(cache) not in msg
    assert _biggest_file(cache) == 0  # nothing was downloaded
    assert _keys(url) == {"big.bin", "notes/readme.txt"}  # nothing deleted, the lock released


def test_agriland_run_refuses_foreign_objects_naming_the_url_not_the_cache(s3_env, cache, demo_cfg):
    from agriland_scale.pipeline.runner import run

    url = _url(s3_env, "foreign-run")
    _put(url, "big.bin", b"\0" * BIG)
    with pytest.raises(
        OutputExists,
        match=r"s3://agriland/foreign-run-\w+ already holds files that no "
        r"agriland run wrote \(big\.bin \(5\.0 MB\)\)",
    ):
        run(demo_cfg, url, report=lambda line: None)
    assert _biggest_file(cache) == 0


def test_a_runs_checkout_fetches_only_the_runs_own_files(s3_env, cache):
    """Beside a run, a user's objects (one big) are never downloaded, nor deleted by a push;
    fetching the models a training task put there takes only the run's models."""
    url = _url(s3_env, "own-files")
    record = {"config": {"name": "r"}, "stages": {"search": "done"}, "files": {"search": ["items.json"]}}
    _put(url, "run.json", json.dumps(record).encode())
    _put(url, "items.json", b"{}")
    _put(url, "logs/run-1.log", b"log")
    _put(url, "big.bin", b"\0" * BIG)
    _put(url, "models/user-notes.bin", b"\0" * BIG)
    with checked_out(url, "agriland run") as (local, mirror):
        got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert got == ["items.json", "logs/run-1.log", "run.json"]
        _put(url, "models/cae.keras", b"model")  # as a training task does
        assert mirror.pull("models/") == ["models/cae.keras"]
        (local / "report.html").write_text("r")
        assert _biggest_file(cache) < BIG
    assert {"big.bin", "models/user-notes.bin", "report.html", "models/cae.keras"} <= _keys(url)
