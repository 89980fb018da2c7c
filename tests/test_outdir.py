"""The output folder: one writer at a time, and nothing deleted that a run of ours did not write.

Fast tests (no Dask, no TensorFlow): every refusal here happens before a cluster starts.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agriland_scale.errors import OutputError, OutputExists, RunLocked
from agriland_scale.layout import LOCK_NAME
from agriland_scale.pipeline.outdir import RunLock, changed_since, remove_files, snapshot
from agriland_scale.pipeline.runner import run
from agriland_scale.publish.inspect import summarise_run


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hold_lock(out: str, ready, release) -> None:  # runs in a child process
    lock = RunLock(out, "agriland run (test holder)").acquire()
    ready.set()
    release.wait(60)
    lock.release()


@pytest.fixture
def held_lock(tmp_path):
    """A live process of another interpreter holding the lock of ``tmp_path / 'out'``."""
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    out = tmp_path / "out"
    proc = ctx.Process(target=_hold_lock, args=(str(out), ready, release))
    proc.start()
    assert ready.wait(60)
    yield out, proc
    release.set()
    proc.join(30)


def test_second_writer_is_refused_and_names_the_holder(held_lock, demo_cfg):
    out, proc = held_lock
    (out / "models").mkdir()
    (out / "models" / "x.keras").write_bytes(b"first run's file")
    before = _tree(out)
    with pytest.raises(
        RunLocked, match=rf"in use by 'agriland run \(test holder\)' \(pid {proc.pid} on host"
    ):
        run(demo_cfg, out)
    with pytest.raises(RunLocked):
        run(demo_cfg, out, overwrite=True, force=["cube"])
    assert _tree(out) == before  # the first is unharmed: not a byte changed


def test_lock_is_released_and_removed(tmp_path):
    out = tmp_path / "out"
    with RunLock(out, "agriland run"):
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match="one process writes a run at a time"):
            RunLock(out, "agriland report").acquire()  # also within one process: flock per open file
    assert not (out / LOCK_NAME).exists()
    RunLock(out, "again").acquire().release()


def test_stale_lock_of_a_dead_process_is_reported_then_taken_over(tmp_path):
    out = tmp_path / "out"
    # a real process takes the lock and is killed before it can release it
    code = (
        "import os, sys; from agriland_scale.pipeline.outdir import RunLock; "
        "RunLock(sys.argv[1], 'agriland run').acquire(); os._exit(9)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], timeout=60)
    assert done.returncode == 9 and (out / LOCK_NAME).exists()
    dead_pid = json.loads((out / LOCK_NAME).read_text())["pid"]
    notes: list[str] = []
    lock = RunLock(out, "agriland run", notice=notes.append).acquire()
    assert lock.took_over["pid"] == dead_pid
    assert len(notes) == 1 and f"pid {dead_pid}" in notes[0] and "ended without releasing" in notes[0]
    lock.release()


def test_lock_of_another_host_is_never_taken(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(
        json.dumps(
            {
                "host": "node-17.cluster",
                "pid": 4242,
                "command": "agriland run",
                "started": "2026-12-01T10:00:00+0000",
            }
        )
    )
    with pytest.raises(RunLocked, match=r"another host.*delete .*\.agriland\.lock"):
        RunLock(out, "agriland run").acquire()
    assert json.loads((out / LOCK_NAME).read_text())["host"] == "node-17.cluster"


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, demo_cfg):
    out = tmp_path / "X"
    (out / "models").mkdir(parents=True)
    (out / "models" / "my_model.h5").write_text("p")
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(OutputExists, match="no agriland run wrote") as err:
            run(demo_cfg, out, overwrite=overwrite)
        assert "--overwrite" not in str(err.value)  # never suggests destroying the user's files
    assert _tree(out) == before
    assert not (out / LOCK_NAME).exists()


def test_remove_files_deletes_only_what_is_listed(tmp_path):
    (tmp_path / "cog").mkdir()
    (tmp_path / "cog" / "probability.tif").write_bytes(b"ours")
    (tmp_path / "cog" / "my_notes.txt").write_text("theirs")
    (tmp_path / "stac" / "items").mkdir(parents=True)
    (tmp_path / "stac" / "items" / "a.json").write_text("{}")
    gone = remove_files(
        tmp_path, ["cog/probability.tif", "stac/items/a.json", "../outside.txt", "/etc/hostname"]
    )
    assert gone == ["cog/probability.tif", "stac/items/a.json"]
    assert (tmp_path / "cog" / "my_notes.txt").read_text() == "theirs"
    assert not (tmp_path / "stac").exists()  # emptied folders go, a folder with a user's file stays
    assert Path("/etc/hostname").exists()


def test_snapshot_finds_new_and_rewritten_outputs_not_the_store_nor_user_files(tmp_path):
    (tmp_path / "agriland.icechunk" / "chunks").mkdir(parents=True)
    (tmp_path / "items.json").write_text("1")
    before = snapshot(tmp_path)
    (tmp_path / "items.json").write_text("22")
    (tmp_path / "cog").mkdir()
    (tmp_path / "cog" / "probability.tif").write_bytes(b"x")
    (tmp_path / "agriland.icechunk" / "chunks" / "ABC123").write_text("{}")
    # what a user saves into the run folder while a stage runs is not the stage's
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "fields.geojson").write_text("{}")
    (tmp_path / "cog" / "my_edit.tif").write_bytes(b"y")
    (tmp_path / "analysis.ipynb").write_text("{}")
    assert changed_since(tmp_path, before) == ["cog/probability.tif", "items.json"]


def test_remove_files_removes_a_link_not_its_target(tmp_path):
    (tmp_path / "cog").mkdir()
    target = tmp_path / "keep.tif"
    target.write_bytes(b"theirs")
    (tmp_path / "cog" / "probability.tif").symlink_to(target)
    assert remove_files(tmp_path, ["cog/probability.tif"]) == ["cog/probability.tif"]
    assert target.read_bytes() == b"theirs"


def test_a_refused_run_leaves_no_folder_behind(tmp_path, demo_cfg):
    out = tmp_path / "new" / "run"
    (tmp_path / "new").mkdir()
    with pytest.raises(Exception):  # noqa: B017 - whatever the refusal
        run(demo_cfg.with_overrides(**{"segment.labels": str(tmp_path / "none.geojson")}), out)
    assert not out.exists()


def test_release_keeps_a_lock_that_is_not_ours(tmp_path):
    out = tmp_path / "out"
    lock = RunLock(out, "first").acquire()
    (out / LOCK_NAME).unlink()  # someone deletes it, as the other-host message allows ...
    second = RunLock(out, "second").acquire()  # ... and another run locks the folder
    lock.release()
    assert json.loads((out / LOCK_NAME).read_text())["command"] == "second"
    with pytest.raises(RunLocked):
        RunLock(out, "third").acquire()
    second.release()


def test_damaged_run_json_gives_the_same_advice_to_run_and_inspect(tmp_path, demo_cfg):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"config": {"name": "demo-vir')  # cut by a disk full
    before = _tree(out)
    with pytest.raises(OutputError) as from_run:
        run(demo_cfg, out)
    with pytest.raises(OutputError) as from_run_overwrite:
        run(demo_cfg, out, overwrite=True)
    with pytest.raises(OutputError) as from_inspect:
        summarise_run(out)
    assert str(from_run.value) == str(from_inspect.value) == str(from_run_overwrite.value)
    assert "run.json is damaged" in str(from_run.value) and "new --out folder" in str(from_run.value)
    assert _tree(out) == before


def test_out_that_is_a_file_is_refused(tmp_path, demo_cfg):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        run(demo_cfg, f)
    with pytest.raises(OutputError, match="a parent of --out .* is a file"):
        run(demo_cfg, f / "run1")
    assert f.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(tmp_path, demo_cfg):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            run(demo_cfg, ro / "run")
    finally:
        ro.chmod(0o755)


def test_read_only_folder_is_refused_also_for_root(demo_cfg):
    """Root may write into a chmod 555 folder, not into a read-only file system (/proc/sys)."""
    ro = Path("/proc/sys")
    if not ro.is_dir() or os.access(ro, os.W_OK):
        pytest.skip("no read-only folder on this machine")
    with pytest.raises(OutputError, match="cannot write into /proc/sys"):
        run(demo_cfg, ro / "agriland-run")


@pytest.mark.parametrize("url", ["https://host/run", "ftp://host/run"])
def test_unsupported_url_is_refused_not_written_as_a_local_folder(url, tmp_path, demo_cfg):
    """``--out s3://b/r`` once wrote a local folder named ``s3:``; object storage is a run
    location now (tests/test_object_store.py), and every other URL is refused by every entry
    point, which writes nothing."""
    from agriland_scale import open_run

    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    cli = subprocess.run(
        [sys.executable, "-m", "agriland_scale.cli", "run", "pipelines/demo.yaml", "--out", url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert cli.returncode == 2, cli.stderr
    assert url in cli.stderr and "is not a supported location" in cli.stderr and "Traceback" not in cli.stderr
    assert list(tmp_path.iterdir()) == []  # no 'https:' folder
    for call in (lambda: run(demo_cfg, url), lambda: open_run(url), lambda: summarise_run(url)):
        with pytest.raises(OutputError, match="is not a supported location"):
            call()


def test_file_url_is_a_local_folder(tmp_path):
    from agriland_scale.layout import local_folder

    assert local_folder(f"file://{tmp_path}/run") == tmp_path / "run"
    assert local_folder("~/x") == Path.home() / "x"


def test_settings_added_by_a_later_version_do_not_invalidate_finished_stages():
    from agriland_scale.pipeline.preflight import changed_keys

    old = {"cube": {"bands": ["red"], "resolution": 10}}
    assert changed_keys(old, {"cube": {"bands": ["red"], "resolution": 10, "storage": "int16"}}) == []
    assert changed_keys(old, {"cube": {"bands": ["red"], "resolution": 20, "storage": "int16"}}) == [
        "cube.resolution"
    ]
