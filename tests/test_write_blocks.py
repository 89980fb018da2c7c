"""Blocks written by ``Products.write_blocks`` share their Dask tasks: a task that two blocks
need (a U-Net window reaching across a block border) runs once, and each block keeps its
variables' encoding. A real LocalCluster and a real Icechunk store on disk."""

from __future__ import annotations

import uuid

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.errors import BlockFailed
from agriland_scale.pipeline.runtime import dask_client
from agriland_scale.store.resume import Products


def _window(marks: str) -> np.ndarray:
    """A costly task both blocks need; leaves one file per run in ``marks``."""
    from pathlib import Path

    (Path(marks) / uuid.uuid4().hex).touch()
    return np.arange(8 * 6, dtype="float32").reshape(8, 6) / 48


def test_a_task_two_blocks_need_runs_once_and_encoding_is_kept(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    span = dask.delayed(_window, pure=True)(str(marks))
    # two 4-row blocks, each cut from the one shared window (as segment_region's blend tasks)
    halves = [
        da.from_delayed(
            dask.delayed(lambda s, lo=lo: s[lo : lo + 4], pure=True)(span), shape=(4, 6), dtype="float32"
        )
        for lo in (0, 4)
    ]
    prob = da.concatenate(halves)
    ds = xr.Dataset(
        {"probability": (("y", "x"), prob), "doubled": (("y", "x"), prob * 2)},
        coords={"y": np.arange(8.0), "x": np.arange(6.0)},
    )
    ds["probability"].attrs["units"] = "1"
    ds["probability"].encoding.update(
        dtype="uint8", scale_factor=np.float32(1 / 254), _FillValue=np.uint8(255)
    )
    rt = RuntimeConfig(n_workers=1, threads_per_worker=2, memory_limit="2GiB", dashboard_address=":0")
    products = Products(tmp_path / "run")
    from dask.utils import key_split
    from distributed import get_task_stream

    with dask_client(rt) as client:
        with get_task_stream(client) as stream:
            stats = products.write_blocks(ds, "product", "y", client)
    assert stats["blocks"] == 2
    # a block's write says its product on the dashboard's task stream
    assert [key_split(t["key"]) for t in stream.data].count("product-block") == 2, stream.data
    assert len(list(marks.iterdir())) == 1  # the shared window ran once, not once per block
    out = xr.open_zarr(products.reader(), group="product", consolidated=False)
    expected = np.arange(48, dtype="float32").reshape(8, 6) / 48
    np.testing.assert_allclose(out["probability"].values, expected, atol=0.5 / 254)
    np.testing.assert_allclose(out["doubled"].values, expected * 2, rtol=1e-6)
    assert out["probability"].attrs["units"] == "1"
    stored = zarr.open_group(products.reader(), mode="r", path="product")["probability"]
    assert stored.dtype == np.uint8  # the block kept its variable's encoding


def test_a_packed_variable_is_written_as_it_is(tmp_path):
    """A variable whose values are already CF-packed (``scale_factor`` and ``_FillValue`` in
    its attributes, as the cube stage's ``load_cube(encoded=True)`` gives reflectance) is
    written block by block as it is: xarray would pack the store's values a second time (or
    refuse), so the raw int16 must come back unchanged and decode to the steps."""
    raw = np.arange(-20, 28, dtype="int16").reshape(8, 6)
    raw[0, 0] = -32768  # nodata
    ds = xr.Dataset(
        {
            "reflectance": (("y", "x"), da.from_array(raw, chunks=(4, 6))),
            "count": (("y", "x"), da.ones((8, 6), dtype="uint16", chunks=(4, 6))),
        },
        coords={"y": np.arange(8.0), "x": np.arange(6.0)},
    )
    ds["reflectance"].attrs.update(scale_factor=np.float32(0.5e-4), _FillValue=np.int16(-32768))
    ds["reflectance"].encoding["fill_value"] = np.int16(-32768)  # as write_georef sets it
    rt = RuntimeConfig(n_workers=1, threads_per_worker=2, memory_limit="2GiB", dashboard_address=":0")
    products = Products(tmp_path / "run")
    with dask_client(rt) as client:
        assert products.write_blocks(ds, "cube", "y", client)["blocks"] == 2
    stored = zarr.open_group(products.reader(), mode="r", path="cube")
    np.testing.assert_array_equal(stored["reflectance"][:], raw)
    assert stored["reflectance"].fill_value == -32768
    np.testing.assert_array_equal(stored["count"][:], 1)
    out = xr.open_zarr(products.reader(), group="cube", consolidated=False)["reflectance"].values
    assert np.isnan(out[0, 0])
    np.testing.assert_allclose(out.ravel()[1:], raw.ravel()[1:] * np.float32(0.5e-4), rtol=1e-6)


def _pids(n: int) -> np.ndarray:
    import os

    return np.full((n, 3), os.getpid(), dtype="int64")


def test_blocks_are_computed_and_written_on_the_workers_asked_for(tmp_path):
    """``workers=``: every task of the blocks (computing and writing) runs there; here the
    worker inside this process (:func:`main_process_worker`), the cube's place while the
    worker processes import TensorFlow, however large this process is. Without it, the worker
    processes."""
    import os

    from agriland_scale.pipeline.runtime import main_process_worker

    blocks = [
        da.from_delayed(dask.delayed(_pids, pure=False)(4), shape=(4, 3), dtype="int64") for _ in range(3)
    ]
    ds = xr.Dataset(
        {"pid": (("y", "x"), da.concatenate(blocks))}, coords={"y": np.arange(12.0), "x": np.arange(3.0)}
    )
    rt = RuntimeConfig(n_workers=1, threads_per_worker=2, memory_limit="2GiB", dashboard_address=":0")
    products = Products(tmp_path / "run")
    ballast = np.ones(3 * 2**30 // 8)  # this process above the run's 2 GiB limit: no worker pause
    with dask_client(rt) as client:
        with main_process_worker(client, rt) as here:
            assert products.write_blocks(ds, "here", "y", client, workers=[here])["blocks"] == 3
        products.write_blocks(ds, "anywhere", "y", client)
    stored = zarr.open_group(products.reader(), mode="r")
    np.testing.assert_array_equal(stored["here/pid"][:], os.getpid())
    assert os.getpid() not in stored["anywhere/pid"][:]
    del ballast


def _marked(x: np.ndarray, marks: str, fail: str, block_info=None) -> np.ndarray:
    """Leave a file per computed chunk in ``marks``; raise on the chunk at ``fail`` while it exists."""
    from pathlib import Path

    loc = block_info[0]["chunk-location"]
    if Path(fail).exists() and tuple(loc) == (2, 3):
        raise OSError(f"chunk {loc} cannot be read")
    (Path(marks) / f"{loc[0]}-{loc[1]}-{uuid.uuid4().hex[:6]}").touch()
    return x * 2


def test_square_blocks_in_waves_resume_only_the_missing_blocks(tmp_path):
    """A raster is written in squares of at most ``block`` px, whatever its width, handed to
    the scheduler in waves of at most ``max_tasks`` tasks; a failed square is named by its
    place, the others are kept, and the rerun computes only the missing squares."""
    marks, fail = tmp_path / "marks", tmp_path / "fail"
    marks.mkdir()
    fail.touch()
    src = np.arange(12 * 20, dtype="float32").reshape(12, 20)
    data = da.from_array(src, chunks=(2, 2)).map_blocks(_marked, str(marks), str(fail), dtype="float32")
    ds = xr.Dataset({"v": (("y", "x"), data)}, coords={"y": np.arange(12.0), "x": np.arange(20.0)})
    rt = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    products = Products(tmp_path / "run", commit_every_s=0)
    with dask_client(rt) as client:
        # chunk (2, 3) = rows 4:6, cols 6:8: in the square of rows 4:8, cols 4:8 (block 1 * 5 + 1)
        with pytest.raises(BlockFailed, match=r"raster: block 6 \(y 4:8, x 4:8\) failed: OSError"):
            products.write_blocks(ds, "raster", ("y", "x"), client, block=4, max_tasks=6)
        kept = products.pending_blocks("raster")
        assert 6 not in kept and kept, kept
        assert not products.exists("raster")  # nothing half-written is visible
        fail.unlink()
        for f in marks.iterdir():
            f.unlink()
        stats = products.write_blocks(ds, "raster", ("y", "x"), client, block=4, max_tasks=6)
    assert stats["blocks"] == 15 and stats["reused"] == len(kept)  # 3 rows x 5 columns of squares
    assert stats["waves"] > 1  # never more than max_tasks handed over beyond the running blocks
    # every chunk of a missing square computed once, none of a kept square
    computed = {tuple(int(v) for v in f.name.split("-")[:2]) for f in marks.iterdir()}
    assert len(list(marks.iterdir())) == len(computed) == 4 * (15 - len(kept))
    out = xr.open_zarr(products.reader(), group="raster", consolidated=False)["v"].values
    np.testing.assert_array_equal(out, src * 2)


def test_a_block_is_planned_from_its_own_tasks_whatever_the_width():
    """The tasks of one square block are culled from its own chunks' dependencies: the same
    number for a narrow and a wide raster (no pass over the whole graph per block)."""
    from agriland_scale.store.blocks import BlockGraph, BlockGrid

    sizes = []
    for width in (8, 64):
        a = da.ones((16, width * 16), chunks=(16, 16), dtype="float32")
        a = a.map_overlap(lambda x: x + 1, depth=1, boundary="none") * 2
        ds = xr.Dataset({"v": (("y", "x"), a)})
        graph = BlockGraph(ds, BlockGrid.of(ds, ("y", "x"), 32))
        assert len(graph.grid) == width // 2
        sizes.append(len(graph.needs(1)))
    assert sizes[0] == sizes[1], sizes


def test_group_chunks_bounds_every_block():
    from agriland_scale.store.blocks import group_chunks

    assert group_chunks((1024,) * 5, 2048) == [(0, 2, 0, 2048), (2, 4, 2048, 4096), (4, 5, 4096, 5120)]
    assert group_chunks((3000, 100), 2048) == [(0, 1, 0, 3000), (1, 2, 3000, 3100)]  # a large chunk alone
    assert group_chunks((5, 5, 5), None) == [(0, 1, 0, 5), (1, 2, 5, 10), (2, 3, 10, 15)]


def test_zones_written_together_advance_together_and_resume_by_zone(tmp_path):
    """Two zones' products written together: the first wave holds blocks of both (not one
    zone after the other), a failure in one keeps what both wrote, ``pending_blocks`` names
    each zone's own blocks, the rerun computes only the missing ones, and both products
    appear in one version."""
    marks, fail = tmp_path / "marks", tmp_path / "fail"
    marks.mkdir()
    fail.touch()
    src = np.arange(12 * 20, dtype="float32").reshape(12, 20)

    def zone(k: float) -> xr.Dataset:
        data = da.from_array(src * k, chunks=(2, 2)).map_blocks(
            _marked, str(marks), str(fail), dtype="float32"
        )
        return xr.Dataset({"v": (("y", "x"), data)}, coords={"y": np.arange(12.0), "x": np.arange(20.0)})

    rt = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    products = Products(tmp_path / "run", commit_every_s=0)
    both = [(zone(1), "utm18n/raster", "raster 18N"), (zone(3), "utm19n/raster", "raster 19N")]
    seen: list[str] = []
    with dask_client(rt) as client:
        with pytest.raises(BlockFailed, match=r"raster (18|19)N: block 6 \(y 4:8, x 4:8\) failed"):
            products.write_together(
                both, ("y", "x"), client, block=4, max_tasks=12, progress=lambda lab, i, n: seen.append(lab)
            )
        kept = {g: products.pending_blocks(g) for g in ("utm18n/raster", "utm19n/raster")}
        assert all(b <= set(range(15)) and 6 not in b for b in kept.values()), kept
        assert not products.exists("utm18n/raster") and not products.exists("utm19n/raster")
        fail.unlink()
        stats = products.write_together(both, ("y", "x"), client, block=4, max_tasks=12)
    # the zones advanced together: each reported progress before the other had finished
    assert seen[:2] == ["raster 18N", "raster 19N"] and set(seen[2:6]) == {"raster 18N", "raster 19N"}, seen
    for g, k in (("utm18n/raster", 1), ("utm19n/raster", 3)):
        assert stats[g]["blocks"] == 15 and stats[g]["reused"] == len(kept[g])
        out = xr.open_zarr(products.reader(), group=g, consolidated=False)["v"].values
        np.testing.assert_array_equal(out, src * k * 2)
