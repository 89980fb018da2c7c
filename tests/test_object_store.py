"""The product store on object storage: a real S3 server (SeaweedFS on 127.0.0.1), real Dask
worker processes, real kills. The same code path as a local run (``Products`` on an Icechunk
repository), so what holds here holds for a folder too.

- bad locations are refused before any compute, each naming the URL and what to do;
- a product written block by block on S3 reads back whole, with its CRS, in every version;
- a reader polling the store while a product is rewritten sees the old version or the new
  one, never a mix or a partly written array;
- a writer process killed mid-product leaves committed blocks that the next attempt keeps:
  it writes only the others, and the result equals an uninterrupted write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.errors import OutputError
from agriland_scale.pipeline.runtime import dask_client
from agriland_scale.store import has_group, history, open_run, reader, write_georef
from agriland_scale.store.resume import Products

RT = RuntimeConfig(n_workers=2, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")


def _part(cube, value_offset: float = 0.0, rows: int = 512) -> xr.Dataset:
    """A real piece of the demo cube (red band, ``rows`` x 256 px), 4 blocks of rows, georeferenced."""
    red = cube["reflectance"].sel(band="red").isel(y=slice(0, rows), x=slice(0, 256)).drop_vars("band")
    ds = xr.Dataset({"red": (red + value_offset).astype("float32")}).compute()
    return write_georef(ds, cube.rio.crs).chunk({"y": rows // 4, "x": -1})


def _slow(ds: xr.Dataset, seconds: float) -> xr.Dataset:
    """The same blocks, each taking ``seconds`` to compute (time for a reader or a kill)."""

    def wait(block):
        time.sleep(seconds)
        return block

    return ds.assign(red=ds["red"].copy(data=ds["red"].data.map_blocks(wait, dtype="float32")))


# --- bad locations: refused before anything is computed or written ---------------------------------


@pytest.mark.parametrize("case", ["unreachable", "no bucket", "wrong secret", "read-only", "scheme"])
def test_bad_location_is_refused_with_what_to_do(s3_server, case, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    url, opts = s3_server.url(f"bad-{case.replace(' ', '-')}"), {}
    if case == "unreachable":
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        opts = {"endpoint_url": f"http://127.0.0.1:{dead}"}
        expect = "cannot be reached.*AWS_ENDPOINT_URL"
    elif case == "no bucket":
        url = "s3://no-such-bucket-here/run"
        expect = "bucket 'no-such-bucket-here' exist"
    elif case == "wrong secret":
        opts = {"secret_access_key": "not-the-secret"}
        expect = "credentials were refused"
    elif case == "read-only":
        opts = {"access_key_id": s3_server.ro_key, "secret_access_key": s3_server.ro_secret}
        expect = "may not write there"
    else:
        url, expect = "ftp://host/run", "'ftp://' is not a supported location"
    with pytest.raises(OutputError, match=expect) as err:
        Products(url, storage_options=opts)
    assert url in str(err.value)
    # nothing was left under the prefix (the probe object is deleted again)
    import obstore

    from agriland_scale.files import object_store

    if case in ("wrong secret", "read-only"):
        left = obstore.list(object_store(url), prefix=None).collect()
        assert not [o for batch in [left] for o in batch], left


# --- a product on S3: blocks, versions, CRS ----------------------------------------------------------


def test_product_on_s3_resumes_after_a_failed_block_and_keeps_versions(s3_env, cube, tmp_path):
    url = s3_env.url("engine-run")
    expected = _part(cube).compute()
    products = Products(url, commit_every_s=0)
    flag = tmp_path / "fail-block-2"
    flag.write_text("1")

    def failing(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 2 and flag.exists():
            raise OSError("the source went away")
        return block

    bad = _part(cube)
    bad = bad.assign(red=bad["red"].copy(data=bad["red"].data.map_blocks(failing, dtype="float32")))
    with dask_client(RT) as client:
        with pytest.raises(Exception, match="block 2"):
            products.write_blocks(bad, "cube", "y", client, label="cube")
        assert not products.exists("cube")  # nothing half-written is visible
        kept = products.pending_blocks("cube")
        assert 2 not in kept
        flag.unlink()
        stats = products.write_blocks(bad, "cube", "y", client, label="cube")
        assert stats["blocks"] == 4 and stats["reused"] == len(kept)
        # a second version of the product: the first stays readable
        products.write_blocks(_part(cube, 1.0), "cube", "y", client, label="cube")
    tree = open_run(url)
    ds = tree["cube"].to_dataset()
    assert ds.rio.crs == cube.rio.crs and ds.rio.transform() == expected.rio.transform()
    np.testing.assert_array_equal(ds["red"].values, expected["red"].values + 1.0)
    versions = history(url)
    assert len(versions) == 3  # created, version 1, version 2
    first = xr.open_zarr(reader(url, versions[1]["version"]), group="cube", consolidated=False)
    np.testing.assert_array_equal(first["red"].values, expected["red"].values)


# --- readers during a write -----------------------------------------------------------------------------


def test_reader_sees_old_or_new_version_never_a_mix(s3_env, cube):
    """Version 1 (values v) then version 2 (v + 1) written block by block, slowly, a commit a
    block; a reader polls the store all the while."""
    url = s3_env.url("reader-run")
    base = _part(cube).compute()["red"].values
    products = Products(url, commit_every_s=0)
    seen: list[str] = []
    stop = threading.Event()
    problems: list[str] = []

    def poll():
        while not stop.is_set():
            try:
                store = reader(url)
            except Exception:  # noqa: BLE001 - the repository is being created
                continue
            if not has_group(store, "cube"):
                seen.append("none")
                continue
            # on this thread's own scheduler: the writer's client closes while the reader polls
            a = (
                xr.open_zarr(store, group="cube", consolidated=False)["red"]
                .compute(scheduler="threads")
                .values
            )
            if np.array_equal(a, base):
                seen.append("v1")
            elif np.array_equal(a, base + 1):
                seen.append("v2")
            else:
                problems.append(f"a mixed or partial array: {np.isnan(a).mean():.0%} unwritten")

    t = threading.Thread(target=poll)
    t.start()
    try:
        with dask_client(RT) as client:
            products.write_blocks(_slow(_part(cube), 0.4), "cube", "y", client)
            products.write_blocks(_slow(_part(cube, 1.0), 0.4), "cube", "y", client)
        deadline = time.monotonic() + 20
        while "v2" not in seen and time.monotonic() < deadline:  # the reader's next look
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(60)
    assert not problems, problems[:3]
    assert {"none", "v1", "v2"} <= set(seen), set(seen)
    # the writes committed block by block (on the wip branch) while readers saw only whole versions
    assert len(history(url, every_commit=True)) > len(history(url))


# --- a writer process killed mid-product ------------------------------------------------------------

WRITER = """
import sys, time
import xarray as xr
from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.store.resume import Products
from agriland_scale.pipeline.runtime import dask_client
from agriland_scale.store import open_cube, write_georef

