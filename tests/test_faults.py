"""Faults of the place a run writes to, in the middle of a real run: a full disk, a folder
turned read-only, an object store that stops answering. Each gives one paragraph naming the
place and what to do (exit 2), never "unexpected error", and loses nothing finished: the
products written before the fault are unchanged, and (object store) a rerun completes.

The disk faults use a small tmpfs mounted for the test (root only, as in CI; skipped where
mounting is not allowed); the object store is a SeaweedFS server of the test's own, stopped
mid-run and started again.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from agriland_scale import cli
from agriland_scale.store import open_run

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _tmpfs(path: Path, size_mb: int):
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _stage(out: Path, stage: str) -> str | None:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads((out / "run.json").read_text()).get("stages", {}).get(stage)
    return None


def _when_running(out: Path, stage: str, then, stop: threading.Event) -> threading.Thread:
    def watch() -> None:
        while _stage(out, stage) != "running":
            if stop.wait(0.05):
                return
        then()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its disk is full."""
    with contextlib.suppress(OSError), open(folder / "ballast", "wb") as f:
        while True:
            f.write(b"\0" * 2**20)
            f.flush()


def _pipeline(cfg, out: Path | None, tmp: Path) -> Path:
    """The session run's pipeline; with ``out``, its trained models given (a fresh run)."""
    doc = json.loads(cfg.model_dump_json())
    if out is not None:
        doc["embed"]["model"] = str(out / "models" / "encoder.keras")
        doc["segment"]["model"] = str(out / "models" / "unet.keras")
    p = tmp / "pipeline.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _run_with_fault(demo_run, external_cluster, tmp_path, capsys, fault, *, store_disk: bool = False):
    """Run the session run's copy on a tmpfs with ``--force embeddings``; ``fault(disk)`` when
    embeddings start. ``store_disk``: the product store on a tmpfs of its own (``disk``)."""
    cfg, out, _ = demo_run
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) // 2**20
    with _tmpfs(tmp_path / "disk", size + 12) as disk, contextlib.ExitStack() as inner:
        copy = disk / "run"
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns("logs", "*.lock", "agriland.icechunk"))
        if store_disk:  # no open file in it: a read-only remount is not refused as busy
            disk = inner.enter_context(_tmpfs(copy / "agriland.icechunk", 64))
        shutil.copytree(out / "agriland.icechunk", copy / "agriland.icechunk", dirs_exist_ok=True)
        pipeline = _pipeline(cfg, None, tmp_path)
        stop = threading.Event()
        watcher = _when_running(copy, "embeddings", lambda: fault(disk), stop)
        try:
            code = cli.main(
                [
                    "run",
                    str(pipeline),
                    "--out",
                    str(copy),
                    "--force",
                    "embeddings",
                    "-q",
                    "--scheduler",
                    external_cluster,
                ]
            )
        finally:
            stop.set()
            watcher.join(60)
        err = capsys.readouterr().err.strip()
        cube = open_run(copy)["cube"]["reflectance"].values
        rec = json.loads((copy / "run.json").read_text())
        return code, err, rec, cube


def _check_paragraph(code: int, err: str, pattern: str) -> None:
    print(f"\nexit {code}: {err}")
    assert code == 2, err
    assert err.startswith("agriland: error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "unexpected error" not in err and "Logging error" not in err, err
    assert "rerun the same command" in err, err
    import re

    assert re.search(pattern, err), err


def test_a_disk_that_fills_up_mid_run(demo_run, external_cluster, tmp_path, capsys):
    code, err, rec, cube = _run_with_fault(demo_run, external_cluster, tmp_path, capsys, _fill)
    _check_paragraph(code, err, r"the disk holding .* is full \(no space left on device\): free space")
    np.testing.assert_array_equal(cube, open_run(demo_run[1])["cube"]["reflectance"].values)
    # recorded as failed, with the same paragraph (run.json rewritten in place on the full disk)
    failed = [s for s, v in rec["stages"].items() if v == "failed"]
    assert failed and "is full" in rec["error"], rec["stages"]


def test_a_folder_turned_read_only_mid_run(demo_run, external_cluster, tmp_path, capsys):
    """The product store's file system turns read-only while embeddings are written."""

    def read_only(disk: Path) -> None:
        for _ in range(100):  # busy while a worker writes a chunk there: again
            if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"could not remount {disk} read-only")

    code, err, rec, cube = _run_with_fault(
        demo_run, external_cluster, tmp_path, capsys, read_only, store_disk=True
    )
    _check_paragraph(code, err, r"can no longer be written .*make it writable again")
    np.testing.assert_array_equal(cube, open_run(demo_run[1])["cube"]["reflectance"].values)
    failed = [s for s, v in rec["stages"].items() if v == "failed"]  # recorded, with the paragraph
    assert failed and "can no longer be written" in rec["error"] and rec["stages"]["cube"] == "done", rec[
        "stages"
    ]


