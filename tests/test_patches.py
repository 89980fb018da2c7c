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


def test_valid_fractions_from_the_integral_image_equal_a_sum_per_patch():
    """The per-patch valid fraction (block sums added through their integral image, no loop
    over patches) equals the plain sum of each patch's pixels, for overlapping patches too."""
    import dask.array as da
    import xarray as xr

    from agriland_scale.patches import _valid_fraction, patch_grid

    rng = np.random.default_rng(3)
    valid = (rng.random((700, 900)) > 0.3).astype("float32")
    for size, stride in [(256, 256), (256, 128), (64, 48)]:
        rows, cols = patch_grid(700, 900, size, stride)
        y0, x0 = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
        arr = xr.DataArray(da.from_array(valid, chunks=256), dims=("y", "x"))
        got = _valid_fraction(arr, y0, x0, size)
        want = np.array(
            [valid[a : a + size, b : b + size].sum() / size**2 for a, b in zip(y0, x0)], dtype="float32"
        )
        np.testing.assert_array_equal(got, want)
