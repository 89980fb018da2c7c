"""The demo pipeline with ``--out s3://...`` on a real S3 server (SeaweedFS on 127.0.0.1) and an
external Dask cluster whose workers share no folder with the client, with real faults:

- the S3 credentials are in the pipeline file only (``output.storage_options``), with ``--set``;
- the models are given as ``s3://`` URLs (the session run's trained encoder and U-Net, put on
  the server first): workers fetch them into their own caches;
- a second ``agriland run`` on the same ``--out`` is refused while the first runs;
- one worker process is killed while embeddings are computed (the nanny restarts it, Dask
  reruns its tasks), and the ``agriland`` process itself is killed mid-segmentation;
- the rerun completes, and the products read back from S3 (CRS, transform) equal the
  session's local run of the same seed and models;
- nothing was written to the client's or the workers' working directories (only caches).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from agriland_scale.files import download, join_url, list_objects, upload_file
from agriland_scale.store import history, open_run, reader

pytestmark = pytest.mark.slow


def _remote_stage(url: str, stage: str, tmp: Path) -> str | None:
    """The status of ``stage`` in the run.json on the object store (None before it exists)."""
    try:
        rec = json.loads(download(join_url(url, "run.json"), tmp / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return rec.get("stages", {}).get(stage)


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_demo_on_s3_with_faults_equals_the_local_run(demo_run, s3_cluster, s3_env, tmp_path):
    cfg, local_out, _ = demo_run
    addr, worker_dirs, worker_caches = s3_cluster
    url = s3_env.url("demo-e2e")
    given = s3_env.url("given-models")
    for name in ("encoder.keras", "encoder.keras.json", "unet.keras", "unet.keras.json"):
        upload_file(local_out / "models" / name, join_url(given, name))
    s3cfg = cfg.with_overrides(
        **{"embed.model": join_url(given, "encoder.keras"), "segment.model": join_url(given, "unet.keras")}
    )
    # the credentials are in the pipeline file only: neither the agriland process nor the
    # workers have an AWS_* variable (anything that ignored output.storage_options would ask
    # AWS or the cloud metadata address, and fail); --set once dropped them
    doc = s3cfg.model_dump(mode="json") | {
        "output": {
            "storage_options": {
                "endpoint_url": s3_env.env["AWS_ENDPOINT_URL"],
                "access_key_id": s3_env.env["AWS_ACCESS_KEY_ID"],
                "secret_access_key": s3_env.env["AWS_SECRET_ACCESS_KEY"],
                "region": s3_env.env["AWS_REGION"],
            }
        }
    }
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(doc))
    client_dir, client_cache = tmp_path / "client", tmp_path / "client-cache"
    client_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AGRILAND_CACHE": str(client_cache)
    }
    cmd = [
        str(Path(sys.executable).parent / "agriland"),
        "run",
        str(pipeline),
        "--out",
        url,
        "--scheduler",
        addr,
        "--quiet",
        "--set",
        "runtime.commit_every_s=0",
    ]
    first = subprocess.Popen(
        cmd, cwd=client_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # 1. a second run on the same --out is refused at once, naming the first; the first goes on
    _wait(lambda: _remote_stage(url, "search", tmp_path) is not None, first, "the first run's record")
    second = subprocess.run(cmd, cwd=client_dir, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "is in use by 'agriland run'" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    # 2. a worker killed while embeddings are computed: the nanny restarts it, Dask reruns its tasks
    _wait(lambda: _remote_stage(url, "embeddings", tmp_path) == "running", first, "embeddings")
    from distributed import Client

    with Client(addr, timeout="10s", set_as_default=False) as c:
        deadline = time.monotonic() + 60
        busy = {w: len(ts) for w, ts in c.processing().items()}
        while not any(busy.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
            busy = {w: len(ts) for w, ts in c.processing().items()}
        victim = max(busy, key=busy.get)
        os.kill(c.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    # 3. the agriland process killed mid-segmentation
    _wait(lambda: _remote_stage(url, "segmentation", tmp_path) == "running", first, "segmentation")
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert not any("segmentation" in v["metadata"].get("group", "") for v in history(url)), (
        "a product of the killed stage is visible"
    )
    # 4. the rerun takes the dead run's lock over, keeps what was finished and completes
    again = subprocess.run(cmd, cwd=client_dir, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    rec = json.loads(download(join_url(url, "run.json"), tmp_path / "final.json").read_text())
    assert set(rec["stages"].values()) == {"done"} and rec["attempts"] == 2
    assert rec["location"] == url and rec["products"]["zarr"] == join_url(url, "agriland.icechunk")
    # 5. the products on S3 equal the local run's (same seed, same models), with CRS and transform
    tree, local = open_run(url), open_run(local_out)
    seg = tree["segmentation"].to_dataset()
    assert seg.rio.crs.to_epsg() == 32618
    assert seg.rio.transform() == local["segmentation"].to_dataset().rio.transform()
    for group, var in [
        ("embeddings", "embedding"),
        ("clusters", "labels"),
        ("clusters", "soft"),
        ("segmentation", "probability"),
        ("segmentation", "mask"),
    ]:
        np.testing.assert_array_equal(
            tree[group][var].values, local[group][var].values, err_msg=f"{group}/{var}"
        )
    # the other files are on S3 too, one object each
    objects = list_objects(url)
    for rel in (
        "run.json",
        "items.json",
        "report.html",
        "cog/probability.tif",
        "cog/mask.tif",
        "quicklook.png",
        "clusters/gallery.png",
        "stac/collection.json",
    ):
        assert objects.get(rel, 0) > 0, rel
    assert xr.open_zarr(reader(url), group="cube", consolidated=False).rio.crs.to_epsg() == 32618
    # 6. the other commands take the URL: inspect (read only), report (locks, writes, puts back)
    assert "secret_access_key" not in json.dumps(rec)  # never in run.json
    agriland = cmd[0]
    env = env | s3_env.env  # commands without a pipeline file take the environment's credentials
    ins = subprocess.run(
        [agriland, "inspect", url, "--json"],
        cwd=client_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ins.returncode == 0, ins.stderr
    summary = json.loads(ins.stdout)
    assert summary["out_dir"] == url and {s["status"] for s in summary["stages"]} == {"done"}
    sizes = {r["path"]: r["bytes"] for r in summary["products"]}
    assert sizes["agriland.icechunk"] > sizes["cog/probability.tif"] > 0
    before = list_objects(url)["report.html"]
    rep = subprocess.run(
        [agriland, "report", url], cwd=client_dir, env=env, capture_output=True, text=True, timeout=300
    )
    assert rep.returncode == 0 and f"{url}/report.html" in rep.stdout, rep.stderr
    assert list_objects(url)["report.html"] > 0 and before > 0
    hist = subprocess.run(
        [agriland, "inspect", url, "--history"],
        cwd=client_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert hist.returncode == 0 and "segmentation: complete" in hist.stdout and "run-" in hist.stdout
    # 7. nothing written where the client or the workers run, except their caches
    assert list(client_dir.iterdir()) == []
    for d in worker_dirs:
        assert list(d.iterdir()) == [], d
    assert any(p.name == "unet.keras" for cache in worker_caches for p in cache.rglob("*.keras"))