def _s3_pipeline(cfg, out: Path, tmp: Path, server, name: str) -> tuple[Path, dict]:
    """The demo with the session run's models, into S3 with the server's credentials in the file."""
    doc = yaml.safe_load(_pipeline(cfg, out, tmp).read_text())
    opts = {
        "endpoint_url": server.endpoint,
        "access_key_id": server.env["AWS_ACCESS_KEY_ID"],
        "secret_access_key": server.env["AWS_SECRET_ACCESS_KEY"],
        "region": "us-east-1",
    }
    doc["output"] = {"storage_options": opts}
    doc["runtime"] = {"commit_every_s": 0}
    (tmp / name).write_text(yaml.safe_dump(doc))
    return tmp / name, opts


def test_an_object_store_lost_mid_run_then_back(demo_run, external_cluster, tmp_path):
    """The S3 server stops while embeddings are computed: one paragraph naming the store
    (exit 2, not 140 lines of the engine's debug output); started again, a rerun completes
    with the same products as the local run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from local_s3 import LocalS3

    from agriland_scale.files import download, join_url

    cfg, out, _ = demo_run
    agriland = str(Path(sys.executable).parent / "agriland")
    server = LocalS3(tmp_path / "seaweedfs")
    # stopped, it is killed after 0.5 s instead of 5 s: its graceful shutdown takes 25 s
    # here, so LocalS3.stop kills it either way (its volumes survive a kill)
    server.grace = 0.5
    server.start()
    try:
        url = server.url("lost")
        pipeline, opts = _s3_pipeline(cfg, out, tmp_path, server, "first.yaml")
        first = subprocess.Popen(
            [agriland, "run", str(pipeline), "--out", url, "--scheduler", external_cluster, "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def stage(name: str) -> str | None:
            with contextlib.suppress(Exception):
                rec = download(join_url(url, "run.json"), tmp_path / "rec.json", opts).read_text()
                return json.loads(rec).get("stages", {}).get(name)
            return None

        deadline = time.monotonic() + 300
        while stage("embeddings") != "running" and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        server.stop()
        _, err = first.communicate(timeout=300)
        err = err.strip()
        print(f"\nexit {first.returncode}: {err}")
        assert first.returncode == 2, err
        last = err.splitlines()[-1]  # before it, one-line warnings (a lock refresh, a put that failed)
        assert last.startswith("agriland: error: the object store at http://127.0.0.1:"), err
        assert "stopped answering" in last and "rerun the same command" in last, err
        assert len(err.splitlines()) <= 6 and "Traceback" not in err and "unexpected error" not in err, err
        assert "Debug source" not in err and max(len(line) for line in err.splitlines()) < 600, err
        server.start()  # on other ports: the pipeline names the new endpoint
        pipeline, opts = _s3_pipeline(cfg, out, tmp_path, server, "again.yaml")
        again = subprocess.run(
            [agriland, "run", str(pipeline), "--out", url, "--scheduler", external_cluster, "-q"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert again.returncode == 0, again.stderr
        tree, local = open_run(url, storage_options=opts), open_run(out)
        for group, var in [("embeddings", "embedding"), ("segmentation", "probability")]:
            np.testing.assert_array_equal(tree[group][var].values, local[group][var].values, err_msg=group)
    finally:
        server.stop()
