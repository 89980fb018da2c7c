"""A stage that hits a bad chunk says which block and why, keeps what it wrote, publishes
nothing half-done, and a rerun after the repair computes only the missing blocks. Real Zarr
stores on disk, one chunk file really truncated, a real LocalCluster."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr

from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.errors import BlockFailed
from agriland_scale.pipeline.runtime import dask_client
from agriland_scale.store.resume import Products


def test_bad_chunk_is_named_and_the_rest_is_kept(cube, tmp_path):
    src = tmp_path / "src.zarr"
    refl = cube["reflectance"].sel(band="red").isel(y=slice(0, 512)).compute()
    xr.Dataset({"red": refl.drop_vars("band")}).chunk({"y": 128, "x": -1}).to_zarr(
        src, zarr_format=3, consolidated=False
    )
    chunk = src / "red" / "c" / "2" / "0"  # rows 256:384
    good = chunk.read_bytes()
    chunk.write_bytes(good[: len(good) // 3])  # a truncated chunk, as a killed copy leaves it

    def product():
        red = xr.open_zarr(src, consolidated=False)["red"]
        return xr.Dataset({"ndvi_like": (red * 2).astype("float32")})

    products = Products(tmp_path / "run")
    rt = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    with dask_client(rt) as client:
        with pytest.raises(
            BlockFailed,
            match=r"doubled: block 2 \(y 256:384\) failed: .*blocks written so far "
            r"are kept",
        ):
            products.write_blocks(product(), "doubled", "y", client, label="doubled")
        assert not products.exists("doubled")  # nothing half-written is visible
        kept = products.pending_blocks("doubled")  # committed on the wip branch, not on main
        assert 2 not in kept and len(kept) <= 3  # the blocks that finished before the failure
        chunk.write_bytes(good)  # repaired
        stats = products.write_blocks(product(), "doubled", "y", client, label="doubled")
    assert stats["blocks"] == 4 and stats["reused"] == len(kept)  # only the missing blocks were computed
    out = xr.open_zarr(products.reader(), group="doubled", consolidated=False)["ndvi_like"].values
    np.testing.assert_allclose(out, refl.values * 2, rtol=1e-6)
    assert products.exists("doubled")
    shutil.rmtree(tmp_path / "run")
