"""Compositing: every method against plain NumPy on masked stacks of dates.

The cube's composite (``cube.composite_block``) uses sorting/selection networks of whole
planes and bitwise blends; these tests pin it to the obvious NumPy expressions, bit for
bit, for 1 to 7 and 30 dates, with every date clear and with clouds, and the median to
``np.nanmedian`` of the scaled reflectance.
"""

from __future__ import annotations

import numpy as np
import pytest

from agriland_scale.cube.composite import _cube_block, composite_block

SCALE = np.array([1e-4, 2e-4, 1e-4], dtype="float32")
OFFSET = np.array([-0.1, 0.0, 0.05], dtype="float32")


def plain(dn: np.ndarray, clear: np.ndarray, method: str) -> np.ndarray:
    """The reference: sort / take_along_axis / sums in the same float32 arithmetic."""
    T = clear.shape[0]
    n = clear.sum(0)
    out = np.full((dn.shape[0],) + clear.shape[1:], np.nan, dtype="float32")
    for b in range(dn.shape[0]):
        with np.errstate(invalid="ignore", divide="ignore"):
            if method == "median":
                s = np.sort(np.where(clear, dn[b], np.iinfo(dn.dtype).max), axis=0)
                lo = np.take_along_axis(s, np.clip((n - 1) // 2, 0, None)[None], 0)[0].astype("float32")
                hi = np.take_along_axis(s, np.clip(n // 2, 0, None)[None], 0)[0].astype("float32")
                v = (lo + hi) * np.float32(0.5)
            elif method == "mean":
                v = np.where(clear, dn[b], 0).sum(0, dtype="uint32") / n
            elif method == "first":
                v = np.take_along_axis(dn[b], np.argmax(clear, 0)[None], 0)[0]
            else:
                v = np.take_along_axis(dn[b], (T - 1 - np.argmax(clear[::-1], 0))[None], 0)[0]
        r = np.multiply(v, SCALE[b], dtype="float32", casting="unsafe") + OFFSET[b]
        r[n == 0] = np.nan
        out[b] = r
    return out


@pytest.mark.parametrize("method", ["median", "mean", "first", "last"])
@pytest.mark.parametrize("T", [*range(1, 8), 30])  # 30: beyond the sorting networks
@pytest.mark.parametrize("cloud", [0.0, 0.4])
def test_composite_equals_plain_numpy(method, T, cloud):
    rng = np.random.default_rng(T)
    dn = rng.integers(1, 20000, (3, T, 37, 53), dtype="uint16")
    clear = rng.random((T, 37, 53)) >= cloud
    got = composite_block(dn, clear, scale=SCALE, offset=OFFSET, method=method)
    assert got.dtype == np.float32 and got.shape == (3, 37, 53)
    np.testing.assert_array_equal(got, plain(dn, clear, method))
    if cloud:  # some pixels have no clear date at all: NaN there, and only there
        assert np.array_equal(np.isnan(got[0]), ~clear.any(0))


@pytest.mark.parametrize("T", [2, 3, 4, 6])
def test_median_is_nanmedian_of_the_clear_reflectance(T):
    rng = np.random.default_rng(10 + T)
    dn = rng.integers(1, 20000, (3, T, 64, 64), dtype="uint16")
    clear = rng.random((T, 64, 64)) >= 0.3
    refl = np.where(clear, dn * SCALE[:, None, None, None].astype("float64")
                    + OFFSET[:, None, None, None], np.nan)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):  # all-NaN pixels
        expect = np.nanmedian(refl, axis=1)
    got = composite_block(dn, clear, scale=SCALE, offset=OFFSET, method="median")
    np.testing.assert_allclose(got, expect, rtol=0, atol=2e-7 * 3)  # float32 rounding only


def test_cube_block_masks_nodata_clouds_and_region():
    """One chunk: a band's nodata (0), a cloud mask and the region mask each remove exactly
    their observations; the last plane is the clear count."""
    rng = np.random.default_rng(3)
    T = 4
    dn = rng.integers(1, 20000, (3, T, 32, 32), dtype="uint16")
    dn[1, 0, :8] = 0  # band 1 has no data on date 0, top rows: the whole observation goes
    cloud = np.zeros((T, 32, 32), dtype=bool)
    cloud[2, :, :16] = True
    region = np.ones((32, 32), dtype=bool)
    region[-4:] = False
    kw = {"n_bands": 3, "nodata": [0, 0, 0], "scl_classes": None, "cloud": True, "region": True}
    refl = _cube_block(*dn, cloud, region, **kw, part="reflectance", scale=SCALE, offset=OFFSET, method="median")
    count = _cube_block(*dn, cloud, region, **kw, part="clear_count")
    clear = (dn != 0).all(0) & ~cloud & region
    assert refl.shape == (3, 32, 32) and count.shape == (32, 32) and count.dtype == np.uint16
    np.testing.assert_array_equal(count, clear.sum(0))
    np.testing.assert_array_equal(refl, plain(dn, clear, "median"))
    assert count[:8, 16:].max() == 3 and count[8:-4, 16:].min() == 4 and np.isnan(refl[:, -4:]).all()
