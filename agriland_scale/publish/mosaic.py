"""One probability map over every UTM zone of a run, in one CRS (``cube.mosaic_crs``).

Lazy and chunked: each zone's ``probability`` is reprojected onto one common grid by
odc-geo (:func:`odc.geo.xr.xr_reproject`, a task an output chunk, reading only the source
chunks that chunk needs), and the zones are merged chunk by chunk. Nothing is loaded here:
the caller writes the result block by block on the workers
(:meth:`~agriland_scale.store.resume.Products.write_blocks`), so a region of any size costs
this process its grid, not its pixels.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import xarray as xr

from agriland_scale.errors import ConfigError
from agriland_scale.store import write_georef

__all__ = ["MOSAIC_CHUNK", "mosaic_grid", "mosaic_zones"]

MOSAIC_CHUNK = 1024  # the mosaic's chunks, px a side


def mosaic_grid(segs: dict[str, xr.Dataset], crs: str, resolution: float | None, max_pixels: float):
    """Return the common grid (an odc-geo ``GeoBox``) of the zones' footprints in ``crs`` at ``resolution``.

    ``resolution``: in units of ``crs``; None takes the first zone's pixel size (projected
    ``crs`` only). Refuses (:class:`~agriland_scale.errors.ConfigError`) a geographic ``crs``
    without a resolution, and a grid of more than ``max_pixels`` (zones far apart).
    """
    import odc.geo.xr  # noqa: F401  (the .odc accessor)
    from odc.geo import CRS
    from odc.geo.geobox import GeoBox

    target = CRS(crs)
    first = next(iter(segs.values()))
    if resolution is None:
        if target.geographic:
            raise ConfigError(
                f"cube.mosaic_crs {crs} is geographic: set cube.mosaic_resolution in degrees (e.g. 0.0001)"
            )
        resolution = float(abs(first.odc.geobox.resolution.x))
    boxes = [s.odc.geobox.extent.to_crs(target).boundingbox for s in segs.values()]
    left, bottom = min(b.left for b in boxes), min(b.bottom for b in boxes)
    right, top = max(b.right for b in boxes), max(b.top for b in boxes)
    w, h = (right - left) / resolution, (top - bottom) / resolution
    if w * h > max_pixels:
        raise ConfigError(
            f"the mosaic in {crs} at {resolution:g} would be {w:,.0f} x {h:,.0f} px (more than "
            f"{max_pixels:,.0f}): the zones are far apart. Use the per-zone products, or a "
            "coarser cube.mosaic_resolution"
        )
    return GeoBox.from_bbox((left, bottom, right, top), crs=target, resolution=resolution)


def _block_mean(src: xr.DataArray, factor: int) -> xr.DataArray:
    """Return the mean of ``src``'s non-NaN pixels in squares of ``factor`` px, on its own coarser grid (lazy)."""
    import dask.array as da
    from odc.geo.xr import wrap_xr

    ny, nx = src.shape
    data = src.data if isinstance(src.data, da.Array) else da.from_array(src.data)
    side = factor * max(1, 1024 // factor)  # chunks of whole squares
    data = da.pad(data, ((0, -ny % factor), (0, -nx % factor)), constant_values=np.nan).rechunk(side)
    coarse = da.coarsen(_nanmean, data, {0: factor, 1: factor})
    return wrap_xr(coarse, src.odc.geobox.zoom_out(factor), nodata=np.nan)


def _nanmean(x: np.ndarray, axis: tuple[int, ...] | None = None, **kwargs) -> np.ndarray:
    """:func:`numpy.nanmean`, quiet where a square has no clear pixel (NaN there); runs in the tasks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis, **kwargs)


def mosaic_zones(
    segs: dict[str, xr.Dataset],
    crs: str,
    resolution: float | None,
    max_pixels: float = 5e10,
    chunk: int = MOSAIC_CHUNK,
) -> xr.Dataset:
    """Reproject every zone's ``probability`` to one ``crs`` at ``resolution`` and merge them, lazily.

    Parameters
    ----------
    segs : dict of str to xarray.Dataset
        Zone name -> segmentation (``probability`` ``(y, x)``, 0..1 with NaN for nodata, in
        the zone's UTM CRS; dask-backed, as the store opens it).
    crs : str
        The mosaic's CRS (anything pyproj accepts).
    resolution : float or None
        Pixel size in units of ``crs``; None: the first zone's pixel size (projected ``crs``
        only).
    max_pixels : float
        The largest mosaic allowed (``cube.max_pixels``).
    chunk : int
        The mosaic's chunk side, px (at most about 100 km).

    Returns
    -------
    xarray.Dataset
        ``probability`` ``(y, x)`` float32 (0..1, NaN where no zone covers), dask-backed in
        chunks of ``chunk`` px, in ``crs``: bilinear resampling (a probability is continuous);
        into a mosaic of pixels more than 1.5 times the zone's, the mean of the zone's clear
        pixels in squares of 1.5 mosaic pixels. Where zones overlap, the first zone wins. Stored as the segmentation's probability is
        (uint8 ``round(p * 254)``, 255 nodata).

    Raises
    ------
    ConfigError
        See :func:`mosaic_grid`.
    """
    from odc.geo.xr import xr_reproject

    grid = mosaic_grid(segs, crs, resolution, max_pixels)
    # the mosaic's pixel side in metres (a degree of latitude is about 111 km)
    side_m = abs(grid.resolution.y) * (111_320 if grid.crs.geographic else 1)
    # chunks of at most about 100 km: a chunk spanning degrees of longitude warps out of a
    # UTM zone's valid area, where the source window of its pixels cannot be found
    chunk = max(8, min(chunk, int(100_000 / side_m)))
    merged = None
    for seg in segs.values():
        src = seg["probability"].astype("float32")
        ratio = side_m / abs(src.odc.geobox.resolution.y)  # mosaic pixel / zone pixel
        if ratio > 1.5:
            # a coarser mosaic: the mean of the zone's clear pixels in squares 1.5 times a
            # mosaic pixel (so that each holds a mosaic pixel's centre, whatever the grids'
            # rotation), then the square holding each mosaic pixel's centre (warping samples a
            # zone at the mosaic pixels' centres: from far finer pixels, bilinear would skip
            # most of the zone, and all of one smaller than a mosaic pixel)
            part = xr_reproject(
                _block_mean(src, math.ceil(1.5 * ratio)),
                grid,
                resampling="nearest",
                dst_nodata=np.nan,
                chunks=(chunk, chunk),
            )
        else:
            src.attrs["nodata"] = np.nan  # NaN is no data, not a value to blend
            part = xr_reproject(src, grid, resampling="bilinear", dst_nodata=np.nan, chunks=(chunk, chunk))
        part = part.rename(dict(zip(part.dims[-2:], ("y", "x"))))
        merged = part if merged is None else merged.fillna(part)  # the first zone wins
    assert merged is not None
    merged = merged.drop_vars([c for c in merged.coords if c not in ("y", "x")])
    merged.attrs = {
        "long_name": "agricultural land probability, zones reprojected",
        "units": "1",
        "zones": list(segs),
    }
    merged.encoding = {
        "dtype": "uint8",
        "scale_factor": np.float32(1 / 254),
        "add_offset": np.float32(0),
        "_FillValue": np.uint8(255),
        "fill_value": np.uint8(255),
    }
    return write_georef(merged.to_dataset(name="probability"), grid.crs.to_wkt())