def wait(block):
    time.sleep(float(sys.argv[3]))
    return block

if __name__ == "__main__":
    cube = open_cube(sys.argv[2])
    red = cube["reflectance"].sel(band="red").isel(y=slice(0, 512), x=slice(0, 256)).drop_vars("band")
    ds = write_georef(xr.Dataset({"red": red.astype("float32")}).compute(), cube.rio.crs).chunk({"y": 128, "x": -1})
    ds = ds.assign(red=ds["red"].copy(data=ds["red"].data.map_blocks(wait, dtype="float32")))
    rt = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    with dask_client(rt) as client:
        print(Products(sys.argv[1], commit_every_s=0).write_blocks(ds, "cube", "y", client), flush=True)
"""


def test_killed_writer_resumes_with_only_the_missing_blocks(s3_env, cube, cube_store, tmp_path):
    url = s3_env.url("killed-run")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), url, cube_store, "1.5"],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    committed: set[int] = set()
    while not committed:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
        try:
            committed = Products(url).pending_blocks("cube")
        except Exception:  # noqa: BLE001 - the repository is not created yet
            committed = set()
    os.killpg(proc.pid, signal.SIGKILL)  # the writer and its Dask workers, at once
    proc.wait(30)
    committed = Products(url).pending_blocks("cube")
    assert 1 <= len(committed) < 4 and not has_group(reader(url), "cube")
    again = subprocess.run(
        [sys.executable, str(script), url, cube_store, "0"],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    stats = json.loads(again.stdout.strip().splitlines()[-1].replace("'", '"'))
    print(f"killed after {len(committed)} of 4 committed blocks; the rerun reused {stats['reused']}")
    assert stats["reused"] == len(committed) and stats["blocks"] == 4
    got = xr.open_zarr(reader(url), group="cube", consolidated=False)["red"].values
    np.testing.assert_array_equal(got, _part(cube).compute()["red"].values)


# --- one writer: the lease lock on the object store ----------------------------------------------------


def test_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(s3_env, tmp_path):
    import obstore

    from agriland_scale.errors import RunLocked
    from agriland_scale.files import object_store
    from agriland_scale.pipeline.remote import RemoteLock

    url = s3_env.url("locked-run")
    with RemoteLock(url, "agriland run"):
        with pytest.raises(RunLocked, match=r"is in use by 'agriland run' \(pid \d+ on host"):
            RemoteLock(url, "agriland report").acquire()
    assert "locked-run/.agriland.lock" not in str(obstore.list(object_store(s3_env.url(""))).collect())
    # a lock left by a process of this machine and PID namespace that has ended (killed): taken
    # over, with a notice (the host name alone proves nothing: see test_remote_lock.py)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = object_store(url)
    here = {
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "pid_ns": os.readlink("/proc/self/ns/pid"),
    }
    obstore.put(
        store,
        ".agriland.lock",
        json.dumps(
            {
                "host": os.uname().nodename,
                "pid": dead.pid,
                **here,
                "command": "agriland run",
                "heartbeat": time.time(),
            }
        ).encode(),
    )
    notes: list[str] = []
    lock = RemoteLock(url, "agriland run", notice=notes.append).acquire()
    try:
        assert notes and "taken over" in notes[0]
        held = json.loads(bytes(obstore.get(store, ".agriland.lock").bytes()))
        assert held["pid"] == os.getpid()
    finally:
        lock.release()
    # a live holder on another host whose heartbeat is fresh is never taken over
    obstore.put(
        store,
        ".agriland.lock",
        json.dumps(
            {"host": "elsewhere", "pid": 1, "command": "agriland run", "heartbeat": time.time()}
        ).encode(),
    )
    with pytest.raises(RunLocked, match="elsewhere"):
        RemoteLock(url, "agriland run").acquire()
    # ... but one that stopped refreshing is (its holder was killed or lost its network)
    obstore.put(
        store,
        ".agriland.lock",
        json.dumps(
            {"host": "elsewhere", "pid": 1, "command": "agriland run", "heartbeat": time.time() - 3600}
        ).encode(),
    )
    RemoteLock(url, "agriland run").acquire().release()


@pytest.mark.parametrize(
    "out, expect",
    [
        ("s3://no-such-bucket-here/run", "bucket 'no-such-bucket-here' exist"),
        ("ftp://example.org/run", "'ftp://' is not a supported location"),
    ],
)
def test_cli_refuses_a_bad_out_url_before_any_work(s3_env, tmp_path, out, expect):
    """`agriland demo --out URL`: exit 2, one paragraph naming the URL and what to do, and
    nothing written (no working copy, no object)."""
    env = os.environ | s3_env.env | {"AGRILAND_CACHE": str(tmp_path / "cache")}
    cli = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "agriland"), "demo", "--out", out],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
    assert out.split("/run")[0] in cli.stderr and expect in cli.stderr, cli.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache, nothing in the working dir


def test_inspect_of_a_run_on_s3_leaves_its_working_copy_alone(s3_env, tmp_path, monkeypatch, capsys):
    """`agriland inspect URL` reads a temporary copy of the run's files: the working copy that a
    run on this machine may be writing is not touched."""
    from agriland_scale.cli import main
    from agriland_scale.files import upload_file
    from agriland_scale.pipeline.remote import working_copy

    url = s3_env.url("inspected")
    Products(url)  # the product store
    record = tmp_path / "run.json"
    record.write_text(
        json.dumps({"config": {"name": "inspected"}, "stages": {"search": "running"}, "location": url})
    )
    upload_file(record, f"{url}/run.json")
    monkeypatch.setenv("AGRILAND_CACHE", str(tmp_path / "cache"))
    copy = working_copy(url)
    copy.mkdir(parents=True)
    (copy / "run.json").write_text("{being written}")
    assert main(["inspect", url]) == 0
    assert f"run 'inspected' in {url}" in capsys.readouterr().out
    assert (copy / "run.json").read_text() == "{being written}"


def test_a_second_writer_never_overwrites_the_first_ones_version(tmp_path):
    """Two writers on one store (which the run lock prevents; here on purpose): the one whose
    product was started before the other published is refused, and the other's version stays."""
    from agriland_scale.errors import RunLocked

    first, second = Products(tmp_path / "run"), Products(tmp_path / "run")
    a = xr.Dataset({"v": ("x", np.arange(4.0))})
    session = first._fresh_session()  # the first starts a product ...
    a.to_zarr(session.store, group="late", mode="w", consolidated=False)
    first._commit(session, "late", group="late", kind="write", complete=True)
    second.write(a * 2, "early")  # ... the second publishes one meanwhile
    with pytest.raises(RunLocked, match="another process changed the products while this one wrote 'late'"):
        first._publish("late", "written")
    assert second.exists("early") and not second.exists("late")


