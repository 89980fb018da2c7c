"""Cloud masks for the cube: the s2cloudless model for L1C items, and mask dilation.

L2A items carry a scene classification (SCL) that :mod:`.load` reads directly; L1C items
have none, so s2cloudless runs on the top-of-atmosphere bands resampled to a coarse grid
(``cube.s2cloudless_resolution``) and its mask is brought back to the cube grid.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import dask.array as dsa
import numpy as np
import pystac
import xarray as xr
from odc.geo.geobox import GeoBox

from agriland_scale.config.bands import canonical_band
from agriland_scale.config.schema import CubeConfig
from agriland_scale.cube.reads import read_items
from agriland_scale.errors import ConfigError
from agriland_scale.search.items import scale_offset

__all__ = ["S2CLOUDLESS_BANDS", "dilate", "s2cloudless_mask", "s2cloudless_reflectance"]


# the bands the s2cloudless model reads, in its order (Sentinel-2 band ids)
S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")


def _s2cloudless_detector(threshold: float, average_over: int, dilation_size: int):
    """One s2cloudless detector per process and settings (its LightGBM model loads once)."""
    key = (threshold, average_over, dilation_size)
    with _DETECTOR_LOCK:
        if key not in _DETECTORS:
            try:
                from s2cloudless import S2PixelCloudDetector
            except ImportError as e:
                raise ConfigError(
                    f"cube.cloud_mask is 's2cloudless' but the s2cloudless package cannot be imported "
                    f"({e}): install it with  pip install 'agriland-scale[s2cloudless]'"
                ) from None
            det = S2PixelCloudDetector(
                threshold=threshold, all_bands=False, average_over=average_over, dilation_size=dilation_size
            )
            _ = det.classifier  # load the model now, under the lock
            _DETECTORS[key] = det
        return _DETECTORS[key]


_DETECTOR_LOCK = threading.Lock()


def _detect_clouds(block: np.ndarray, **params) -> np.ndarray:
    """s2cloudless mask of one ``(time, y, x, band)`` reflectance block -> ``(time, y, x)`` bool."""
    if block.size == 0:
        return np.zeros(block.shape[:-1], dtype=bool)
    det = _s2cloudless_detector(**params)
    with _DETECTOR_LOCK:  # one LightGBM prediction at a time: it uses every core itself
        return det.get_cloud_masks(np.ascontiguousarray(block)).astype(bool)


def _repeat_block(block: np.ndarray, k: int, block_info=None) -> np.ndarray:
    """Repeat each pixel of a ``(time, y, x)`` block ``k x k`` times, cropped to the output chunk."""
    shape = block_info[None]["chunk-shape"]
    return block.repeat(k, axis=1).repeat(k, axis=2)[:, : shape[1], : shape[2]]


def s2cloudless_reflectance(
    items: Sequence[pystac.Item], cfg: CubeConfig, geobox: GeoBox, *, chunk: int | None = None
) -> xr.DataArray:
    """Read the TOA reflectance of the s2cloudless bands lazily, on a coarse grid.

    The grid is ``geobox`` (the cube's, in its UTM CRS) zoomed out to
    ``cfg.s2cloudless_resolution``. ``items`` must be normalised.

    Parameters
    ----------
    items : sequence of pystac.Item
        The normalised items of one zone.
    cfg : CubeConfig
        The cube settings (``resolution``, ``s2cloudless_resolution`` in metres, ``chunk``).
    geobox : odc.geo.geobox.GeoBox
        The cube's grid.
    chunk : int, optional
        The cube's read chunk (px of the cube grid), a multiple of ``cfg.chunk``
        (default ``cfg.chunk``).

    Returns
    -------
    xarray.DataArray
        ``(time, y, x, band)`` float32 (unitless, ``dn * scale + offset`` from
        :func:`~agriland_scale.search.items.scale_offset`, so harmonised across processing
        baselines), bands in :data:`S2CLOUDLESS_BANDS` order, averaged from their native
        10/20/60 m pixels, in chunks of ``(time, c, c, 10)`` with
        ``c = chunk * resolution / s2cloudless_resolution``: one coarse chunk covers exactly
        one chunk of the cube.
    """
    k = round(cfg.s2cloudless_resolution / cfg.resolution)
    coarse = geobox.zoom_out(k)
    c = (chunk or cfg.chunk) // k
    bands = [canonical_band(b) for b in S2CLOUDLESS_BANDS]
    ds = read_items(
        items,
        cfg,
        bands=bands,
        geobox=coarse,
        groupby="solar_day",
        part=max(cfg.chunk // k, 1),
        chunks={"time": -1, "x": c, "y": c},
        resampling="average",
    )
    refl = []
    for b in bands:
        scale, offset = scale_offset(items[0], b)
        refl.append(ds[b].data.astype("float32") * np.float32(scale) + np.float32(offset))
    data = dsa.stack(refl, axis=-1).rechunk({3: -1})
    return xr.DataArray(
        data,
        dims=("time", "y", "x", "band"),
        coords={"time": ds.time, "y": ds.y, "x": ds.x, "band": list(S2CLOUDLESS_BANDS)},
    )


def s2cloudless_mask(
    items: Sequence[pystac.Item], cfg: CubeConfig, geobox: GeoBox, *, chunk: int | None = None
) -> xr.DataArray:
    """Lazy s2cloudless cloud mask ``(time, y, x)`` bool (True = cloud) on ``geobox``.

    The model runs on :func:`s2cloudless_reflectance` chunk by chunk with a halo of
    ``average_over + dilation_size`` coarse pixels (dask ``map_overlap``; no padding at the
    image edges, where s2cloudless reflects as on a whole image), so the chunked mask equals
    the whole-image one. Each coarse pixel is then repeated onto the ``k x k`` cube pixels it
    covers and the grid cropped to ``geobox``; chunks are ``(time, chunk, chunk)`` (``chunk``
    defaults to ``cfg.chunk``; the cube passes its read chunk).

    Parameters
    ----------
    items : sequence of pystac.Item
        The normalised L1C items of one zone.
    cfg : CubeConfig
        The cube settings (``s2cloudless_*``, ``resolution`` in metres, ``chunk``).
    geobox : odc.geo.geobox.GeoBox
        The cube's grid (UTM CRS).

    Returns
    -------
    xarray.DataArray
        ``cloud`` ``(time, y, x)`` bool on ``geobox``.

    Raises
    ------
    ConfigError
        When s2cloudless is not installed.
    """
    params: dict[str, Any] = {
        "threshold": cfg.s2cloudless_threshold,
        "average_over": cfg.s2cloudless_average_over,
        "dilation_size": cfg.s2cloudless_dilation_size,
    }
    _s2cloudless_detector(**params)  # fails now, not in a task, when s2cloudless is missing
    chunk = chunk or cfg.chunk
    refl = s2cloudless_reflectance(items, cfg, geobox, chunk=chunk)
    halo = cfg.s2cloudless_average_over + cfg.s2cloudless_dilation_size
    coarse = refl.data.map_overlap(
        _detect_clouds,
        depth={0: 0, 1: halo, 2: halo, 3: 0},
        boundary="none",
        drop_axis=3,
        dtype=bool,
        **params,
    )
    assert refl.chunks is not None  # dask-backed (read_items with chunks)
    coarse = coarse.rechunk(refl.chunks[:3])  # map_overlap merges edge chunks smaller than the halo
    k = round(cfg.s2cloudless_resolution / cfg.resolution)
    h, w = geobox.shape
    chunks = (
        coarse.chunks[0],
        dsa.core.normalize_chunks(chunk, (h,))[0],
        dsa.core.normalize_chunks(chunk, (w,))[0],
    )
    fine = coarse.map_blocks(_repeat_block, k, chunks=chunks, dtype=bool)
    coords = geobox.coordinates
    return xr.DataArray(
        fine,
        dims=("time", "y", "x"),
        name="cloud",
        coords={"time": refl.time, "y": coords["y"].values, "x": coords["x"].values},
    )


def dilate(mask: xr.DataArray, radius_px: float) -> xr.DataArray:
    """Grow a boolean ``(time, y, x)`` mask by a disk of ``radius_px`` pixels.

    Works chunk-wise with a halo (dask ``map_overlap``), so a dilated chunk equals the
    whole-image result. A radius under 1 pixel returns ``mask`` unchanged.
    """
    from scipy import ndimage

    r = int(np.ceil(radius_px))
    if r < 1:
        return mask
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (yy**2 + xx**2) <= radius_px**2

    def grow(block: np.ndarray) -> np.ndarray:
        return np.stack([ndimage.binary_dilation(b, structure=disk) for b in block])

    data = mask.data.map_overlap(grow, depth={0: 0, 1: r, 2: r}, boundary=False, dtype=bool)
    return mask.copy(data=data)


_DETECTORS: dict = {}
