"""Field polygons from the agricultural-land mask, written as GeoParquet.

The mask (``segmentation/mask``: 1 = agricultural, 0 = other, 255 = nodata) is vectorised
block by block (``rasterio.features.shapes`` on ``block`` x ``block`` px windows, one task a
block: on the workers with a client, never the whole region in one piece); polygons that
touch an inner block border are merged with their neighbours across it, one group of
touching polygons at a time (an ``STRtree`` finds the groups, ``shapely.unary_union`` merges
each), so a field crossing blocks comes out as one polygon. Polygons are in the mask's CRS
(a UTM zone, metres); each carries its area in m² and hectares. Every polygon ends up in
one GeoDataFrame on the client: :func:`write_fields` refuses a mask above ``max_pixels``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.errors import AgrilandWarning
from agriland_scale.files import atomic_path

__all__ = ["vectorize_mask", "write_fields"]


def _block_polygons(
    arr: np.ndarray, t: Any, value: int, inner: tuple[bool, bool, bool, bool]
) -> tuple[list, list]:
    """Vectorise one block (transform ``t``); return its polygons ``(inside, reaching an inner border)``.

    ``inner``: whether the block's top, bottom, left and right edges are inner block borders.
    """
    import rasterio.features
    from affine import Affine
    from shapely.geometry import shape

    t = Affine(*t[:6])  # passed as a plain tuple: Dask rebuilds tuples it finds in a task's arguments
    hit = np.asarray(arr) == value
    inside: list[Any] = []
    border: list[Any] = []
    if not hit.any():
        return inside, border
    h, w = hit.shape
    for geom, _ in rasterio.features.shapes(hit.astype("uint8"), mask=hit, transform=t, connectivity=4):
        poly = shape(geom)
        # polygons reaching an inner block border are merged later (image edges need not)
        rows, cols = _touched_edges(poly.bounds, t, h, w)
        touches = (
            (rows[0] and inner[0])
            or (rows[1] and inner[1])
            or (cols[0] and inner[2])
            or (cols[1] and inner[3])
        )
        (border if touches else inside).append(poly)
    return inside, border


def _merge_touching(polys: list[Any]) -> list[Any]:
    """Merge the polygons that touch (across block borders) into one, group by group.

    Groups are the connected components of the polygons' ``intersects`` graph; each group is
    unioned on its own (a polygon touching none is kept as it is), so the cost grows with the
    number of border polygons, not with their union.
    """
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(polys) < 2:
        return polys
    geoms = np.array(polys, dtype=object)
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    n = len(geoms)
    n_groups, group = connected_components(
        coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False
    )
    order = np.argsort(group, kind="stable")
    cuts = np.flatnonzero(np.diff(group[order])) + 1
    out: list[Any] = []
    for members in np.split(order, cuts):
        if len(members) == 1:
            out.append(geoms[members[0]])
            continue
        merged = shapely.unary_union(geoms[members])
        out.extend(getattr(merged, "geoms", [merged]))
    return out


def vectorize_mask(
    mask: xr.DataArray,
    *,
    block: int = 2048,
    min_area_m2: float = 0.0,
    value: int = 1,
    client: Any = None,
    progress: Callable[[int, int], None] | None = None,
):
    """Vectorise the pixels of ``mask (y, x)`` equal to ``value`` into polygons.

    Polygons smaller than ``min_area_m2`` are dropped (after merging across blocks). Pixel
    edges are followed exactly (4-connectivity), so the polygons' areas sum to the pixel
    count times the pixel area.

    Parameters
    ----------
    mask : xarray.DataArray
        ``(y, x)`` integer mask, georeferenced (projected CRS, metres); lazy (dask) or not.
    block : int
        Side of the windows vectorised one at a time (one task each), pixels.
    min_area_m2 : float
        Smallest polygon kept, m².
    value : int
        The pixel value to vectorise.
    client : distributed.Client, optional
        Vectorise the blocks on its workers (tasks ``publish-fields-...``); without one, on
        the default Dask scheduler.
    progress : callable, optional
        ``progress(blocks done, blocks)`` as the blocks finish (with ``client``).

    Returns
    -------
    geopandas.GeoDataFrame
        Columns ``area_m2``, ``area_ha`` and ``geometry``, in the mask's CRS, largest first.
    """
    import dask
    import geopandas as gpd
    from dask.base import tokenize

    crs = mask.rio.crs
    transform = mask.rio.transform()
    data = mask.variable.chunk({"y": block, "x": block}).data
    cy, cx = (np.concatenate([[0], np.cumsum(c)]) for c in data.chunks)
    ny, nx = len(cy) - 1, len(cx) - 1
    blocks = data.to_delayed()
    token = tokenize(mask.name, transform, block, value, data.name)
    tasks = []
    for by in range(ny):
        for bx in range(nx):
            t = transform @ transform.translation(int(cx[bx]), int(cy[by]))
            inner = (by > 0, by < ny - 1, bx > 0, bx < nx - 1)
            tasks.append(
                dask.delayed(_block_polygons, pure=True)(
                    blocks[by, bx],
                    tuple(t)[:6],
                    value,
                    inner,
                    dask_key_name=f"publish-fields-{token}-{by}-{bx}",
                )
            )
    if client is not None:
        from distributed import as_completed

        futures = client.compute(tasks)
        for done, _ in enumerate(as_completed(futures), 1):
            if progress is not None:
                progress(done, len(futures))
        results = client.gather(futures)
    else:
        results = dask.compute(*tasks)
    inside = [p for r in results for p in r[0]]
    border = _merge_touching([p for r in results for p in r[1]])
    gdf = gpd.GeoDataFrame({"geometry": inside + border}, geometry="geometry", crs=crs)
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


def write_fields(
    mask: xr.DataArray,
    path: str | Path,
    *,
    block: int = 2048,
    min_area_m2: float = 0.0,
    max_pixels: int | None = None,
    client: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> int | None:
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
    max_pixels : int, optional
        The largest mask vectorised (``publish.vector_max_pixels``): every polygon passes
        through this process. A larger one is refused with an
        :class:`~agriland_scale.errors.AgrilandWarning` and no file (an older ``path`` is
        removed).
    client, progress
        As for :func:`vectorize_mask`.

    Returns
    -------
    int or None
        The number of polygons written; None when refused.
    """
    path = Path(path)
    if max_pixels is not None and mask.size > max_pixels:
        warnings.warn(
            f"no field polygons for {path.name}: the mask has {mask.size:,} pixels "
            f"({mask.shape[0]:,} x {mask.shape[1]:,}), more than publish.vector_max_pixels "
            f"({max_pixels:,}), and every polygon would pass through this process into one file. "
            "Raise publish.vector_max_pixels if this machine has the memory, or vectorise the "
            "mask COGs tile by tile",
            AgrilandWarning,
            stacklevel=2,
        )
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    gdf = vectorize_mask(mask, block=block, min_area_m2=min_area_m2, client=client, progress=progress)
    with atomic_path(path) as tmp:
        gdf.to_parquet(tmp)
    return len(gdf)
