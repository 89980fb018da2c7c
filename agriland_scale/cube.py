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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import odc.stac
import pystac
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry, unary_union

from .config import CubeConfig
from .errors import AgrilandWarning, CorruptInput, EmptyRegion, NoItemsFound
from .items import CLASS_BANDS, canonical_band, group_by_zone, normalize_items, scale_offset
from .region import Region

__all__ = ["check_assets", "chunk_valid_fraction", "composite_block", "cube_geobox", "dilate", "load_bands", "load_cube",
           "load_zone_cubes", "open_cube", "region_mask", "write_georef"]

log = logging.getLogger(__name__)


def cube_geobox(items: Sequence[pystac.Item], region: Region | Sequence[float], resolution: float) -> GeoBox:
    """Pixel grid of one UTM zone's cube: the region ∩ the items' footprints, in their CRS.

    ``region`` is a :class:`Region` or a lon/lat bbox (EPSG:4326). The grid is snapped to
    multiples of ``resolution`` metres, so it coincides with the Sentinel-2 pixel grid.
    Raises :class:`NoItemsFound` when the items are in several CRSs (split them with
    :func:`~agriland_scale.items.group_by_zone`) or do not overlap the region.
    """
    region = region if isinstance(region, Region) else Region.from_bbox(region)
    parsed = list(odc.stac.parse_items(list(items)))
    crs_set = {str(p.crs()) for p in parsed}
    if len(crs_set) != 1:
        raise NoItemsFound(
            f"items are in several CRSs {sorted(crs_set)}: a cube is built per UTM zone "
            "(load_zone_cubes does this)")
    crs = parsed[0].crs()
    footprints = [gb.extent for p in parsed for gb in p.geoboxes()[:1]]
    footprint = unary_union([f.to_crs(crs) for f in footprints])
    zone_region = Geometry(region.to_crs(str(crs)), crs=crs)
    inter = zone_region & footprint
    if inter.is_empty or inter.area < resolution**2:
        raise NoItemsFound(
            f"the region {list(np.round(region.bbox, 4))} does not overlap the footprint of the "
            f"found items in {crs} ({footprint.to_crs('EPSG:4326').boundingbox}): move "
            "search.bbox / search.region over the data")
    x0, y0, x1, y1 = inter.boundingbox
    fx0, fy0, fx1, fy1 = footprint.boundingbox
    # snap outward to the items' pixel grid (anchored at the footprint's top-left corner, so a
    # resolution that is a multiple of the native pixel keeps pixels aligned), but never
    # beyond the footprint's own edges
    r = resolution
    x0 = fx0 + max(np.floor((x0 - fx0) / r), 0) * r
    y1 = fy1 - max(np.floor((fy1 - y1) / r), 0) * r
    x1 = fx0 + min(np.ceil((x1 - fx0) / r), np.floor((fx1 - fx0) / r)) * r
    y0 = fy1 - min(np.ceil((fy1 - y0) / r), np.floor((fy1 - fy0) / r)) * r
    return GeoBox.from_bbox((x0, y0, x1, y1), crs=crs, resolution=r, tight=True)


