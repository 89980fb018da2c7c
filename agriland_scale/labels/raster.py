"""Labels: polygons (GeoJSON, any CRS) -> a mask aligned to the cube grid.

Mask values: 1 = positive class (agricultural land), 0 = labelled negative,
255 = unlabelled (ignored by training and metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import rasterio.features
import shapely
import xarray as xr
from pyproj import CRS, Transformer
from shapely.geometry import mapping, shape

from agriland_scale.errors import CorruptInput, EmptyRegion
from agriland_scale.labels.classes import IGNORE
from agriland_scale.labels.via import import_via

__all__ = ["load_labels", "rasterize_labels", "read_polygons", "read_raster_labels"]


def read_polygons(path: str | Path) -> tuple[list[tuple[object, str]], CRS]:
    """Read a GeoJSON FeatureCollection: ``[(geometry, class), ...]`` and its CRS.

    RFC 7946 files are lon/lat (EPSG:4326); a legacy ``crs`` member naming another CRS is
    honoured. Every feature needs a ``class`` property.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise CorruptInput(f"labels file {p} does not exist: fix segment.labels") from None
    except json.JSONDecodeError as e:
        raise CorruptInput(f"labels file {p} is not valid JSON ({e})") from None
    crs = CRS.from_user_input(data.get("crs", {}).get("properties", {}).get("name", "EPSG:4326"))
    out = []
    for i, f in enumerate(data.get("features", [])):
        cls = (f.get("properties") or {}).get("class")
        if cls is None:
            raise CorruptInput(f"feature {i} of {p} has no 'class' property (e.g. 'arable' or 'other')")
        out.append((shape(f["geometry"]), str(cls)))
    if not out:
        raise CorruptInput(f"labels file {p} holds no features")
    return out, crs


def rasterize_labels(
    path: str | Path, like: xr.Dataset, positive: list[str], *, lazy: bool = False
) -> xr.DataArray:
    """Rasterise label polygons onto the grid of ``like`` (a cube): uint8 (y, x) mask.

    Polygons of a class in ``positive`` burn 1, others 0, the rest stays 255 (ignored).
    Positive polygons are burnt last, so they win where classes overlap.

    ``lazy``: only the window of the grid that the polygons cover is rasterised (in memory:
    that window, not the zone); the rest of the zone is a lazy dask array of 255 around it, as
    the segmentation stage needs over a region of many tiles whose labels cover a few.
    """
    polys, crs = read_polygons(path)
    to_cube = Transformer.from_crs(crs, like.rio.crs, always_xy=True).transform
    moved = [(shapely.transform(g, to_cube, interleaved=False), c) for g, c in polys]
    empty = (
        "no label polygon of {path} falls inside the cube (bounds {bounds} in {crs}): check the file's CRS"
    )
    h, w = like.sizes["y"], like.sizes["x"]
    transform = like.rio.transform()
    y0, y1, x0, x1 = 0, h, 0, w
    if lazy:  # the polygons' window of the grid, px
        left, bottom, right, top = shapely.total_bounds([g for g, _ in moved])
        inv = ~transform
        cols, rows = zip(*(inv * (x, y) for x, y in ((left, top), (right, bottom))))
        y0, y1 = (int(np.clip(v, 0, h)) for v in (np.floor(min(rows)), np.ceil(max(rows))))
        x0, x1 = (int(np.clip(v, 0, w)) for v in (np.floor(min(cols)), np.ceil(max(cols))))
        if y1 <= y0 or x1 <= x0:
            raise EmptyRegion(empty.format(path=path, bounds=like.rio.bounds(), crs=like.rio.crs))
    mask = np.full((y1 - y0, x1 - x0), IGNORE, dtype="uint8")
    for keep in (False, True):
        shapes = [(mapping(g), int(keep)) for g, c in moved if (c in positive) == keep]
        if shapes:
            rasterio.features.rasterize(shapes, out=mask, transform=transform * transform.translation(x0, y0))
    if not lazy:
        return _label_array(mask, like, path, empty)
    if (mask != IGNORE).sum() == 0:
        raise EmptyRegion(empty.format(path=path, bounds=like.rio.bounds(), crs=like.rio.crs))
    import dask.array as dsa

    whole = dsa.pad(
        dsa.from_array(mask, chunks=1024),
        ((y0, h - y1), (x0, w - x1)),
        mode="constant",
        constant_values=IGNORE,
    )
    return _label_array(whole, like, path, empty, check=False)


