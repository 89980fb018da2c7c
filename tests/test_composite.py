"""Compositing: every method against plain NumPy on masked stacks of dates.

The cube's composite (``cube.composite_block``) uses sorting/selection networks of whole
planes and bitwise blends; these tests pin it to the obvious NumPy expressions, bit for
bit, for 1 to 7 and 30 dates, with every date clear and with clouds, and the median to
``np.nanmedian`` of the scaled reflectance.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xarray as xr
from xarray.conventions import encode_cf_variable

from agriland_scale.cube.composite import (
    BUFFER_BYTES,
    PACK_FILL,
    PACK_LIMIT,
    _buffer,
    _cube_block,
    composite_block,
    pack_reflectance,
)
from agriland_scale.cube.masks import chunk_valid_fraction

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
    refl = np.where(
        clear, dn * SCALE[:, None, None, None].astype("float64") + OFFSET[:, None, None, None], np.nan
    )
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
    refl = _cube_block(
        *dn, cloud, region, **kw, part="reflectance", scale=SCALE, offset=OFFSET, method="median"
    )
    count = _cube_block(*dn, cloud, region, **kw, part="clear_count")
    clear = (dn != 0).all(0) & ~cloud & region
    assert refl.shape == (3, 32, 32) and count.shape == (32, 32) and count.dtype == np.uint16
    np.testing.assert_array_equal(count, clear.sum(0))
    np.testing.assert_array_equal(refl, plain(dn, clear, "median"))
    assert count[:8, 16:].max() == 3 and count[8:-4, 16:].min() == 4 and np.isnan(refl[:, -4:]).all()


def xarray_packed(refl: np.ndarray, step: np.float32) -> np.ndarray:
    """What ``to_zarr`` stores for float reflectance encoded as int16 steps of ``step``."""
    var = xr.Variable(
        ("band", "y", "x"),
        refl,
        encoding={"dtype": "int16", "scale_factor": step, "_FillValue": np.int16(PACK_FILL)},
    )
    return encode_cf_variable(var).values


def test_pack_reflectance_is_xarrays_cf_encoding():
    rng = np.random.default_rng(5)
    step = np.float32(0.5e-4)
    refl = rng.uniform(-2.0, 2.0, (3, 40, 50)).astype("float32")  # beyond +-1.638: clipped
    refl[:, :5] = np.nan
    refl = np.clip(refl, -step * PACK_LIMIT, step * PACK_LIMIT)  # as the cube clips before encoding
    got = pack_reflectance(refl, float(step))
    assert got.dtype == np.int16 and (got == PACK_FILL).sum() == 3 * 5 * 50
    np.testing.assert_array_equal(got, xarray_packed(refl, step))


@pytest.mark.parametrize("method", ["median", "mean", "first", "last"])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 30])
@pytest.mark.parametrize("offset", [(-0.1, 0.0, 0.05), (0.00003, -0.1, 0.0)], ids=["whole-steps", "other"])
@pytest.mark.parametrize("cloud", [0.0, 0.4])
@pytest.mark.parametrize("dn_range", [(0, 40000), (1, 15000)], ids=["clipped-nodata", "in-int16"])
def test_packed_block_is_the_float_block_as_xarray_packs_it(method, T, offset, cloud, dn_range):
    """``part="packed"`` (integers for a median, first or last when every offset is a whole
    number of half DNs; the float composite and :func:`pack_reflectance` otherwise) equals
    xarray's encoding of the clipped float32 composite, bit for bit: the stored cube is the
    same either way. DNs up to 40000 reach the clipping limit (0 is nodata); DNs of 1-15000
    (every date clear without clouds) take the int16 path that needs no clipping."""
    rng = np.random.default_rng(100 + T)
    dn = rng.integers(*dn_range, (3, T, 37, 53), dtype="uint16")
    cloud_mask = rng.random((T, 37, 53)) < cloud
    scale, off = np.full(3, 1e-4, dtype="float32"), np.array(offset, dtype="float32")
    step = np.float32(0.5) * scale[0]
    kw = {
        "n_bands": 3,
        "nodata": [0.0, 0, None],
        "scl_classes": None,
        "cloud": True,
        "region": False,
        "scale": scale,
        "offset": off,
        "method": method,
    }
    refl = _cube_block(*dn, cloud_mask, **kw, part="reflectance", limit=float(step * PACK_LIMIT))
    packed = _cube_block(*dn, cloud_mask, **kw, part="packed", step=float(step))
    assert packed.dtype == np.int16 and packed.shape == (3, 37, 53)
    np.testing.assert_array_equal(packed, xarray_packed(refl, step))
    assert (packed == PACK_LIMIT).any() == (dn_range[1] > 32767)  # the clipping was exercised
    count = _cube_block(*dn, cloud_mask, **kw, part="clear_count")
    assert np.array_equal(packed == PACK_FILL, np.broadcast_to(count == 0, packed.shape))


@pytest.mark.parametrize("nodata", [0, 0.0, np.float64(0), -9999.0, 70000])
def test_nodata_of_any_type_masks_the_same_pixels(nodata):
    """A nodata given as a float (as asset metadata gives it) masks exactly what the same
    integer does (it is compared as a uint16, which is faster); one that no uint16 can hold
    masks nothing."""
    rng = np.random.default_rng(9)
    dn = rng.integers(0, 3, (2, 3, 16, 16), dtype="uint16")  # many zeros
    kw = {"n_bands": 2, "scl_classes": None, "cloud": False, "region": False}
    count = _cube_block(*dn, **kw, nodata=[nodata, nodata], part="clear_count")
    expect = (dn != 0).all(0).sum(0) if float(nodata) == 0 else np.full((16, 16), 3)
    np.testing.assert_array_equal(count, expect)


def _blocks_for_reuse() -> list[tuple[list[np.ndarray], np.ndarray, dict]]:
    """Blocks of several shapes, date counts, clouds and methods (inputs and kwargs)."""
    rng = np.random.default_rng(31)
    out = []
    for i, (T, shape, cloud, method) in enumerate(
        [
            (4, (40, 50), 0.0, "median"),
            (4, (40, 50), 0.3, "median"),
            (6, (33, 50), 0.3, "median"),
            (3, (40, 50), 0.0, "median"),
            (4, (40, 50), 0.3, "first"),
            (5, (40, 50), 0.2, "last"),
            (4, (40, 50), 0.0, "median"),
            (2, (40, 50), 0.5, "median"),
        ]
    ):
        dn = list(rng.integers(0 if i % 2 else 1, 30000, (3, T) + shape, dtype="uint16"))
        mask = rng.random((T,) + shape) < cloud
        kw = {
            "n_bands": 3,
            "nodata": [0, 0, 0],
            "scl_classes": None,
            "cloud": True,
            "region": False,
            "scale": np.full(3, 1e-4, dtype="float32"),
            "offset": np.array([-0.1, 0, 0], dtype="float32"),
            "method": method,
        }
        out.append((dn, mask, kw))
    return out


def _run_block(dn, mask, kw, part):
    if part == "packed":
        return _cube_block(*dn, mask, **kw, part="packed", step=5e-5)
    return (
        _cube_block(
            *dn,
            mask,
            **{k: v for k, v in kw.items() if k not in ("scale", "offset", "method")},
            part="clear_count",
        )
        if part == "clear_count"
        else _cube_block(*dn, mask, **kw, part=part)
    )


def test_blocks_computed_one_after_another_equal_each_computed_alone():
    """A thread reuses its scratch arrays from block to block (``_buffer``): a block computed
    after others of other shapes, dates, clouds and methods equals the block computed in a
    fresh thread, and no result is a reused array (earlier results stay as they were)."""
    blocks = _blocks_for_reuse()
    parts = ("packed", "reflectance", "clear_count")

    def alone(i, part):  # a fresh thread: no scratch array from an earlier block
        with ThreadPoolExecutor(1) as ex:
            return ex.submit(_run_block, *blocks[i], part).result()

    ref = {(i, part): alone(i, part) for i in range(len(blocks)) for part in parts}
    kept = []
    for order in (range(len(blocks)), reversed(range(len(blocks)))):
        for i in order:
            for part in parts:
                got = _run_block(*blocks[i], part)
                np.testing.assert_array_equal(got, ref[i, part], err_msg=f"block {i} {part}")
                kept.append(((i, part), got, got.copy()))
    for key, got, copy in kept:  # nothing written since into a returned array
        np.testing.assert_array_equal(got, copy, err_msg=str(key))
        np.testing.assert_array_equal(got, ref[key], err_msg=str(key))


def test_blocks_in_concurrent_threads_equal_each_computed_alone():
    """Threads keep their scratch arrays apart: blocks composited on 4 threads at once equal
    the same blocks composited one by one."""
    blocks = _blocks_for_reuse() * 3
    ref = [_run_block(*b, "packed") for b in blocks]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda b: _run_block(*b, "packed"), blocks))
    for i, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_array_equal(g, r, err_msg=f"block {i}")


def test_a_thread_keeps_at_most_buffer_bytes_of_scratch():
    """A name's scratch memory comes back for the same or a smaller array (an edge block);
    a larger one is fresh memory, kept from then on; one that would take the thread past
    BUFFER_BYTES is fresh and not kept."""

    def run():
        a = _buffer("t_small", (10, 10), "uint16")
        same = np.shares_memory(_buffer("t_small", (10, 10), "uint16"), a)
        edge = np.shares_memory(_buffer("t_small", (7, 9), "int16"), a)
        larger = _buffer("t_small", (10, 11), "uint16")
        grown = not np.shares_memory(larger, a) and np.shares_memory(
            _buffer("t_small", (10, 10), "uint16"), larger
        )
        big = _buffer("t_big", (BUFFER_BYTES + 1,), "uint8")
        kept_big = np.shares_memory(_buffer("t_big", (BUFFER_BYTES + 1,), "uint8"), big)
        shape_ok = _buffer("t_small", (3, 4, 5), "float32").shape == (3, 4, 5)
        return same, edge, grown, kept_big, shape_ok

    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(run).result() == (True, True, True, False, True)


@pytest.mark.parametrize("shape", [(100, 90), (64, 64), (1, 130), (97, 1)])
@pytest.mark.parametrize("dask", [True, False])
def test_chunk_valid_fraction_is_the_padded_block_mean(shape, dask):
    """Per block, the fraction of pixels with a clear observation over the block's own pixels
    (edge blocks smaller), as xarray's padded coarsen mean gives it; read in strips of
    whole block rows (a tiny strip_bytes forces one block row a strip) or in one."""
    rng = np.random.default_rng(sum(shape))
    count = rng.integers(0, 3, shape).astype("uint16")
    count[:16, :16] = 0  # an empty block
    cube = xr.Dataset({"clear_count": (("y", "x"), count)})
    if dask:
        cube = cube.chunk({"y": 16, "x": 16})
    expect = np.nan_to_num(
        (xr.DataArray(count, dims=("y", "x")) > 0)
        .astype("float32")
        .coarsen(y=16, x=16, boundary="pad")
        .mean()
        .values,
        nan=0.0,
    )
    for strip in (1, 64 * 2**20):
        got = chunk_valid_fraction(cube, 16, strip_bytes=strip)
        assert got.shape == (-(-shape[0] // 16), -(-shape[1] // 16))
        np.testing.assert_allclose(got, expect, rtol=1e-6)
        assert (got == 0).any()
