"""Resume after failure, with real kills: a worker process, and the agriland process itself.

Both interrupted runs redo the embeddings of a copy of the session's demo run (same config,
same encoder, same two-worker cluster) and must end with embeddings identical to the
uninterrupted run's, nothing missing or duplicated, and no unfinished work left behind
(the store's ``wip`` branch holds nothing beyond ``main``).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from agriland_scale.errors import OutputExists
from agriland_scale.layout import dependents, stages_needed
from agriland_scale.pipeline.runner import run
from agriland_scale.store import has_group, history, reader
from agriland_scale.store.resume import Products

pytestmark = pytest.mark.slow


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _embeddings(out: Path) -> np.ndarray:
    return xr.open_zarr(reader(out), group="embeddings", consolidated=False)["embedding"].values


def _committed_blocks(out: Path, group: str) -> int:
    """Blocks of an unfinished product that commits on the store's wip branch hold."""
    try:
        return len(Products(out).pending_blocks(group))
    except Exception:  # noqa: BLE001 - a store being created: nothing committed yet
        return 0


def _stage(out: Path, name: str) -> str | None:
    try:
        return json.loads((out / "run.json").read_text())["stages"].get(name)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_stage_graph():
    assert stages_needed("cae") == ["search", "cube", "patches", "cae"]
    assert stages_needed("unet") == ["search", "cube", "unet"]
    assert dependents(["segmentation"]) == {"segmentation", "publish"}
    assert dependents(["cube"]) >= {"patches", "cae", "embeddings", "clusters", "unet", "segmentation"}


def test_rerun_of_finished_run_takes_seconds(demo_run, external_cluster, tmp_path):
    cfg, out, _ = demo_run
    copy = _copy_run(out, tmp_path / "copy")
    before = history(copy)[0]["version"]
    lines = []
    t0 = time.perf_counter()
    rec = run(cfg, copy, scheduler=external_cluster, report=lines.append)
    took = time.perf_counter() - t0
    print(f"rerun of a finished run: {took:.1f} s")
    assert sum("finished earlier: kept" in line for line in lines) == 9
    assert took < 30 and rec["attempts"] == 2
    assert history(copy)[0]["version"] == before  # not one commit: nothing was rewritten
    assert set(rec["stages"].values()) == {"done"}


def test_changed_config_needs_force_and_force_redoes_only_dependents(demo_run, external_cluster, tmp_path):
    cfg, out, _ = demo_run
    copy = _copy_run(out, tmp_path / "copy")
    new = cfg.with_overrides(**{"segment.threshold": 0.7})
    with pytest.raises(OutputExists, match="segment.threshold.*--force segmentation"):
        run(new, copy, scheduler=external_cluster)
    before = {v["version"] for v in history(copy)}
    lines = []
    rec = run(new, copy, scheduler=external_cluster, force=["segmentation"], report=lines.append)
    redone = [line.split("]")[0][1:] for line in lines if line.startswith("[") and "kept" not in line]
    assert redone == ["segmentation", "publish"]
    seg = xr.open_zarr(reader(copy), group="segmentation", consolidated=False)
    p, m = seg["probability"].values, seg["mask"].values
    assert ((p >= 0.7) == (m == 1)).all() and seg["mask"].attrs["threshold"] == 0.7
    assert rec["config"]["segment"]["threshold"] == 0.7
    # the new versions touched only the forced products; the earlier versions stay readable
    new = [v for v in history(copy) if v["version"] not in before]
    assert new and {v["metadata"].get("group") for v in new} <= {"segmentation", "mosaic"}, new
    # the newest version from before the force (the oldest, the repository's first, is empty)
    kept = [v["version"] for v in history(copy) if v["version"] in before - {v["version"] for v in new}]
    old = xr.open_zarr(reader(copy, kept[0]), group="cube", consolidated=False)
    assert old.sizes["y"] > 0


