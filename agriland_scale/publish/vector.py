"""Field polygons from the agricultural-land mask, written as GeoParquet.

The mask (``segmentation/mask``: 1 = agricultural, 0 = other, 255 = nodata) is vectorised
block by block (``rasterio.features.shapes`` on ``block`` x ``block`` px windows, never the
whole region in memory); polygons that touch an inner block border are merged with their
neighbours across it (``shapely.unary_union``), so a field crossing blocks comes out as one
polygon. Polygons are in the mask's CRS (a UTM zone, metres); each carries its area in m² and
hectares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.files import atomic_path

__all__ = ["vectorize_mask", "write_fields"]


def vectorize_mask(mask: xr.DataArray, *, block: int = 2048, min_area_m2: float = 0.0, value: int = 1):
    """Vectorise the pixels of ``mask (y, x)`` equal to ``value`` into polygons.

    Polygons smaller than ``min_area_m2`` are dropped (after merging across blocks). Pixel
    edges are followed exactly (4-connectivity), so the polygons' areas sum to the pixel
    count times the pixel area.

    Parameters
    ----------
    mask : xarray.DataArray
        ``(y, x)`` integer mask, georeferenced (projected CRS, metres).
    block : int
        Side of the windows vectorised one at a time, pixels.
    min_area_m2 : float
        Smallest polygon kept, m².
    value : int
        The pixel value to vectorise.

    Returns
    -------
    geopandas.GeoDataFrame
        Columns ``area_m2``, ``area_ha`` and ``geometry``, in the mask's CRS, largest first.
    """
    import geopandas as gpd
    import rasterio.features
    import shapely
    from shapely.geometry import shape

    crs = mask.rio.crs
    transform = mask.rio.transform()
    h, w = mask.shape
    inner: list[Any] = []  # shapely polygons
    border: list[Any] = []
    ny, nx = -(-h // block), -(-w // block)
    for by in range(ny):
        for bx in range(nx):
            y0, x0 = by * block, bx * block
            y1, x1 = min(y0 + block, h), min(x0 + block, w)
            arr = np.asarray(mask[y0:y1, x0:x1].values)
            hit = arr == value
            if not hit.any():
                continue
            t = transform @ transform.translation(x0, y0)
            for geom, _ in rasterio.features.shapes(
                hit.astype("uint8"), mask=hit, transform=t, connectivity=4
            ):
                poly = shape(geom)
                # polygons reaching an inner block border are merged below (image edges need not)
                rows, cols = _touched_edges(poly.bounds, t, y1 - y0, x1 - x0)
                touches = (
                    (rows[0] and by > 0)
                    or (rows[1] and by < ny - 1)
                    or (cols[0] and bx > 0)
                    or (cols[1] and bx < nx - 1)
                )
                (border if touches else inner).append(poly)
    if border:
        merged = shapely.unary_union(border)
        border = list(getattr(merged, "geoms", [merged]))
    polys = inner + border
    gdf = gpd.GeoDataFrame({"geometry": polys}, geometry="geometry", crs=crs)
    gdf["area_m2"] = gdf.geometry.area
    gdf = gdf[gdf["area_m2"] >= min_area_m2].sort_values("area_m2", ascending=False).reset_index(drop=True)
    gdf["area_ha"] = gdf["area_m2"] / 1e4
    return gdf[["area_m2", "area_ha", "geometry"]]


def _touched_edges(
    bounds: tuple[float, float, float, float], t, h: int, w: int
) -> tuple[tuple[bool, bool], tuple[bool, bool]]:
    """Tell whether a polygon of world ``bounds`` reaches the edges of the ``h x w`` window.

    The window has transform ``t`` (north up); the result is ((top row, bottom row), (left
    column, right column)).
    """
    minx, miny, maxx, maxy = bounds
    left, top = t.c, t.f
    right, bottom = t.c + t.a * w, t.f + t.e * h
    eps = 1e-6 * abs(t.a)
    return (maxy >= top - eps, miny <= bottom + eps), (minx <= left + eps, maxx >= right - eps)


def write_fields(mask: xr.DataArray, path: str | Path, *, block: int = 2048, min_area_m2: float = 0.0) -> int:
    """Vectorise ``mask`` (:func:`vectorize_mask`) and write GeoParquet at ``path``.

    The file is written to a temporary name, then renamed: never half-written.

    Parameters
    ----------
    mask : xarray.DataArray
        ``(y, x)`` mask (1 = agricultural), georeferenced (projected CRS, metres).
    path : str or Path
        The GeoParquet file; its folder is created.
    block : int
        Side of the windows vectorised one at a time, pixels.
    min_area_m2 : float
        Smallest polygon kept, m².

    Returns
    -------
    int
        The number of polygons written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gdf = vectorize_mask(mask, block=block, min_area_m2=min_area_m2)
    with atomic_path(path) as tmp:
        gdf.to_parquet(tmp)
    return len(gdf)
