import numpy as np
import pytest
import xarray as xr

from agriland_scale.errors import RegionError
from agriland_scale.patches import (
    blend_weight,
    patch_grid,
    patch_index,
    patch_map_transform,
    read_patches,
    window_starts,
)

from .conftest import ORIGIN_X, ORIGIN_Y


def test_grid_counts():
    rows, cols = patch_grid(1024, 1024, 256, 256)
    assert list(rows) == [0, 256, 512, 768] and list(cols) == list(rows)
    assert len(patch_grid(1024, 1000, 256, 128)[1]) == 6
    with pytest.raises(RegionError, match="smaller than one patch"):
        patch_grid(100, 1024, 256, 256)


def test_index_is_georeferenced(cube):
    idx = patch_index(cube, 256, 256)
    assert idx.sizes["patch"] == 16
    first = idx.isel(patch=0)
    assert float(first.minx) == ORIGIN_X and float(first.maxy) == ORIGIN_Y
    assert float(first.maxx) - float(first.minx) == 2560.0
    last = idx.isel(patch=-1)
    assert float(last.maxx) == ORIGIN_X + 10240 and float(last.miny) == ORIGIN_Y - 10240
    np.testing.assert_allclose(idx["valid_fraction"], 1.0)


def test_patches_are_views_of_the_cube(cube):
    idx = patch_index(cube, 256, 128)
    i = 10
    y0, x0 = int(idx.y0[i]), int(idx.x0[i])
    batch = read_patches(
        cube["reflectance"],
        idx.y0.values[i : i + 1],
        idx.x0.values[i : i + 1],
        256,
        ["red", "green", "blue"],
        0.3,
    )
    ref = (
        cube["reflectance"]
        .sel(band=["red", "green", "blue"])
        .isel(y=slice(y0, y0 + 256), x=slice(x0, x0 + 256))
        .values
    )
    np.testing.assert_allclose(batch[0], np.clip(np.moveaxis(ref, 0, -1) / 0.3, 0, 1), rtol=1e-6)


def test_patch_round_trip_is_identical(cube):
    """Patches cut with the grid, put back at their offsets, rebuild the cube exactly."""
    red = cube["reflectance"].sel(band="red").load()
    idx = patch_index(cube, 256, 256)
    canvas = xr.full_like(red, np.nan)
    for y0, x0 in zip(idx.y0.values, idx.x0.values):
        canvas[y0 : y0 + 256, x0 : x0 + 256] = red[y0 : y0 + 256, x0 : x0 + 256].values
    xr.testing.assert_identical(canvas, red)


def test_patch_map_transform():
    from affine import Affine

    t = Affine(10, 0, 1000, 0, -10, 5000)
    assert patch_map_transform(t, 256, 256) == Affine(2560, 0, 1000, 0, -2560, 5000)
    m = patch_map_transform(t, 256, 128)
    assert (m.a, m.c, m.f) == (1280, 1000 + 640, 5000 - 640)


def test_window_starts_cover_every_pixel():
    for length in (100, 256, 1000, 1024):
        s = window_starts(length, 256, 192, 32)
        covered = np.zeros(length, bool)
        for a in s:
            covered[max(a, 0) : min(a + 256, length)] = True
        assert covered.all()
        assert np.all(np.diff(s) == 192)


def test_blend_weight_is_smooth_and_positive():
    w = blend_weight(256)
    assert w.shape == (256, 256) and w.min() > 0
    assert w[128, 128] > 0.99 and w[0, 0] < 0.01
    np.testing.assert_allclose(w, w.T)


def test_read_patches_in_spans_equals_patch_by_patch(cube):
    from agriland_scale.patches import read_patches

    refl = cube["reflectance"]
    rng = np.random.default_rng(0)
    for y0, x0 in [
        (np.array([0, 0, 128, 128]), np.array([0, 128, 0, 128])),  # one compact span
        (rng.integers(0, 768, 6), rng.integers(0, 768, 6)),  # scattered: by rows
        (np.array([512, 512, 512]), np.array([0, 384, 768])),
    ]:  # one row, far apart
        got = read_patches(refl, y0, x0, 256, ["red", "green", "blue"], 0.3)
        for i, (a, b) in enumerate(zip(y0, x0)):
            want = (
                refl.sel(band=["red", "green", "blue"]).isel(y=slice(a, a + 256), x=slice(b, b + 256)).values
            )
            want = np.clip(np.nan_to_num(np.moveaxis(want, 0, -1)) / 0.3, 0, 1)
            np.testing.assert_array_equal(got[i], want)


