"""End-to-end: the demo pipeline (short schedules) on a real multi-process Dask cluster."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from agriland_scale.errors import OutputExists
from agriland_scale.pipeline import run

from .conftest import ORIGIN_X, ORIGIN_Y, SIZE

FAST = {
    "embed.train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "learning_rate": 0.001,
                    "augment": True},
    "cluster.dec": {"max_iter": 300, "update_interval": 50, "tol": 0.001, "batch_size": 16,
                    "learning_rate": 0.01, "momentum": 0.9, "alpha": 1.0},
    "segment.train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.001, "augment_factor": 1,
                      "patience": 3, "validation": "west", "validation_fraction": 0.3},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """A `dask scheduler` and a `dask worker` process on 127.0.0.1, as users run them."""
    port = _port()
    addr = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = os.environ | {"TF_NUM_INTRAOP_THREADS": "2", "OMP_NUM_THREADS": "2",
                        "DASK_LOGGING__DISTRIBUTED": "error"}
    wd = tmp_path_factory.mktemp("dask")
    sched = subprocess.Popen([bindir / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--dashboard-address", ":0"], cwd=wd, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([bindir / "dask", "worker", addr, "--nthreads", "2", "--nworkers", "1",
                               "--memory-limit", "10GiB", "--local-directory", str(wd)], cwd=wd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from distributed import Client

    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(addr, timeout="5s") as c:
                if c.scheduler_info()["workers"]:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "dask cluster did not start"
        time.sleep(0.5)
    yield addr
    worker.terminate()
    sched.terminate()
    worker.wait(20)
    sched.wait(20)


@pytest.fixture(scope="module")
def demo_run(demo_cfg, external_cluster, tmp_path_factory):
    cfg = demo_cfg.with_overrides(**FAST)
    out = tmp_path_factory.mktemp("demo")
    record = run(cfg, out, scheduler=external_cluster, report=print)
    return cfg, out, record


@pytest.mark.slow
def test_products_present_and_georeferenced(demo_run):
    cfg, out, record = demo_run
    store = out / "agriland.zarr"
    tree = xr.open_datatree(store, engine="zarr")
    assert {"cube", "patches", "embeddings", "clusters", "segmentation"} <= set(tree.children)
    for group in ("cube", "clusters", "segmentation"):
        ds = xr.open_zarr(store, group=group)
        assert ds.rio.crs is not None and ds.rio.crs.to_epsg() == 32618, group
        for name in ds.data_vars:
            if {"y", "x"} <= set(ds[name].dims):
                assert ds[name].rio.crs.to_epsg() == 32618, (group, name)
    seg = xr.open_zarr(store, group="segmentation")
    t = seg.rio.transform()
    assert (t.a, t.e, t.c, t.f) == (10.0, -10.0, ORIGIN_X, ORIGIN_Y)
    assert seg.sizes == {"y": SIZE, "x": SIZE}
    p = seg["probability"].values
    assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
    assert set(np.unique(seg["mask"].values)) <= {0, 1}
    l, b, r, tp = seg.rio.bounds()
    assert (l, b, r, tp) == (ORIGIN_X, ORIGIN_Y - 10 * SIZE, ORIGIN_X + 10 * SIZE, ORIGIN_Y)


@pytest.mark.slow
def test_embeddings_and_clusters_as_configured(demo_run):
    cfg, out, record = demo_run
    store = out / "agriland.zarr"
    emb = xr.open_zarr(store, group="embeddings")["embedding"]
    assert emb.shape == (49, cfg.embed.embedding_dim) and np.isfinite(emb.values).all()
    cl = xr.open_zarr(store, group="clusters")
    assert cl["soft"].shape == (49, cfg.cluster.k)
    np.testing.assert_allclose(cl["soft"].values.sum(1), 1, rtol=1e-5)
    assert cl["cluster_map"].shape == (7, 7)
    assert cl["cluster_map"].rio.crs.to_epsg() == 32618
    m = cl["cluster_map"].rio.transform()
    assert (m.a, m.c, m.f) == (1280.0, ORIGIN_X + 640, ORIGIN_Y - 640)
    np.testing.assert_array_equal(cl["cluster_map"].values.ravel(), cl["labels"].values)


@pytest.mark.slow
def test_cogs_models_and_run_record(demo_run):
    cfg, out, record = demo_run
    for name in ("cluster_map", "probability", "mask"):
        with rasterio.open(out / "cog" / f"{name}.tif") as ds:
            assert ds.crs.to_epsg() == 32618
    assert (out / "quicklook.png").stat().st_size > 10_000
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["name"] == cfg.name
    assert set(saved["stages"].values()) == {"done"}
    assert saved["inputs"]["items"][0]["id"] == "S2_L1C_18S_virginia_demo_window"
    assert "xarray" in saved["versions"] and saved["timings_s"]["total"] > 0
    assert saved["dashboard"].startswith("http")
    for m in ("encoder.keras", "unet.keras"):
        assert (out / "models" / m).exists() and (out / "models" / f"{m}.json").exists()


@pytest.mark.slow
def test_output_folder_of_another_run_is_refused(demo_run, demo_cfg):
    _, out, _ = demo_run
    other = demo_cfg.with_overrides(name="another-run")
    with pytest.raises(OutputExists, match="holds another run"):
        run(other, out)
    cli = subprocess.run([Path(sys.executable).parent / "agriland", "demo", "--out", str(out)],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "holds another run" in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.slow
def test_same_seed_same_outputs(demo_run, external_cluster, tmp_path):
    """A second run with the same config gives identical embeddings, clusters and mosaics."""
    cfg, out, _ = demo_run
    run(cfg, tmp_path / "again", scheduler=external_cluster)
    for group, var in [("embeddings", "embedding"), ("clusters", "labels"), ("clusters", "soft"),
                       ("segmentation", "probability")]:
        a = xr.open_zarr(out / "agriland.zarr", group=group)[var].values
        b = xr.open_zarr(tmp_path / "again" / "agriland.zarr", group=group)[var].values
        np.testing.assert_array_equal(a, b, err_msg=f"{group}/{var}")