def check_assets(items: Sequence[pystac.Item], bands: Sequence[str], on_bad_asset: str = "fail"
                 ) -> tuple[list[pystac.Item], list[dict]]:
    """Open every asset of ``bands`` and read its last full-resolution block.

    A truncated or corrupt COG fails here rather than in the middle of a run (a COG's
    full-resolution tiles come last in the file). ``on_bad_asset="fail"`` raises
    :class:`CorruptInput` naming the item and asset; ``"skip"`` drops the item with an
    :class:`AgrilandWarning` and reports it in the returned list of skipped assets.
    """
    import rasterio
    from rasterio.windows import Window

    def probe(job: tuple[pystac.Item, str]) -> dict | None:
        item, band = job
        href = item.assets[band].get_absolute_href() or item.assets[band].href
        try:
            with rasterio.open(href) as ds:
                bh, bw = ds.block_shapes[0]
                r0, c0 = (ds.height - 1) // bh * bh, (ds.width - 1) // bw * bw
                ds.read(1, window=Window(c0, r0, min(bw, ds.width - c0), min(bh, ds.height - r0)))
        except Exception as e:  # noqa: BLE001 - every reader failure is reported the same way
            return {"item": item.id, "asset": band, "href": href, "error": f"{type(e).__name__}: {e}"}
        return None

    jobs = [(i, b) for i in items for b in bands]
    with ThreadPoolExecutor(8) as pool:
        bad = [r for r in pool.map(probe, jobs) if r]
    if bad and on_bad_asset == "fail":
        b = bad[0]
        raise CorruptInput(
            f"item {b['item']}: asset '{b['asset']}' ({b['href']}) cannot be read ({b['error']}); "
            f"{len(bad)} bad asset(s) in all. Set cube.on_bad_asset: skip to leave such items out")
    dropped = {b["item"] for b in bad}
    for b in bad:
        warnings.warn(f"skipping item {b['item']}: asset '{b['asset']}' cannot be read ({b['error']})",
                      AgrilandWarning, stacklevel=2)
    return [i for i in items if i.id not in dropped], bad


def load_zone_cubes(items: Sequence[pystac.Item], cfg: CubeConfig, region: Region | Sequence[float], *,
                    normalized: bool = False) -> dict[int, xr.Dataset]:
    """One lazy cube per UTM zone (EPSG code -> cube), each in its native CRS.

    Nothing is resampled across zones. Zones whose items do not overlap the region are left
    out; if none overlaps, :class:`NoItemsFound` is raised.
    """
    if not normalized:
        items = normalize_items(items, load_bands(items, cfg))
    cubes, errors = {}, []
    for epsg, group in group_by_zone(items).items():
        try:
            cubes[epsg] = load_cube(group, cfg, region, normalized=True)
        except NoItemsFound as e:
            errors.append(f"EPSG:{epsg}: {e}")
    if not cubes:
        raise NoItemsFound("; ".join(errors))
    return cubes


def load_bands(items: Sequence[pystac.Item], cfg: CubeConfig) -> list[str]:
    scl = canonical_band(cfg.scl_band)
    has_scl = all(scl in {canonical_band(k) for k in i.assets} for i in items)
    return list(cfg.bands) + ([scl] if cfg.cloud_mask and has_scl and scl not in cfg.bands else [])


