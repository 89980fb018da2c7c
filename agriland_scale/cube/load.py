"""Cube: load STAC items lazily with odc-stac, mask clouds, composite, read/write Zarr.

The cube is an ``xarray.Dataset`` in the items' native UTM CRS with

- ``reflectance`` (band, y, x) float32, surface/TOA reflectance (unitless, 0..1), NaN where
  no clear observation exists; stored in chunks (n_bands, chunk, chunk) aligned to the
  patch grid, read and composited in larger chunks (:func:`read_chunk`);
- ``clear_count`` (y, x) uint16, number of clear observations per pixel;

and a ``spatial_ref`` coordinate carrying the CRS and GeoTransform (CF grid mapping).

Clouds are masked with the items' SCL band (L2A) or, for L1C items, with the s2cloudless
model run on a coarse grid (:func:`s2cloudless_mask`); see :class:`~.config.CubeConfig`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import dask.array as dsa
import numpy as np
import odc.stac
import pystac
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry, unary_union

from agriland_scale.config.bands import ALIASES, CLASS_BANDS, canonical_band
from agriland_scale.config.region import Region
from agriland_scale.config.schema import CubeConfig
from agriland_scale.cube.cf import REFLECTANCE_STANDARD_NAMES, composite_time, processing_level  # noqa: F401
from agriland_scale.cube.clouds import S2CLOUDLESS_BANDS, dilate, s2cloudless_mask
from agriland_scale.cube.composite import PACK_FILL, PACK_LIMIT, _cube_block
from agriland_scale.cube.masks import region_mask
from agriland_scale.cube.reads import read_items
from agriland_scale.errors import (
    BandMismatch,
    ConfigError,
    CorruptInput,
    NoItemsFound,
)
from agriland_scale.search.items import acquired, group_by_zone, normalize_items, scale_offset
from agriland_scale.store import fast_compressors, write_georef

__all__ = [
    "REFLECTANCE_STANDARD_NAMES",
    "S2CLOUDLESS_BANDS",
    "composite_time",
    "cube_geobox",
    "dilate",
    "load_bands",
    "load_cube",
    "load_zone_cubes",
    "processing_level",
    "read_chunk",
    "region_mask",
    "s2cloudless_mask",
    "write_georef",
]

log = logging.getLogger(__name__)


def check_grid_size(geobox: GeoBox, resolution: float, max_pixels: float, bands: int, dates: int) -> None:
    """Refuse a cube grid of more than ``max_pixels`` pixels (a band, a zone) before it is planned.

    Raises
    ------
    ConfigError
        The grid is larger: the message gives its shape, pixels and estimated bytes
        (``bands`` x ``dates`` uint16 reads), and what to change.
    """
    h, w = geobox.shape.yx
    px = float(h) * float(w)
    if px <= max_pixels:
        return
    raise ConfigError(
        f"cube.resolution {resolution:g} m makes a grid of {h:,} x {w:,} px ({px:.2g} px, about "
        f"{px * bands * dates * 2 / 1e12:,.3g} TB to read for {bands} band(s) x {dates} date(s)) in {geobox.crs}, "
        f"more than cube.max_pixels ({max_pixels:.2g}). Sentinel-2's bands are 10, 20 and 60 m: set "
        "cube.resolution to 10 or coarser, or shrink search.bbox / search.region; raise cube.max_pixels only "
        "for a region that big on purpose"
    )


def cube_geobox(items: Sequence[pystac.Item], region: Region | Sequence[float], resolution: float) -> GeoBox:
    """Pixel grid of one UTM zone's cube: the region ∩ the items' footprints, in their CRS.

    ``region`` is a :class:`Region` or a lon/lat bbox (EPSG:4326). The grid is snapped to
    multiples of ``resolution`` metres, so it coincides with the Sentinel-2 pixel grid.
    Raises :class:`NoItemsFound` when the items are in several CRSs (split them with
    :func:`~agriland_scale.search.items.group_by_zone`) or do not overlap the region.
    """
    region = region if isinstance(region, Region) else Region.from_bbox(region)
    parsed = list(odc.stac.parse_items(list(items)))
    crs_set = {str(p.crs()) for p in parsed}
    if len(crs_set) != 1:
        raise NoItemsFound(
            f"items are in several CRSs {sorted(crs_set)}: a cube is built per UTM zone "
            "(load_zone_cubes does this)"
        )
    crs = parsed[0].crs()
    if crs is None:  # odc-stac read no asset of the item as a raster (e.g. an unknown media type)
        types = {k: a.media_type for k, a in items[0].assets.items()}
        raise BandMismatch(
            f"item {items[0].id}: odc-stac reads none of its assets as a raster band (their media "
            f"types: {types}); give the band assets a raster media type (e.g. 'image/tiff; "
            "application=geotiff; profile=cloud-optimized') or none, and proj:* fields"
        )
    footprints = [gb.extent for p in parsed for gb in p.geoboxes()[:1]]
    footprint = unary_union([f.to_crs(crs) for f in footprints])
    assert footprint is not None  # None only for no footprint at all
    # the region near the footprint only (1 degree around it), in lon/lat, before it is
    # projected: a region far wider than the zone (a continent, the whole world) has no
    # meaning in the zone's UTM projection, and projected whole it overlapped nothing
    near = region.near(footprint.to_crs("EPSG:4326").boundingbox)
    inter = None if near.geometry.is_empty else footprint & Geometry(near.to_crs(str(crs)), crs=crs)
    if inter is None or inter.is_empty or inter.area < resolution**2:
        raise NoItemsFound(
            f"the region {[round(float(v), 4) for v in region.bbox]} does not overlap the footprint of the "
            f"found items in {crs} ({footprint.to_crs('EPSG:4326').boundingbox}): move "
            "search.bbox / search.region over the data"
        )
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


def load_zone_cubes(
    items: Sequence[pystac.Item],
    cfg: CubeConfig,
    region: Region | Sequence[float],
    *,
    normalized: bool = False,
    encoded: bool = False,
) -> dict[int, xr.Dataset]:
    """One lazy cube per UTM zone (EPSG code -> cube), each in its native CRS.

    Nothing is resampled across zones. Zones whose items do not overlap the region are left
    out; if none overlaps, :class:`NoItemsFound` is raised. ``encoded``: as in
    :func:`load_cube`.
    """
    if not normalized:
        items = normalize_items(items, load_bands(items, cfg))
    cubes, errors = {}, []
    for epsg, group in group_by_zone(items).items():
        try:
            cubes[epsg] = load_cube(group, cfg, region, normalized=True, encoded=encoded)
        except NoItemsFound as e:
            errors.append(f"EPSG:{epsg}: {e}")
    if not cubes:
        raise NoItemsFound("; ".join(errors))
    return cubes


def load_bands(items: Sequence[pystac.Item], cfg: CubeConfig) -> list[str]:
    """Canonical names of every asset the cube reads: ``cfg.bands`` and the cloud mask's bands.

    ``cloud_mask="auto"`` adds SCL when every item has it; ``"scl"`` and ``"s2cloudless"``
    raise :class:`BandMismatch` naming the first item that lacks a band they need.
    """
    mode = cfg.cloud_mask
    extra: list[str] = []
    if mode in ("auto", "scl"):
        scl = canonical_band(cfg.scl_band)
        lacking = [i for i in items if scl not in {canonical_band(k) for k in i.assets}]
        if mode == "scl" and lacking:
            raise BandMismatch(
                f"cube.cloud_mask is 'scl' but item {lacking[0].id} has no '{cfg.scl_band}' asset (its "
                f"assets: {sorted(lacking[0].assets)}); {len(lacking)} of {len(items)} item(s) lack it. "
                "SCL comes with L2A products: set cube.cloud_mask to 'auto' (SCL where every item has "
                "it), 's2cloudless' (L1C items) or 'none'"
            )
        extra = [scl] if not lacking else []
    elif mode == "s2cloudless":
        extra = [canonical_band(b) for b in S2CLOUDLESS_BANDS]
        for item in items:
            have = {canonical_band(k) for k in item.assets}
            missing = [b for b in extra if b not in have]
            if missing:
                names = ", ".join(f"{ALIASES.get(b, b)} ({b})" for b in missing)
                raise BandMismatch(
                    f"cube.cloud_mask is 's2cloudless' but item {item.id} has no asset for {names} "
                    f"(its assets: {sorted(item.assets)}). s2cloudless needs the L1C top-of-atmosphere "
                    f"bands {', '.join(S2CLOUDLESS_BANDS)}; B10 (cirrus) is absent from L2A products: "
                    "search an L1C collection, or set cube.cloud_mask: auto to mask L2A items with SCL"
                )
    return list(cfg.bands) + [b for b in extra if b not in cfg.bands]


# the largest read chunk (px a side) and the memory one chunk's task may hold: the float32
# planes of every band and date it composites (the source reads are half that)
MAX_READ_CHUNK = 1024
READ_CHUNK_BYTES = 128 * 2**20


def solar_days(items: Sequence[pystac.Item]) -> int:
    """Count the dates of the cube: the items' distinct solar days (odc-stac's ``groupby="solar_day"``).

    The local day at each item's centre longitude (UTC + longitude / 15 h): tiles of one orbit
    that cross midnight UTC stay one date. A region of many tiles has many items a date; the
    cube (and a read task) has one plane a date, not an item.
    """
    days = set()
    for item in items:
        when = acquired(item)
        if when is None:
            continue
        t = np.datetime64(str(when).replace("Z", "").split("+")[0], "s")
        lon = (item.bbox[0] + item.bbox[2]) / 2 if item.bbox else 0.0
        days.add((t + np.timedelta64(int(round(lon / 15 * 3600)), "s")).astype("datetime64[D]"))
    return max(len(days), 1)


def read_chunk(cfg: CubeConfig, n_dates: int, n_bands: int) -> int:
    """Return the side (px) of the chunks the cube is read and composited in.

    ``cfg.read_chunk`` when set; for ``auto``, the largest multiple of ``cfg.chunk`` (the stored chunk, aligned to the patch grid) up to
    :data:`MAX_READ_CHUNK` whose task holds at most :data:`READ_CHUNK_BYTES` of float32
    planes (``n_dates x n_bands``), and never less than ``cfg.chunk``. Fewer, larger tasks
    cost less scheduling: the cube of one 1943 px scene took 390 tasks and 4.9 s to write
    with 256 px chunks, 30 tasks and 2.0 s with 1024 px (bench_naive notes).
    """
    if cfg.read_chunk != "auto":
        return int(cfg.read_chunk)
    per_px = 4 * max(n_dates, 1) * max(n_bands, 1)
    k = max(1, min(MAX_READ_CHUNK // cfg.chunk, int((READ_CHUNK_BYTES / per_px) ** 0.5) // cfg.chunk))
    return k * cfg.chunk


def load_cube(
    items: Sequence[pystac.Item],
    cfg: CubeConfig,
    region: Region | Sequence[float],
    *,
    normalized: bool = False,
    encoded: bool = False,
) -> xr.Dataset:
    """Lazily load, cloud-mask and composite the items of ONE UTM zone (see module doc).

    Nothing is read until the result is computed or written, in read chunks
    (:func:`read_chunk`); the variables' ``encoding["chunks"]`` holds the stored chunk
    (``cfg.chunk``): drop it to write the cube in chunks that are not a multiple of it.
    ``cfg.cloud_mask``: ``auto``
    masks with SCL when every item carries the SCL asset (L2A) and composites L1C items
    unmasked; ``scl`` requires SCL; ``s2cloudless`` masks with the s2cloudless model (L1C,
    see :func:`s2cloudless_mask`); ``none`` masks nodata only. Pixels outside a polygon
    region are nodata.

    ``encoded``: with packed storage (``cfg.storage: int16``), return reflectance as it is
    stored, int16 half digital numbers with the CF attributes ``scale_factor`` and
    ``_FillValue`` (what ``xr.open_zarr(..., decode_cf=False)`` shows; ``xr.decode_cf``
    decodes it). Computed in integers, it is bit for bit what writing the float32
    composite stores, and cheaper to write: no float pass, no encoding (bench_cube).
    """
    if not items:
        raise NoItemsFound("no items to load: the search found nothing")
    region = region if isinstance(region, Region) else Region.from_bbox(region)
    to_load = load_bands(items, cfg)
    if not normalized:
        items = normalize_items(items, to_load)
    scl = canonical_band(cfg.scl_band)
    use_scl = cfg.cloud_mask in ("auto", "scl") and scl in to_load
    use_s2c = cfg.cloud_mask == "s2cloudless"
    fine = list(cfg.bands) + ([scl] if use_scl and scl not in cfg.bands else [])
    geobox = cube_geobox(items, region, cfg.resolution)
    dates = solar_days(items)
    check_grid_size(geobox, cfg.resolution, cfg.max_pixels, len(fine), dates)
    # reads, masks and the composite work in read chunks (a multiple of the stored chunk);
    # the store keeps cfg.chunk (encoding below). A read task holds a plane a date (odc-stac
    # groups the items of a solar day), not an item: 100 tiles x 4 dates read as 4 dates
    rc = read_chunk(cfg, dates, len(fine))
    # one task per band and spatial chunk reads every date: no concatenation, no rechunking
    ds = read_items(
        items,
        cfg,
        bands=fine,
        geobox=geobox,
        groupby="solar_day",
        part=cfg.chunk,
        chunks={"time": -1, "x": rc, "y": rc},
        resampling={"*": "bilinear", **{b: "nearest" for b in fine if b in CLASS_BANDS}},
    )
    # everything else happens in tasks of one spatial chunk (_cube_block): the clear mask from
    # the bands' nodata, SCL classes, an optional precomputed cloud mask (time, y, x) and the
    # region mask (y, x); the composite; the clear count
    nodata = [ds[b].attrs.get("nodata") for b in cfg.bands]
    args = [(ds[b].data, "tyx") for b in cfg.bands]
    scl_classes = None
    cloud = None
    if use_scl:
        if cfg.scl_dilation_m > 0:  # needs neighbouring chunks: a mask of its own (map_overlap)
            cloud = dilate(ds[scl].isin(cfg.scl_mask_classes), cfg.scl_dilation_m / cfg.resolution).data
        else:
            scl_classes = np.asarray(cfg.scl_mask_classes)
            args.append((ds[scl].data, "tyx"))
    if use_s2c:
        s2c = s2cloudless_mask(items, cfg, geobox, chunk=rc)
        if not np.array_equal(s2c.time.values, ds.time.values):  # same items, same grouping
            raise CorruptInput(f"s2cloudless dates {s2c.time.values} differ from the cube's {ds.time.values}")
        cloud = s2c.data if cloud is None else cloud | s2c.data
    if cloud is not None:
        args.append((cloud, "tyx"))
    if not region.is_box:
        args.append((region_mask(region, geobox, rc).data, "yx"))
    factors = np.array([scale_offset(items[0], b) for b in cfg.bands], dtype="float32")
    n_bands = len(cfg.bands)
    # two tasks per chunk on the same reads, with no slicing task between: the composite, and
    # the clear count (which recomputes the clear mask, about 1 ms a 512 px chunk)
    inputs = [x for a in args for x in a]
    # concatenate=False: each input's single time chunk comes as a list of one block, not as
    # dask's copy of it (concatenate3 copies even one block: 5 % of a cube's CPU)
    common = {
        "concatenate": False,
        "n_bands": n_bands,
        "nodata": nodata,
        "scl_classes": scl_classes,
        "cloud": cloud is not None,
        "region": not region.is_box,
    }
    # packed storage: int16 half digital numbers (CF scale_factor), when every band scales alike
    packed = cfg.storage == "int16" and bool(np.all(factors[:, 0] == factors[0, 0]))
    step = np.float32(0.5) * factors[0, 0]  # half a DN, in reflectance
    encoded = encoded and packed
    # the tasks' names say the stage on the dashboard's task stream and progress bars
    refl = dsa.blockwise(
        _cube_block,
        "byx",
        *inputs,
        new_axes={"b": n_bands},
        token="cube-composite",
        meta=np.empty((0, 0, 0), dtype="int16" if encoded else "float32"),
        **common,
        part="packed" if encoded else "reflectance",
        scale=factors[:, 0],
        offset=factors[:, 1],
        method=cfg.composite,
        limit=float(step * PACK_LIMIT) if packed and not encoded else None,
        step=float(step) if encoded else None,
    )
    n_clear = dsa.blockwise(
        _cube_block,
        "yx",
        *inputs,
        meta=np.empty((0, 0), dtype="uint16"),
        **common,
        token="cube-clear-count",
        part="clear_count",
    )
    coords = {"y": ds.y, "x": ds.x, **{k: v for k, v in ds.coords.items() if k == "spatial_ref"}}
    comp = xr.DataArray(
        refl, dims=("band", "y", "x"), coords={"band": np.array(cfg.bands, dtype=object), **coords}
    )
    # the count keeps the attributes the first masked band had, but not its nodata: 0 clear
    # observations is a valid count (no _FillValue; Zarr fill_value 65535, see write_georef)
    first = next((b for b, nd in zip(cfg.bands, nodata) if nd is not None), cfg.bands[0])
    attrs = {k: v for k, v in ds[first].attrs.items() if k not in ("nodata", "_FillValue")}
    count = xr.DataArray(n_clear, dims=("y", "x"), coords=coords, attrs=attrs)
    out = xr.Dataset({"reflectance": comp, "clear_count": count})
    out["reflectance"].encoding["chunks"] = (n_bands, cfg.chunk, cfg.chunk)
    out["clear_count"].encoding["chunks"] = (cfg.chunk, cfg.chunk)
    for var in out.data_vars.values():  # written once, read by every later stage: fast codec
        var.encoding["compressors"] = fast_compressors()
    out["reflectance"].attrs.update(units="1", long_name="composite reflectance", composite=cfg.composite)
    out["band"].attrs.update(long_name="Sentinel-2 band")
    level = processing_level(items)  # CF: TOA (L1C) or surface (L2A) reflectance
    if level in REFLECTANCE_STANDARD_NAMES:
        out["reflectance"].attrs.update(
            standard_name=REFLECTANCE_STANDARD_NAMES[level], processing_level=level
        )
    if cfg.composite in ("median", "mean"):  # CF cell methods: over the time of the composite
        out["reflectance"].attrs["cell_methods"] = f"time: {cfg.composite}"
    if encoded:  # already packed: written as it is, decoded by readers
        out["reflectance"].attrs.update(scale_factor=step, _FillValue=np.int16(PACK_FILL))
        out["reflectance"].encoding.update(dtype="int16")
    elif packed:  # decoded by xarray, GDAL and CF readers: value = stored * scale_factor
        out["reflectance"].encoding.update(dtype="int16", scale_factor=step, _FillValue=np.int16(PACK_FILL))
    out["clear_count"].attrs.update(
        units="count",
        long_name="clear observations per pixel",
        cloud_mask="scl" if use_scl else "s2cloudless" if use_s2c else "none",
        comment="0 = no clear observation (a valid count, not nodata)",
    )
    out["clear_count"].encoding.update(_FillValue=None, fill_value=np.iinfo("uint16").max)
    if use_s2c:
        out["clear_count"].attrs.update(
            s2cloudless_threshold=cfg.s2cloudless_threshold,
            s2cloudless_average_over=cfg.s2cloudless_average_over,
            s2cloudless_dilation_size=cfg.s2cloudless_dilation_size,
            s2cloudless_resolution_m=cfg.s2cloudless_resolution,
        )
    out.attrs.update(
        items=[i.id for i in items], resolution_m=cfg.resolution, dates=[str(t)[:10] for t in ds.time.values]
    )
    out = out.assign_coords(composite_time(items))
    assert geobox.crs is not None  # cube_geobox always sets the zone's CRS
    return write_georef(out, geobox.crs.epsg or str(geobox.crs))