@pytest.mark.slow
def test_the_test_s3_server_starts_again_when_a_port_is_taken_meanwhile(tmp_path, monkeypatch):
    """A free port can be taken between its probe and SeaweedFS's bind (CI saw the S3
    listener's port go to another process's connection): the server starts again on other
    ports instead of failing every object-storage test."""
    import socket
    import urllib.error
    import urllib.request

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import local_s3

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    real, calls = local_s3._free_port, []

    def first_a_taken_one() -> int:
        calls.append(1)
        return taken if len(calls) == 1 else real()

    monkeypatch.setattr(local_s3, "_free_port", first_a_taken_one)
    try:
        with local_s3.LocalS3(tmp_path) as server:
            server.grace = 0.5  # its graceful stop takes 25 s: killed after 0.5 s, not 5 s
            assert server.endpoint != f"http://127.0.0.1:{taken}" and len(calls) == 8
            with pytest.raises(urllib.error.HTTPError):  # it answers: an unsigned request is refused
                urllib.request.urlopen(server.endpoint, timeout=5)
    finally:
        held.close()


def test_the_local_s3_server_leaves_nothing_in_tmp(tmp_path):
    """The SeaweedFS server of the tests and the demo keeps its logs and local sockets in its
    own folder and removes the gRPC sockets it can only put in /tmp when it stops (200 of
    them had piled up in /tmp from earlier test sessions)."""
    import glob

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from local_s3 import LocalS3

    def litter() -> set[str]:
        return set(glob.glob("/tmp/seaweedfs-*.sock")) | set(glob.glob("/tmp/weed.*"))

    before = litter()
    with LocalS3(tmp_path / "s3") as server:
        # killed after 0.5 s, not 5 s: its graceful stop takes 25 s here, so it is killed
        # either way, and the sockets it leaves are for LocalS3.stop to remove
        server.grace = 0.5
        assert litter() - before  # its gRPC sockets, while it runs
        assert server.endpoint.startswith("http://127.0.0.1:")
    assert litter() <= before
    assert list((tmp_path / "s3").glob("weed.*.log.INFO.*"))  # its logs are in its folder