def load_cube(items: Sequence[pystac.Item], cfg: CubeConfig, region: Region | Sequence[float], *,
              normalized: bool = False) -> xr.Dataset:
    """Lazily load, cloud-mask and composite the items of ONE UTM zone (see module doc).

    Nothing is read until the result is computed or written. SCL masking is applied when
    ``cfg.cloud_mask`` is set and every item carries the SCL asset (L2A); L1C items are
    composited unmasked. Pixels outside a polygon region are nodata.
    """
    if not items:
        raise NoItemsFound("no items to load: the search found nothing")
    region = region if isinstance(region, Region) else Region.from_bbox(region)
    to_load = load_bands(items, cfg)
    if not normalized:
        items = normalize_items(items, to_load)
    scl = canonical_band(cfg.scl_band)
    use_scl = scl in to_load
    geobox = cube_geobox(items, region, cfg.resolution)
    ds = odc.stac.load(
        list(items), bands=to_load, geobox=geobox, groupby="solar_day",
        chunks={"time": 1, "x": cfg.chunk, "y": cfg.chunk},
        resampling={"*": "bilinear", **{b: "nearest" for b in to_load if b in CLASS_BANDS}},
        fail_on_error=True,
    )
    # digital numbers (band, time, y, x); one task per spatial chunk holds every date
    dn = xr.concat([ds[b] for b in cfg.bands],
                   dim=xr.DataArray(np.array(cfg.bands, dtype=object), dims="band", name="band"))
    dn = dn.chunk({"band": -1, "time": -1})
    clear = None
    for b in cfg.bands:
        nodata = ds[b].attrs.get("nodata")
        if nodata is not None:
            ok = ds[b] != nodata
            clear = ok if clear is None else clear & ok
    if clear is None:
        clear = xr.ones_like(ds[cfg.bands[0]], dtype=bool)
    if use_scl:
        cloud = ds[scl].isin(cfg.scl_mask_classes)
        if cfg.scl_dilation_m > 0:
            cloud = dilate(cloud, cfg.scl_dilation_m / cfg.resolution)
        clear = clear & ~cloud
    if not region.is_box:
        clear = clear & region_mask(region, geobox, cfg.chunk)
    clear = clear.chunk({"time": -1})
    factors = np.array([scale_offset(items[0], b) for b in cfg.bands], dtype="float32")
    dn = dn.transpose("band", "time", "y", "x")
    clear = clear.transpose("time", "y", "x")
    data = dn.data.map_blocks(_composite_4d, clear.data[None], drop_axis=1, dtype="float32",
                              scale=factors[:, 0], offset=factors[:, 1], method=cfg.composite)
    comp = xr.DataArray(data, dims=("band", "y", "x"),
                        coords={"band": dn.band, "y": dn.y, "x": dn.x, **{k: v for k, v in dn.coords.items()
                                                                       if k == "spatial_ref"}})
    comp = comp.transpose("band", "y", "x").chunk({"band": -1, "y": cfg.chunk, "x": cfg.chunk})
    out = xr.Dataset({
        "reflectance": comp,
        "clear_count": clear.sum("time").astype("uint16").chunk({"y": cfg.chunk, "x": cfg.chunk}),
    })
    out["reflectance"].attrs.update(units="1", long_name="composite reflectance",
                                    composite=cfg.composite)
    out["clear_count"].attrs.update(units="count", long_name="clear observations per pixel",
                                    cloud_mask="scl" if use_scl else "none")
    out.attrs.update(items=[i.id for i in items], resolution_m=cfg.resolution,
                     dates=[str(t)[:10] for t in ds.time.values])
    return write_georef(out, geobox.crs.epsg or str(geobox.crs))


def _sort_small(x: np.ndarray) -> np.ndarray:
    """Sort along axis 0 with an odd-even transposition network of whole-plane min/max.

    For the few dates of a season this is many times faster than ``np.sort`` along a short
    last axis (which pays a per-pixel call); it costs T^2 / 2 plane operations.
    """
    planes = list(x)
    n = len(planes)
    for r in range(n):
        for i in range(r % 2, n - 1, 2):
            a, b = planes[i], planes[i + 1]
            planes[i], planes[i + 1] = np.minimum(a, b), np.maximum(a, b)
    return np.stack(planes)


