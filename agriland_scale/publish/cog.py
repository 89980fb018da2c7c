"""Publish: write products as groups of one Zarr store, COGs for GIS users, and run.json."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from agriland_scale.errors import ConfigError
from agriland_scale.files import TMP_SUFFIX, atomic_path

__all__ = [
    "MASK_COLORMAP",
    "PRODUCT_VARIABLES",
    "cluster_colormap",
    "write_cluster_cog",
    "write_cog",
    "write_product_cog",
]

log = logging.getLogger(__name__)


# mask COG colour table: 0 other (light grey), 1 agricultural (green), 255 nodata (transparent
# through the COG's nodata: a GeoTIFF colour table has no alpha)
MASK_COLORMAP = {0: (200, 200, 200, 255), 1: (34, 139, 34, 255), 255: (0, 0, 0, 0)}


def cluster_colormap(k: int, nodata: int | None = None) -> dict[int, tuple[int, int, int, int]]:
    """Make a qualitative colour table for cluster ids ``0..k-1`` (RGBA; ``nodata`` transparent).

    Up to 20 clusters: the colours of the HTML report's cluster map (matplotlib's ``tab10``
    up to 10 clusters, ``tab20`` up to 20, resampled to ``k`` as the report does). More
    clusters: hues a golden angle apart, in three lightness levels, so that neighbouring ids
    differ clearly (any ``k``).

    Parameters
    ----------
    k : int
        The number of clusters.
    nodata : int, optional
        An id given a transparent entry ``(0, 0, 0, 0)``.

    Returns
    -------
    dict
        Id -> ``(red, green, blue, alpha)``, each 0..255.
    """
    import colorsys

    out: dict[int, tuple[int, int, int, int]] = {}
    if k <= 20:
        from matplotlib import colormaps

        cmap = colormaps["tab10" if k <= 10 else "tab20"].resampled(k)
        for i in range(k):
            r, g, b, _ = cmap(i)
            out[i] = (round(r * 255), round(g * 255), round(b * 255), 255)
    else:
        for i in range(k):
            h = (i * 0.618033988749895) % 1.0
            light, sat = (0.45, 0.55, 0.65)[i % 3], (0.75, 0.6, 0.9)[(i // 3) % 3]
            r, g, b = colorsys.hls_to_rgb(h, light, sat)
            out[i] = (round(r * 255), round(g * 255), round(b * 255), 255)
    if nodata is not None:
        out[int(nodata)] = (0, 0, 0, 0)
    return out


def _source_nodata(da: xr.DataArray) -> float | int | None:
    """Return the integer array's own nodata, None without one.

    That is its CF ``_FillValue``, in attrs when read undecoded, in encoding before writing.
    CF-decoded (float) data mark nodata as NaN.
    """
    if da.dtype.kind not in "iu":
        return None
    for where in (da.attrs, da.encoding):
        if where.get("_FillValue") is not None:
            return where["_FillValue"]
    return None


def write_cog(
    da: xr.DataArray,
    path: str | Path,
    *,
    nodata: float | int | None,
    resampling: str | None = None,
    rows: int = 2048,
    scale: float | None = None,
    dtype: str | None = None,
    description: str | None = None,
    units: str | None = None,
    colormap: Mapping[int, tuple[int, ...]] | None = None,
    predictor: bool | None = None,
) -> None:
    """Write a 2-D georeferenced array as a Cloud-Optimized GeoTIFF with internal overviews.

    GDAL's COG driver tiles at 512 px and adds overview levels (2, 4, ...) until the smallest
    fits one tile, so a raster wider or taller than 512 px has overviews. ``resampling`` is the
    overview resampling (a GDAL name: ``average``, ``nearest``, ``mode``, ``bilinear``...);
    by default ``average`` for floating-point data (e.g. a probability: nodata pixels are left
    out of the average) and ``nearest`` for integers (masks, cluster ids: no invented values).
    DEFLATE; ``predictor`` (by default for continuous data: floats and values stored with ``scale``, not
    for category ids) adds GDAL's predictor: floating-point prediction (``PREDICTOR=3``) for
    float data, horizontal differencing (``2``) for integers. On the demo tile it saves 6 % on
    the scaled uint8 probability and 11 % on a float32 one, but costs 13 % on the 0/1 mask.

    ``scale`` (e.g. ``1 / 254`` for a probability) stores ``round(value / scale)`` as uint8 with
    GDAL's scale metadata (QGIS and rasterio's ``scales`` give the value back), NaN as
    ``nodata`` (which must then be an integer, e.g. 255): a compact COG.

    ``dtype`` (e.g. ``"uint8"`` for cluster ids, whose colour table needs uint8 or uint16)
    writes the values unchanged in that type, NaN and the array's own nodata (its CF
    ``_FillValue``, e.g. -1) as ``nodata``; a value that does not fit, or equals ``nodata``,
    raises ``ValueError``.

    ``description`` and ``units`` are the band's description and unit (``gdalinfo``, QGIS);
    ``colormap`` (``{value: (r, g, b[, a])}``, uint8/uint16 data only) its colour table (a
    GeoTIFF colour table has no alpha: nodata pixels are transparent through ``nodata``).

    Bounded memory: ``da`` (lazy is fine) is read ``rows`` rows at a time into a tiled GeoTIFF,
    which GDAL's COG driver then copies (streaming) with overviews. Both files get temporary
    names; the COG is renamed to ``path`` only when complete.
    """
    import rasterio
    import rasterio.shutil
    from rasterio.windows import Window

    allowed = ("nearest", "average", "mode", "bilinear", "cubic", "cubicspline", "lanczos", "rms")
    out_dtype = np.dtype("uint8" if scale is not None else dtype or da.dtype)
    if resampling is None:
        resampling = "nearest" if out_dtype.kind in "iu" and scale is None else "average"
    if resampling.lower() not in allowed:
        raise ConfigError(f"overview resampling {resampling!r} is not one of {', '.join(allowed)}")
    if da.ndim != 2:
        raise ValueError(f"write_cog takes a 2-D (y, x) array, got dims {da.dims}")
    if scale is not None and dtype is not None:
        raise ValueError("write_cog: give scale (a uint8 COG) or dtype, not both")
    if (scale is not None or dtype is not None) and out_dtype.kind in "iu":
        info = np.iinfo(out_dtype)
        if nodata is None or not float(nodata).is_integer() or not info.min <= nodata <= info.max:
            raise ValueError(
                f"a {'scaled ' if scale else ''}{out_dtype} COG needs an integer nodata in "
                f"{info.min}..{info.max}, got {nodata!r}"
            )
    if colormap is not None and out_dtype not in (np.dtype("uint8"), np.dtype("uint16")):
        raise ValueError(f"a colour table needs uint8 or uint16 data, not {out_dtype}: pass dtype=")
    src_nd = _source_nodata(da) if dtype is not None else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = da.shape
    src = path.with_name(path.name + ".src" + TMP_SUFFIX)
    profile = dict(
        driver="GTiff",
        height=h,
        width=w,
        count=1,
        dtype=str(out_dtype),
        crs=da.rio.crs,
        transform=da.rio.transform(),
        nodata=nodata,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="ZSTD",
        zstd_level=1,
        BIGTIFF="IF_SAFER",
    )
    try:
        with rasterio.open(src, "w", **profile) as dst:
            for y0 in range(0, h, rows):
                part = np.asarray(da[y0 : y0 + rows].values)
                if scale is not None:
                    assert nodata is not None  # checked above: a scaled COG needs an integer nodata
                    q = np.rint(np.nan_to_num(part, nan=0.0) / scale)
                    part = np.where(np.isnan(part), nodata, np.clip(q, 0, 255 if nodata != 255 else 254))
                    part = part.astype("uint8")
                elif dtype is not None:
                    part = _cast(part, out_dtype, src_nd, nodata)
                dst.write(part, 1, window=Window(0, y0, w, part.shape[0]))
            if scale is not None:
                dst.scales, dst.offsets = (float(scale),), (0.0,)
            if description:
                dst.set_band_description(1, description)
            if units:
                dst.set_band_unit(1, units)
            if colormap:
                dst.write_colormap(1, colormap)
        if predictor is None:
            predictor = out_dtype.kind == "f" or scale is not None
        opts = {"predictor": "STANDARD" if out_dtype.kind in "iu" else "FLOATING_POINT"} if predictor else {}
        with atomic_path(path) as tmp:
            rasterio.shutil.copy(
                src,
                tmp,
                driver="COG",
                compress="DEFLATE",
                BIGTIFF="IF_SAFER",
                overview_resampling=resampling.upper(),
                **opts,
            )
    finally:
        src.unlink(missing_ok=True)


def _cast(part: np.ndarray, dtype: np.dtype, src_nodata, nodata) -> np.ndarray:
    """``part`` as ``dtype``, its nodata (NaN, ``src_nodata``) as ``nodata``; values unchanged."""
    missing = np.isnan(part) if part.dtype.kind == "f" else np.zeros(part.shape, dtype=bool)
    if src_nodata is not None:
        missing |= part == src_nodata
    vals = part[~missing]
    if vals.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = vals.min(), vals.max()
        if lo < info.min or hi > info.max or (vals == nodata).any() or (vals != np.rint(vals)).any():
            raise ValueError(
                f"values {lo}..{hi} do not fit {dtype} beside nodata {nodata}: use a wider dtype"
            )
    return np.where(missing, nodata, part).astype(dtype)


def write_cluster_cog(da: xr.DataArray, path: str | Path, *, k: int) -> None:
    """Write the cluster map as a paletted COG.

    Ids ``0..k-1`` are unchanged, uint8 (nodata 255) when ``k <= 255``, else uint16 (nodata
    65535); the colour table is that of :func:`cluster_colormap`. ``da``'s own nodata (-1, or
    NaN when read with CF masking) becomes that nodata.

    Parameters
    ----------
    da : xarray.DataArray
        The cluster map ``(y, x)`` (int16 ids, -1 = no cluster), georeferenced.
    path : str or Path
        The GeoTIFF to write.
    k : int
        The number of clusters.
    """
    dtype, nodata = ("uint8", 255) if k <= 255 else ("uint16", 65535)
    write_cog(
        da,
        path,
        nodata=nodata,
        dtype=dtype,
        description="DEC cluster id",
        colormap=cluster_colormap(k, nodata),
    )


# COG product (file stem without the zone tag) -> (Zarr group, variable) it is written from
PRODUCT_VARIABLES = {
    "cluster_map": ("clusters", "cluster_map"),
    "probability": ("segmentation", "probability"),
    "mask": ("segmentation", "mask"),
}


def write_product_cog(da: xr.DataArray, path: str | Path, product: str, *, k: int) -> None:
    """Write one of the run's COG products (a whole raster or a window of it) as publish does.

    ``product`` is a key of :data:`PRODUCT_VARIABLES`: ``cluster_map`` (paletted ids,
    :func:`write_cluster_cog` with ``k`` clusters), ``probability`` (uint8 scaled by 1/254,
    nodata 255) or ``mask`` (uint8 0/1, nodata 255, :data:`MASK_COLORMAP`). Every tile of a
    tiled product gets the same dtype, nodata, scale, colour table, description and unit.
    """
    if product == "cluster_map":
        write_cluster_cog(da, path, k=k)
    elif product == "probability":
        write_cog(da, path, nodata=255, scale=1 / 254, description="agricultural land probability", units="1")
    elif product == "mask":
        write_cog(
            da.fillna(255).astype("uint8"),
            path,
            nodata=255,
            description="agricultural land mask",
            colormap=MASK_COLORMAP,
        )
    else:
        raise ValueError(f"unknown COG product {product!r}: one of {', '.join(PRODUCT_VARIABLES)}")