def _old_patch_fraction(valid, y0, x0, size):
    """The per-patch valid fraction as it was computed before the workers counted it by
    windows (agriland_scale.patches._valid_fraction): a gcd block sum of the whole image,
    through dask, added per patch through its integral image on the client."""
    import dask.array as da

    cs = int(np.gcd.reduce(np.concatenate([y0, x0, [size]]))) or size
    blocks = da.coarsen(np.sum, valid.data, {0: cs, 1: cs}, trim_excess=True)
    k = size // cs
    ii = np.pad(np.asarray(blocks.compute(), dtype="float64").cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    r, c = np.asarray(y0) // cs, np.asarray(x0) // cs
    total = ii[r + k, c + k] - ii[r, c + k] - ii[r + k, c] + ii[r, c]
    return (total / size**2).astype("float32")


def _old_chunk_fraction(cube, chunk, strip_bytes=64 * 2**20):
    """agriland_scale.cube.masks.chunk_valid_fraction as it was: strips read on the client."""
    count = cube["clear_count"]
    h, w = count.sizes["y"], count.sizes["x"]
    cols = np.arange(0, w, chunk)
    widths = np.diff(np.append(cols, w))
    rows = max(1, strip_bytes // max(w * count.dtype.itemsize * chunk, 1)) * chunk
    out = []
    for y0 in range(0, h, rows):
        strip = np.asarray(count.isel(y=slice(y0, y0 + rows)).values) > 0
        starts = np.arange(0, strip.shape[0], chunk)
        heights = np.diff(np.append(starts, strip.shape[0]))
        n = np.add.reduceat(np.add.reduceat(strip, starts, axis=0, dtype=np.int64), cols, axis=1)
        out.append(n / np.outer(heights, widths))
    return np.concatenate(out, axis=0)


def _old_index_fraction(cube, size, stride):
    rows, cols = patch_grid(cube.sizes["y"], cube.sizes["x"], size, stride)
    y0, x0 = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
    return _old_patch_fraction((cube["clear_count"] > 0).astype("float32"), y0, x0, size)


def test_valid_fractions_by_windows_equal_a_sum_per_patch_and_the_old_way():
    """The per-patch valid fraction counted window by window (a window of whole patches with
    its halo: patches across window and chunk edges, overlapping patches) equals the plain sum
    of each patch's pixels and the former whole-image computation, bit for bit."""
    import dask.array as da

    from agriland_scale.patches import patch_valid_fraction

    rng = np.random.default_rng(3)
    count = rng.integers(0, 3, (700, 900)).astype("uint16")
    count[:300, :200] = 0  # an empty corner
    arr = xr.DataArray(da.from_array(count, chunks=(100, 130)), dims=("y", "x"))
    valid = count > 0
    plain = xr.DataArray(count, dims=("y", "x"))  # read window by window without dask: faster
    for size, stride in [(256, 256), (256, 128), (64, 48), (64, 100), (690, 5)]:
        rows, cols = patch_grid(700, 900, size, stride)
        y0, x0 = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
        want = np.array(
            [valid[a : a + size, b : b + size].sum() / size**2 for a, b in zip(y0, x0)], dtype="float32"
        )
        old = _old_patch_fraction((arr > 0).astype("float32"), y0, x0, size)
        np.testing.assert_array_equal(old, want)
        for window_bytes in (1, 150_000, 64 * 2**20):  # a window a patch, a few, one
            got = patch_valid_fraction(plain, size, stride, window_bytes=window_bytes)
            assert got.shape == (len(rows), len(cols)) and got.dtype == np.float32
            np.testing.assert_array_equal(got.ravel(), want)
        np.testing.assert_array_equal(
            patch_valid_fraction(arr, size, stride, window_bytes=150_000).ravel(), want
        )


@pytest.fixture(scope="module")
def workers():
    """A local cluster of 2 worker processes (the tasks pickle the store and read it)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        with Client(lc) as client:
            yield client


def _prefixes(client):
    return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))


@pytest.fixture(scope="module")
def edge_store(tmp_path_factory):
    """A synthetic cube in a Zarr store: 1000 x 1234 px, stored in 100 x 130 px chunks (not a
    multiple of the patches nor of the stride), an empty corner, clear counts up to 3."""
    import dask

    from agriland_scale.store import write_group

    rng = np.random.default_rng(7)
    h, w = 1000, 1234
    count = rng.integers(0, 4, (h, w)).astype("uint16")
    count[:400, :300] = 0
    count[-37:, :] = 0  # an empty margin at the bottom
    refl = rng.random((2, h, w)).astype("float32")
    cube = xr.Dataset(
        {"reflectance": (("band", "y", "x"), refl), "clear_count": (("y", "x"), count)},
        coords={
            "band": np.array(["red", "nir"], dtype=object),
            "y": 5e6 - 10 * np.arange(h) - 5,
            "x": 4e5 + 10 * np.arange(w) + 5,
        },
    ).rio.write_crs("EPSG:32618")
    cube = cube.chunk({"y": 100, "x": 130})
    path = str(tmp_path_factory.mktemp("edge") / "cube.zarr")
    with dask.config.set(scheduler="synchronous"):  # not through the workers' client
        write_group(cube, path, "cube")
    return path


def test_valid_fractions_on_the_workers_equal_the_old_ones(workers, edge_store, cube, cube_store):
    """Counted by the workers (tasks reading the store, named for the dashboard), the patch
    index and the chunk fractions equal what the client computed before, on a synthetic cube
    with edge cases and on the real sample (Virginia)."""
    from agriland_scale.cube.masks import chunk_valid_fraction
    from agriland_scale.store import open_cube

    for store, opened in ((edge_store, open_cube(edge_store)), (cube_store, cube)):
        for size, stride, window_bytes in [(256, 128, 200_000), (64, 48, 200_000), (128, 128, 64 * 2**20)]:
            idx = patch_index(
                opened, size, stride, workers, store=store, group="cube", window_bytes=window_bytes
            )
            np.testing.assert_array_equal(
                idx["valid_fraction"].values, _old_index_fraction(opened, size, stride)
            )
        local = open_cube(store, dask=False)
        for chunk, strips in ((100, (200_000, 64 * 2**20)), (256, (1,))):
            old = _old_chunk_fraction(local, chunk)
            for strip in strips:  # on the workers (a few blocks a window, one), here (a small cube)
                got = chunk_valid_fraction(local, chunk, strip, client=workers, store=store, group="cube")
                assert got.shape == old.shape
                np.testing.assert_array_equal(got, old)
    assert (_old_chunk_fraction(open_cube(edge_store, dask=False), 100) == 0).any()  # empty blocks too
    assert {"patches-index", "cube-valid-chunks"} <= _prefixes(workers)