def test_kill_agriland_process_mid_embeddings(demo_run, external_cluster, tmp_path):
    """SIGKILL the CLI while it writes embeddings; the next run writes only the missing blocks."""
    cfg, out, _ = demo_run
    copy = _copy_run(out, tmp_path / "copy")
    pipeline = tmp_path / "pipeline.yaml"
    # a commit a block: the kill then lands between commits of one product
    pipeline.write_text(
        yaml.safe_dump(cfg.with_overrides(**{"runtime.commit_every_s": 0}).model_dump(mode="json"))
    )
    cmd = [
        str(Path(sys.executable).parent / "agriland"),
        "run",
        str(pipeline),
        "--out",
        str(copy),
        "--scheduler",
        external_cluster,
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd + ["--force", "embeddings"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 180
    while _committed_blocks(copy, "embeddings") < 1:
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done_before = _committed_blocks(copy, "embeddings")
    assert _stage(copy, "embeddings") == "running" and 1 <= done_before < 4
    assert not has_group(reader(copy), "embeddings")  # never visible half-written
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    rec = json.loads((copy / "run.json").read_text())
    blocks = rec["zones"]["utm18n"]["embeddings_blocks"]
    print(f"killed after {done_before} of 4 embedding blocks; the rerun reused {blocks['reused']}")
    assert (blocks["blocks"], blocks["reused"]) == (4, done_before)
    assert set(rec["stages"].values()) == {"done"} and not Products(copy).pending_blocks("embeddings")
    np.testing.assert_array_equal(_embeddings(copy), _embeddings(out))
    for s in ("search", "cube", "patches", "cae"):
        assert rec["timings_s"][s] == json.loads((out / "run.json").read_text())["timings_s"][s], s


def _segmentation(out: Path) -> xr.Dataset:
    return xr.open_zarr(reader(out), group="segmentation", consolidated=False).load()


def test_kill_agriland_process_mid_segmentation_redoes_only_missing_squares(
    demo_run, external_cluster, tmp_path
):
    """SIGKILL the CLI while it writes the segmentation in square blocks of 256 px (16 over the
    demo's 1024 x 1024 px: with 4 of 512 px, the whole stage once committed before the kill
    landed); the next run computes only the squares no commit holds, and the
    product equals an uninterrupted run's with the same blocks, bit for bit (no seam where an
    attempt stopped)."""
    cfg, out, _ = demo_run
    copy = _copy_run(out, tmp_path / "copy")
    pipeline = tmp_path / "pipeline.yaml"
    small = cfg.with_overrides(**{"runtime.commit_every_s": 0, "runtime.block_px": 256})
    pipeline.write_text(yaml.safe_dump(small.model_dump(mode="json")))
    agriland = [
        str(Path(sys.executable).parent / "agriland"),
        "run",
        str(pipeline),
        "--scheduler",
        external_cluster,
    ]
    cmd = [*agriland, "--out", str(copy), "--quiet", "--force", "segmentation"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while _committed_blocks(copy, "segmentation") < 1:
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done_before = _committed_blocks(copy, "segmentation")
    assert _stage(copy, "segmentation") == "running" and 1 <= done_before < 16, done_before
    again = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    blocks = json.loads((copy / "run.json").read_text())["zones"]["utm18n"]["segmentation_blocks"]
    print(f"killed after {done_before} of 16 segmentation squares; the rerun reused {blocks['reused']}")
    assert (blocks["blocks"], blocks["reused"]) == (16, done_before)
    resumed, uninterrupted = _segmentation(copy), _segmentation(out)
    for name in ("probability", "mask"):
        np.testing.assert_array_equal(resumed[name].values, uninterrupted[name].values)
    stored = xr.open_zarr(reader(copy), group="segmentation", consolidated=False)
    assert stored["probability"].chunks == ((256,) * 4, (256,) * 4)  # written in 256 px squares


def test_kill_worker_mid_embeddings(demo_run, external_cluster, tmp_path):
    """SIGKILL one of the two worker processes while embeddings are computed: the nanny
    restarts it, Dask reruns the lost tasks, and the result equals the uninterrupted run."""
    from distributed import Client

    cfg, out, _ = demo_run
    copy = _copy_run(out, tmp_path / "copy")
    result: dict = {}

    def target():
        try:
            result["record"] = run(
                cfg, copy, scheduler=external_cluster, force=["embeddings"], until="embeddings"
            )
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    deadline = time.monotonic() + 180
    while _stage(copy, "embeddings") != "running" or has_group(reader(copy), "embeddings"):
        assert t.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.05)
    with Client(external_cluster, timeout="10s", set_as_default=False) as c:
        busy = {w: len(ts) for w, ts in c.processing().items()}
        while not any(busy.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
            busy = {w: len(ts) for w, ts in c.processing().items()}
        victim = max(busy, key=busy.get)
        pid = c.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        t.join(300)
        assert not t.is_alive() and "error" not in result, result
        deadline = time.monotonic() + 60
        while len(c.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)  # the nanny brings the worker back for the tests that follow
    print(f"killed worker {victim} (pid {pid}) with {busy[victim]} task(s) in flight")
    np.testing.assert_array_equal(_embeddings(copy), _embeddings(out))
    assert result["record"]["stages"]["embeddings"] == "done"
