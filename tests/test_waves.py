"""The waves that hand a write's blocks to the scheduler keep the write's order and the graph's
annotations: blocks finish in their place (row by row, or band by band), and the tasks that
``dask.annotate(resources=...)`` kept for GPU workers run there. Real Dask clusters and a real
Icechunk store on disk."""

from __future__ import annotations

import uuid
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.pipeline.runtime import dask_client
from agriland_scale.store.blocks import BlockGrid
from agriland_scale.store.resume import Products


def _square(n: int, chunk: int) -> xr.Dataset:
    data = da.arange(n * n, dtype="float32").reshape(n, n).rechunk(chunk) + 1
    return xr.Dataset({"v": (("y", "x"), data)}, coords={"y": np.arange(n * 1.0), "x": np.arange(n * 1.0)})


def test_the_write_order_is_row_by_row_or_band_by_band():
    grid = BlockGrid.of(_square(128, 32), ("y", "x"), 32)  # 4 x 4 blocks of 32 px
    assert grid.order() == list(range(16))
    # bands of 64 px: the two left columns top to bottom, then the two right ones
    assert grid.order(64) == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
    assert BlockGrid.of(_square(128, 32), ("y",), 32).order(64) == [0, 1, 2, 3]  # one dimension: as it is


def test_blocks_finish_in_their_place_in_the_write(tmp_path):
    """One thread: the blocks are written band by band, as the order says, whatever dask's own
    ordering of the wave would prefer (every task gets its block's place as its priority)."""
    from dask.utils import key_split
    from distributed import get_task_stream

    ds = _square(128, 32)
    rt = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    products = Products(tmp_path / "run")
    with dask_client(rt) as client, get_task_stream(client) as stream:
        products.write_blocks(ds, "banded", ("y", "x"), client, block=32, band=64)
    writes = sorted(
        (t["startstops"][0]["start"], int(t["key"].split("-")[2]))
        for t in stream.data
        if key_split(t["key"]) == "banded-block"
    )
    assert [i for _, i in writes] == BlockGrid.of(ds, ("y", "x"), 32).order(64)
    out = xr.open_zarr(products.reader(), group="banded", consolidated=False)
    np.testing.assert_array_equal(out["v"].values, ds["v"].values)


def _where(marks: str) -> np.ndarray:
    """A model task: leaves a file named after the worker it ran on."""
    from distributed import get_worker

    (Path(marks) / f"{get_worker().name}-{uuid.uuid4().hex}").touch()
    return np.ones((8, 8), dtype="float32")


def test_tasks_annotated_with_resources_run_on_the_workers_that_have_them(tmp_path):
    """As segment_region's window tasks on a cluster with GPU workers: ``resources={"GPU": 1}``
    keeps them on the worker advertising a GPU, through the materialised graph of the waves."""
    from distributed import Client, Scheduler, SpecCluster, Worker

    marks = tmp_path / "marks"
    marks.mkdir()
    with dask.annotate(resources={"GPU": 1}):
        tasks = [dask.delayed(_where, pure=False)(str(marks)) for _ in range(8)]
    ds = xr.Dataset(
        {"v": (("y", "x"), da.concatenate([da.from_delayed(t, (8, 8), "float32") for t in tasks], axis=1))},
        coords={"y": np.arange(8.0), "x": np.arange(64.0)},
    )
    workers = {
        "cpu": {"cls": Worker, "options": {"nthreads": 1, "name": "cpu"}},
        "gpu": {"cls": Worker, "options": {"nthreads": 1, "name": "gpu", "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        Products(tmp_path / "run").write_blocks(ds, "model", ("y", "x"), client, block=8)
    ran = sorted(p.name.split("-")[0] for p in marks.iterdir())
    assert ran == ["gpu"] * 8, ran