def _label_array(
    mask: Any, like: xr.DataArray | xr.Dataset, path: str | Path, empty: str, *, check: bool = True
) -> xr.DataArray:
    """Wrap the uint8 label mask ``(y, x)`` as a DataArray on ``like``'s grid and CRS.

    Raises :class:`EmptyRegion` (message ``empty``) when no pixel is labelled (``check``).
    """
    if check and (mask != IGNORE).sum() == 0:
        raise EmptyRegion(empty.format(path=path, bounds=like.rio.bounds(), crs=like.rio.crs))
    da = xr.DataArray(mask, dims=("y", "x"), coords={"y": like.y, "x": like.x}, name="label")
    da.attrs.update(
        flag_values=[0, 1, IGNORE], flag_meanings="other agricultural unlabelled", source=str(path)
    )
    return da.rio.write_crs(like.rio.crs)


def read_raster_labels(path: str | Path, like: xr.DataArray | xr.Dataset) -> xr.DataArray:
    """Read a label raster matched to the grid of ``like`` by nearest-neighbour reprojection.

    The raster is a GeoTIFF in any CRS: 1 = agricultural, 0 = other, 255 / nodata =
    unlabelled; any other value becomes unlabelled.

    Parameters
    ----------
    path : str or Path
        The label raster.
    like : xarray.DataArray or xarray.Dataset
        The grid (``y``, ``x``, CRS) to match, usually the cube.

    Returns
    -------
    xarray.DataArray
        ``label`` ``(y, x)`` uint8 on ``like``'s grid, in its CRS (255 = unlabelled).

    Raises
    ------
    CorruptInput
        When the file cannot be read.
    EmptyRegion
        When no 0/1 pixel falls inside ``like``.
    """
    import rioxarray
    from rasterio.enums import Resampling

    try:
        # a GeoTIFF opens as one DataArray (a list or Dataset only for multi-subdataset files)
        src = cast(xr.DataArray, rioxarray.open_rasterio(path, masked=False)).squeeze("band", drop=True)
    except Exception as e:  # noqa: BLE001 - any reader error means the same to the user
        raise CorruptInput(f"cannot read label raster {path} ({e})") from None
    nodata = src.rio.nodata
    src = src.where(src != nodata, IGNORE) if nodata is not None else src
    src = src.astype("uint8").rio.write_nodata(IGNORE)
    out = src.rio.reproject_match(like, resampling=Resampling.nearest, nodata=IGNORE)
    mask = np.where(np.isin(out.values, [0, 1]), out.values, IGNORE).astype("uint8")
    return _label_array(
        mask, like, path, "label raster {path} has no 0/1 pixel inside the cube (bounds {bounds} in {crs})"
    )


def load_labels(
    path: str | Path, cube: xr.Dataset, positive: list[str], *, lazy: bool = False
) -> xr.DataArray:
    """Labels of any accepted kind on the cube grid (uint8 1 / 0 / 255 = ignored).

    ``lazy``: polygons are rasterised over their own window only, the zone around it a lazy
    array (:func:`rasterize_labels`); the other kinds are read whole.

    - a VIA 2 JSON (the seed's format) next to the ``patches.json`` written by
      ``agriland export-labels``;
    - a raster mask (``.tif``) in any CRS;
    - GeoJSON polygons with a ``class`` property, in any CRS.
    """
    p = Path(path)
    if p.suffix.lower() in (".tif", ".tiff"):
        return read_raster_labels(p, cube)
    if p.suffix.lower() == ".json" and (p.parent / "patches.json").exists():
        return import_via(p, cube, positive=tuple(positive))
    return rasterize_labels(p, cube, positive, lazy=lazy)
