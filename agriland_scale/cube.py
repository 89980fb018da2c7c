"""Cube: load STAC items lazily with odc-stac, mask clouds, composite, read/write Zarr.

The cube is an ``xarray.Dataset`` in the items' native UTM CRS with

- ``reflectance`` (band, y, x) float32, surface/TOA reflectance (unitless, 0..1), NaN where
  no clear observation exists; chunks (n_bands, chunk, chunk) aligned to the patch grid;
- ``clear_count`` (y, x) uint16, number of clear observations per pixel;

and a ``spatial_ref`` coordinate carrying the CRS and GeoTransform (CF grid mapping).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import odc.stac
import pystac
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import box as geo_box
from odc.geo.geom import unary_union

from .config import CubeConfig
from .errors import BandMismatch, CorruptInput, EmptyRegion, NoItemsFound

__all__ = ["cube_geobox", "load_cube", "open_cube", "write_georef"]

log = logging.getLogger(__name__)


def _check_bands(items: Sequence[pystac.Item], bands: Sequence[str]) -> None:
    for item in items:
        missing = [b for b in bands if b not in item.assets]
        if missing:
            raise BandMismatch(
                f"item {item.id} has no asset(s) {missing} (it has {sorted(item.assets)}): "
                "fix cube.bands to use this collection's asset keys")


def cube_geobox(items: Sequence[pystac.Item], bbox: Sequence[float], resolution: float) -> GeoBox:
    """Pixel grid of the cube: the region ∩ the items' footprints, in the items' CRS.

    ``bbox`` is lon/lat (EPSG:4326). The grid is snapped to multiples of ``resolution``
    metres, so it coincides with the Sentinel-2 pixel grid of the items.
    """
    parsed = list(odc.stac.parse_items(list(items)))
    crs_set = {str(p.crs()) for p in parsed}
    if len(crs_set) != 1:
        raise NoItemsFound(
            f"items are in several CRSs {sorted(crs_set)}; multi-zone regions are processed per "
            "UTM zone (not built yet): restrict search.bbox to one UTM zone")
    crs = parsed[0].crs()
    footprints = [gb.extent for p in parsed for gb in p.geoboxes()[:1]]
    footprint = unary_union([f.to_crs(crs) for f in footprints])
    region = geo_box(*bbox, crs="EPSG:4326").to_crs(crs)
    inter = region & footprint
    if inter.is_empty or inter.area < resolution**2:
        raise NoItemsFound(
            f"the region bbox {list(bbox)} does not overlap any found item's footprint "
            f"({footprint.to_crs('EPSG:4326').boundingbox}): move search.bbox over the data")
    x0, y0, x1, y1 = inter.boundingbox
    fx0, fy0, fx1, fy1 = footprint.boundingbox
    # snap outward to the pixel grid, but never beyond the footprint's own (grid-aligned) edges
    r = resolution
    x0, y0 = max(np.floor(x0 / r) * r, fx0), max(np.floor(y0 / r) * r, fy0)
    x1, y1 = min(np.ceil(x1 / r) * r, fx1), min(np.ceil(y1 / r) * r, fy1)
    return GeoBox.from_bbox((x0, y0, x1, y1), crs=crs, resolution=r)


def load_cube(items: Sequence[pystac.Item], cfg: CubeConfig, bbox: Sequence[float]) -> xr.Dataset:
    """Lazily load, cloud-mask and composite ``items`` into a cube (see module doc).

    Nothing is read until the result is computed or written. SCL masking is applied when
    ``cfg.cloud_mask`` is set and the items carry the ``cfg.scl_band`` asset (L2A).
    """
    if not items:
        raise NoItemsFound("no items to load: the search found nothing")
    _check_bands(items, cfg.bands)
    use_scl = cfg.cloud_mask and all(cfg.scl_band in i.assets for i in items)
    geobox = cube_geobox(items, bbox, cfg.resolution)
    load_bands = list(cfg.bands) + ([cfg.scl_band] if use_scl else [])
    ds = odc.stac.load(
        list(items), bands=load_bands, geobox=geobox, groupby="solar_day",
        chunks={"time": 1, "x": cfg.chunk, "y": cfg.chunk}, resampling={"*": "bilinear", cfg.scl_band: "nearest"},
        fail_on_error=True,
    )
    layers = []
    for b in cfg.bands:
        da = ds[b]
        nodata = da.attrs.get("nodata")
        scale, offset = _scale_offset(items[0], b)
        valid = da != nodata if nodata is not None else xr.ones_like(da, dtype=bool)
        layers.append(xr.where(valid, da.astype("float32") * np.float32(scale) + np.float32(offset), np.nan)
                      .astype("float32"))
    # object strings are stored as Zarr v3 variable-length strings (a specified dtype)
    refl = xr.concat(layers, dim=xr.DataArray(np.array(cfg.bands, dtype=object), dims="band", name="band"))
    clear = refl.notnull().all("band")
    if use_scl:
        clear = clear & ~ds[cfg.scl_band].isin(cfg.scl_mask_classes)
    refl = refl.where(clear)
    refl = refl.chunk({"time": -1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, as intended
        if cfg.composite == "median":
            comp = refl.median("time", skipna=True)
        elif cfg.composite == "mean":
            comp = refl.mean("time", skipna=True)
        else:
            comp = refl.bfill("time").isel(time=0)
    comp = comp.transpose("band", "y", "x").astype("float32")
    comp = comp.chunk({"band": -1, "y": cfg.chunk, "x": cfg.chunk})
    out = xr.Dataset({
        "reflectance": comp,
        "clear_count": clear.sum("time").astype("uint16").chunk({"y": cfg.chunk, "x": cfg.chunk}),
    })
    out["reflectance"].attrs.update(units="1", long_name="composite reflectance",
                                    composite=cfg.composite)
    out["clear_count"].attrs.update(units="count", long_name="clear observations per pixel")
    out.attrs.update(items=[i.id for i in items], resolution_m=cfg.resolution)
    return write_georef(out, geobox.crs.epsg or str(geobox.crs))


def _scale_offset(item: pystac.Item, band: str) -> tuple[float, float]:
    rb = item.assets[band].extra_fields.get("raster:bands") or [{}]
    return float(rb[0].get("scale", 1.0)), float(rb[0].get("offset", 0.0))


def write_georef(ds: xr.Dataset, crs: int | str) -> xr.Dataset:
    """Attach CRS and GeoTransform as a ``spatial_ref`` coordinate (CF grid mapping)."""
    ds = ds.rio.write_crs(crs)
    ds = ds.rio.write_transform(ds.rio.transform(recalc=True))
    for name in ds.data_vars:  # spatial_ref stays a coordinate on reopening, even without
        ds[name].attrs.pop("grid_mapping", None)  # decode_coords="all"
        ds[name].encoding.pop("grid_mapping", None)
    return ds


def open_cube(store: str | Path, group: str = "cube", *, dask: bool = True) -> xr.Dataset:
    """Open the cube group of an output Zarr store with its CRS, lazily.

    ``dask=False`` gives lazily indexed arrays without dask (what tasks running on a worker
    use: slicing reads just those Zarr chunks, with no nested graph sent to the scheduler).
    """
    try:
        ds = xr.open_dataset(store, engine="zarr", group=group, decode_coords="all",
                             consolidated=False, chunks={} if dask else None, cache=False)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise CorruptInput(f"cannot open group '{group}' of {store}: {e}; rerun the cube stage "
                           "(agriland run ... --force cube)") from None
    if ds.rio.crs is None:
        raise CorruptInput(f"group '{group}' of {store} has no CRS: the store was not written by "
                           "agriland-scale or is damaged")
    return ds


def check_not_empty(cube: xr.Dataset) -> None:
    """Raise :class:`EmptyRegion` if no pixel has a clear observation (computes a count)."""
    n = int(cube["clear_count"].astype(bool).sum().compute())
    if n == 0:
        raise EmptyRegion("every pixel of the region is nodata or masked (clouds, shadows): "
                          "choose another search.datetime or raise search.max_cloud_cover")
