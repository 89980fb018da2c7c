"""Masks and checks over a cube's grid: the region's polygons, the clear pixels per block."""

from __future__ import annotations

import dask.array as dsa
import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox

from agriland_scale.config.region import Region
from agriland_scale.errors import EmptyRegion

__all__ = ["check_not_empty", "chunk_valid_fraction", "region_mask"]


def region_mask(region: Region, geobox: GeoBox, chunk: int) -> xr.DataArray:
    """Lazy boolean ``(y, x)`` mask, True inside the region's polygons, on ``geobox``."""
    import rasterio.features
    from affine import Affine

    geom = region.near(geobox.extent.to_crs("EPSG:4326").boundingbox).to_crs(str(geobox.crs))
    t = geobox.transform

    def block(block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        bt = t @ Affine.translation(c0, r0)
        return rasterio.features.geometry_mask(
            [geom], out_shape=(r1 - r0, c1 - c0), transform=bt, invert=True, all_touched=False
        )

    h, w = geobox.shape
    data = dsa.map_blocks(
        block,
        chunks=(dsa.core.normalize_chunks(chunk, (h,))[0], dsa.core.normalize_chunks(chunk, (w,))[0]),
        dtype=bool,
    )
    coords = geobox.coordinates
    return xr.DataArray(data, dims=("y", "x"), coords={"y": coords["y"].values, "x": coords["x"].values})


def chunk_valid_fraction(cube: xr.Dataset, chunk: int, strip_bytes: int = 64 * 2**20) -> np.ndarray:
    """Fraction of pixels with a clear observation per ``chunk`` x ``chunk`` block, ``(ny, nx)``.

    Blocks at 0 are entirely nodata or cloud: later stages skip them (patches below
    ``patches.min_valid_fraction``, segmentation blocks without a clear pixel). An edge
    block's fraction is over its own pixels. ``clear_count`` is read in strips of whole
    block rows, at most about ``strip_bytes`` each: from a cube opened without dask
    (``open_cube(..., dask=False)``) that is a direct read in this process, with no task
    graph (Virginia's 1943 x 1929 px cube, 256 px blocks: 0.06 s against 0.23-0.31 s for
    the same through dask, and about 0.8 s through the run's cluster).
    """
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
    return np.concatenate(out, axis=0) if out else np.zeros((0, len(cols)))


def check_not_empty(cube: xr.Dataset) -> None:
    """Raise :class:`EmptyRegion` if no pixel has a clear observation (computes a count)."""
    n = int(cube["clear_count"].astype(bool).sum().compute())
    if n == 0:
        raise EmptyRegion(
            "every pixel of the region is nodata or masked (clouds, shadows): "
            "choose another search.datetime or raise search.max_cloud_cover"
        )