def composite_block(dn: np.ndarray, clear: np.ndarray, *, scale: np.ndarray, offset: np.ndarray,
                    method: str) -> np.ndarray:
    """Composite of one block: ``dn (band, time, y, x)`` digital numbers and ``clear (time, y,
    x)`` -> reflectance ``(band, y, x)`` float32 (``dn * scale + offset``), NaN where no
    observation is clear.

    ``method``: ``median`` (of the clear observations; the mean of the two middle ones for an
    even count), ``mean``, ``first`` or ``last`` (in time order). The median is taken on the
    digital numbers (scaling is linear and increasing, so it commutes) with a sorting network
    of whole-plane min/max: every operation runs on contiguous (y, x) planes.
    """
    B, T = dn.shape[:2]
    n = clear.sum(0)  # (y, x)
    out = np.empty((B,) + dn.shape[2:], dtype="float32")
    fill = np.iinfo(dn.dtype).max if np.issubdtype(dn.dtype, np.integer) else np.inf
    if method == "first":
        idx = np.argmax(clear, axis=0)
    elif method == "last":
        idx = T - 1 - np.argmax(clear[::-1], axis=0)
    for b in range(B):
        with np.errstate(invalid="ignore", divide="ignore"):
            if method == "median":
                s = _sort_small(np.where(clear, dn[b], fill)) if T <= 24 else \
                    np.sort(np.where(clear, dn[b], fill), axis=0)  # clear values sort first
                lo = np.take_along_axis(s, np.clip((n - 1) // 2, 0, None)[None], 0)[0]
                hi = np.take_along_axis(s, np.clip(n // 2, 0, None)[None], 0)[0]
                v = 0.5 * (lo.astype("float32") + hi.astype("float32"))
            elif method == "mean":
                v = np.where(clear, dn[b], 0).sum(0, dtype="float64") / n
            else:
                v = np.take_along_axis(dn[b], idx[None], 0)[0]
            out[b] = np.asarray(v, dtype="float32") * scale[b] + offset[b]
    out[:, n == 0] = np.nan
    return out


def _composite_4d(dn: np.ndarray, clear: np.ndarray, **kw) -> np.ndarray:
    return composite_block(dn, clear[0], **kw)  # clear arrives as (1, time, y, x)


def dilate(mask: xr.DataArray, radius_px: float) -> xr.DataArray:
    """Grow a boolean ``(time, y, x)`` mask by a disk of ``radius_px`` pixels, chunk-wise
    with a halo (dask ``map_overlap``), so a dilated chunk equals the whole-image result."""
    from scipy import ndimage

    r = int(np.ceil(radius_px))
    if r < 1:
        return mask
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy**2 + xx**2) <= radius_px**2

    def grow(block: np.ndarray) -> np.ndarray:
        return np.stack([ndimage.binary_dilation(b, structure=disk) for b in block])

    data = mask.data.map_overlap(grow, depth={0: 0, 1: r, 2: r}, boundary=False, dtype=bool)
    return mask.copy(data=data)


def region_mask(region: Region, geobox: GeoBox, chunk: int) -> xr.DataArray:
    """Lazy boolean ``(y, x)`` mask, True inside the region's polygons, on ``geobox``."""
    import dask.array as dsa
    import rasterio.features
    from affine import Affine

    geom = region.to_crs(str(geobox.crs))
    t = geobox.transform

    def block(block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        bt = t @ Affine.translation(c0, r0)
        return rasterio.features.geometry_mask([geom], out_shape=(r1 - r0, c1 - c0), transform=bt,
                                               invert=True, all_touched=False)

    h, w = geobox.shape
    data = dsa.map_blocks(block, chunks=(dsa.core.normalize_chunks(chunk, (h,))[0],
                                         dsa.core.normalize_chunks(chunk, (w,))[0]), dtype=bool)
    coords = geobox.coordinates
    return xr.DataArray(data, dims=("y", "x"), coords={"y": coords["y"].values, "x": coords["x"].values})


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


def chunk_valid_fraction(cube: xr.Dataset, chunk: int) -> np.ndarray:
    """Fraction of pixels with a clear observation per ``chunk`` x ``chunk`` block, ``(ny, nx)``.

    Blocks at 0 are entirely nodata or cloud: later stages skip them (patches below
    ``patches.min_valid_fraction``, segmentation blocks without a clear pixel).
    """
    valid = (cube["clear_count"] > 0).astype("float32")
    frac = valid.coarsen(y=chunk, x=chunk, boundary="pad").mean()
    return np.nan_to_num(np.asarray(frac.values), nan=0.0)


def check_not_empty(cube: xr.Dataset) -> None:
    """Raise :class:`EmptyRegion` if no pixel has a clear observation (computes a count)."""
    n = int(cube["clear_count"].astype(bool).sum().compute())
    if n == 0:
        raise EmptyRegion("every pixel of the region is nodata or masked (clouds, shadows): "
                          "choose another search.datetime or raise search.max_cloud_cover")
