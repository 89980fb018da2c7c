"""Cube: load STAC items lazily with odc-stac, mask clouds, composite, read/write Zarr.

The cube is an ``xarray.Dataset`` in the items' native UTM CRS with

- ``reflectance`` (band, y, x) float32, surface/TOA reflectance (unitless, 0..1), NaN where
  no clear observation exists; chunks (n_bands, chunk, chunk) aligned to the patch grid;
- ``clear_count`` (y, x) uint16, number of clear observations per pixel;

and a ``spatial_ref`` coordinate carrying the CRS and GeoTransform (CF grid mapping).

Clouds are masked with the items' SCL band (L2A) or, for L1C items, with the s2cloudless
model run on a coarse grid (:func:`s2cloudless_mask`); see :class:`~.config.CubeConfig`.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask.array as dsa
import numpy as np
import odc.stac
import pystac
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry, unary_union
from odc.loader import RioDriver

try:  # the parser odc.stac.load uses by default (private: without it, failed reads are unnamed)
    from odc.stac._mdtools import StacMDParser as _StacMDParser
except ImportError:  # pragma: no cover
    _StacMDParser = None

from .config import CubeConfig
from .errors import AgrilandWarning, BandMismatch, ConfigError, CorruptInput, EmptyRegion, NoItemsFound
from .items import (
    ALIASES,
    CLASS_BANDS,
    asset_epsg,
    canonical_band,
    group_by_zone,
    normalize_items,
    scale_offset,
)
from .region import Region

__all__ = ["S2CLOUDLESS_BANDS", "check_assets", "chunk_valid_fraction", "composite_block", "cube_geobox", "dilate",
           "load_bands", "load_cube", "load_zone_cubes", "open_cube", "region_mask", "s2cloudless_mask",
           "s2cloudless_reflectance", "write_georef"]

log = logging.getLogger(__name__)

# the bands the s2cloudless model reads, in its order (Sentinel-2 band ids)
S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")


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


# the file's grid and the item's proj:transform may place a corner of the asset this fraction of
# a pixel apart (1 cm at 10 m): float rounding passes, a shifted or rescaled grid does not
GRID_TOLERANCE_PX = 1e-3


def check_assets(items: Sequence[pystac.Item], bands: Sequence[str], on_bad_asset: str = "fail", *,
                 full: bool = False) -> tuple[list[pystac.Item], list[dict]]:
    """Open every asset of ``bands``, compare its grid with the item's ``proj:*`` fields and
    decode two of its full-resolution blocks.

    Per asset, in threads (8 at a time):

    - **georeferencing**: the file's CRS (EPSG code), size (height, width) and transform must
      match what the item declares, when it does: the asset's (else the item's)
      ``proj:epsg``/``proj:code``, ``proj:shape`` and ``proj:transform`` (corners within
      :data:`GRID_TOLERANCE_PX` of a pixel). odc-stac places pixels with the item's fields
      and never reads the file's, so a wrong field silently shifts, crops or blanks the data;
    - **integrity**: the full-resolution block whose data comes first in the file and the one
      whose data ends last (from the TIFF tile index, which the header holds; first and last
      block of the grid for other formats). A file cut short anywhere fails the second read;
      damage at the start of the full-resolution data fails the first. Damage inside another
      block is found only when that block is read: then the cube's reader raises
      :class:`CorruptInput` naming the item, asset and href (or, with ``on_bad_asset="skip"``,
      leaves those pixels out with a warning). ``full=True`` decodes every full-resolution
      block instead, so that nothing corrupt reaches the cube.

    Cost: one header read (the tile index included) and two block reads an asset, whatever
    its size (over HTTP, one request for the header and one a block): measured on local disk,
    7 ms an asset for the four 1024 x 1024 COGs of the embedded Virginia window (27 ms in
    all one after the other, 70-120 ms through the thread pool on 2 busy cores, where
    starting GDAL in each thread dominates), 12 ms for a full 10980 x 10980 Sentinel-2 band
    (512 px tiles). ``full=True`` reads and decodes the whole file: 80 ms for the four
    Virginia COGs one after the other, 1.9 s for one full Sentinel-2 band (192 MB), i.e. as
    much I/O and decoding again as a cube over the whole tiles.

    ``on_bad_asset="fail"`` raises :class:`CorruptInput` naming the item, asset and href, what
    is wrong and what to do; ``"skip"`` drops the item with an :class:`AgrilandWarning` and
    reports it in the returned list of skipped assets (dicts with ``item``, ``asset``,
    ``href``, ``problem`` (``"unreadable"`` or ``"georeferencing"``) and ``error``).
    """
    jobs = [(i, b) for i in items for b in bands]
    with ThreadPoolExecutor(8) as pool:
        bad = [r for r in pool.map(lambda job: _probe_asset(*job, full=full), jobs) if r]
    if bad and on_bad_asset == "fail":
        b = bad[0]
        raise CorruptInput(
            f"item {b['item']}: {_asset_problem(b)}; {len(bad)} bad asset(s) in all. "
            f"{_BAD_ASSET_FIX[b['problem']]}")
    dropped = {b["item"] for b in bad}
    for b in bad:
        warnings.warn(f"skipping item {b['item']}: {_asset_problem(b)}", AgrilandWarning, stacklevel=2)
    return [i for i in items if i.id not in dropped], bad


_BAD_ASSET_FIX = {
    "unreadable": "Download the file again or fix the asset's href, or set cube.on_bad_asset: skip to "
                  "leave such items out",
    "georeferencing": "Fix the item's proj:* fields (proj:epsg / proj:code, proj:shape, proj:transform) "
                      "to match the file, or set cube.on_bad_asset: skip to leave such items out",
}


def _asset_problem(b: dict) -> str:
    what = "cannot be read" if b["problem"] == "unreadable" else "does not match the item's georeferencing"
    return f"asset '{b['asset']}' ({b['href']}) {what}: {b['error']}"


def _read_error_text(e: BaseException) -> str:
    """A rasterio read error with GDAL's own reason (rasterio's message often only says
    'Read failed. See previous exception for details.')."""
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and "previous exception" in str(e):
        return f"{type(e).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"


def _probe_asset(item: pystac.Item, band: str, *, full: bool = False) -> dict | None:
    """One asset of :func:`check_assets`: ``None`` when it is sound, else a bad-asset record."""
    href = item.assets[band].get_absolute_href() or item.assets[band].href
    record = {"item": item.id, "asset": band, "href": href}
    try:
        with rasterio.open(href) as ds:
            mismatch = _grid_mismatch(item, band, ds)
            if mismatch:
                return record | {"problem": "georeferencing", "error": mismatch}
            for window in (ds.block_windows(1) if full else _end_blocks(ds)):
                if isinstance(window, tuple):
                    window = window[1]
                ds.read(1, window=window)
    except Exception as e:  # noqa: BLE001 - every reader failure is reported the same way
        return record | {"problem": "unreadable", "error": _read_error_text(e)}
    return None


def _end_blocks(ds) -> list:
    """Windows of the full-resolution blocks whose data start first and end last in the file
    (from the TIFF tile index; the grid's first and last block when the driver has none)."""
    from rasterio.windows import Window

    bh, bw = ds.block_shapes[0]
    ny, nx = -(-ds.height // bh), -(-ds.width // bw)
    first, last = (0, 0), (ny - 1, nx - 1)
    if ds.driver == "GTiff":
        spans = []
        for r in range(ny):
            for c in range(nx):
                off = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1)
                size = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1)
                if off and size and int(size) > 0:  # 0: a sparse (empty) block
                    spans.append((int(off), int(off) + int(size), r, c))
        if spans:
            first = min(spans)[2:]
            last = max(spans, key=lambda s: s[1])[2:]
    return [Window(c * bw, r * bh, min(bw, ds.width - c * bw), min(bh, ds.height - r * bh))
            for r, c in dict.fromkeys([first, last])]


def _grid_mismatch(item: pystac.Item, band: str, ds) -> str | None:
    """What differs between the grid ``item`` declares for ``band`` and the file's ``ds``
    (CRS, size, transform), or ``None``; fields the item lacks are not compared."""
    from affine import Affine

    fields = {**{k: v for k, v in item.properties.items() if k.startswith("proj:")},
              **item.assets[band].extra_fields}
    problems = []
    want = asset_epsg(item, band)
    got = ds.crs.to_epsg() if ds.crs is not None else None
    same = got == want or (ds.crs is not None and want is not None and ds.crs == rasterio.CRS.from_epsg(want))
    if want is not None and not same:
        found = f"EPSG:{got}" if got else ("no CRS" if ds.crs is None else f"'{ds.crs.to_string()[:80]}'")
        problems.append(f"the item says EPSG:{want} (proj:epsg / proj:code), the file's CRS is {found}")
    shape = fields.get("proj:shape")
    if shape is not None and [int(v) for v in list(shape)[-2:]] != [ds.height, ds.width]:
        problems.append(f"the item says proj:shape {list(shape)}, the file is {[ds.height, ds.width]} "
                        "pixels (height, width)")
    tr = fields.get("proj:transform")
    if tr is not None and len(tr) >= 6:
        declared, actual = Affine(*[float(v) for v in tr[:6]]), ds.transform
        pixel = max(abs(actual.a), abs(actual.e), abs(actual.b), abs(actual.d)) or 1.0
        corners = [(0, 0), (ds.width, 0), (0, ds.height), (ds.width, ds.height)]
        off = max(float(np.hypot(*np.subtract(declared @ c, actual @ c))) for c in corners)
        if not off <= GRID_TOLERANCE_PX * pixel:
            unit = "m" if ds.crs is not None and ds.crs.is_projected else "CRS units"
            problems.append(f"the item says proj:transform {[float(v) for v in tr[:6]]}, the file's is "
                            f"{list(actual)[:6]}: corners {off:.6g} {unit} ({off / pixel:.4g} pixels) "
                            "apart")
    return "; ".join(problems) or None


# -- named reads in the cube's tasks -----------------------------------------------------------
_READ_ERRORS = (rasterio.errors.RasterioError, rasterio.errors.WindowEvaluationError)


class _AssetNames(_StacMDParser or object):  # type: ignore[misc]
    """odc-stac's metadata parser, tagging each raster source with its item id and asset key
    (``RasterSource.driver_data``), so that a failed read names them."""

    def driver_data(self, md, band_key):
        data = super().driver_data(md, band_key)
        if data is None and band_key[0] != "_stac_metadata":
            return {"item": md.id, "asset": band_key[0]}
        return data


class _NamedReader:
    """A rasterio reader whose failures name the item, asset and href (see :func:`_load`)."""

    def __init__(self, inner, src, skip: bool) -> None:
        self._inner, self._src, self._skip = inner, src, skip

    def read(self, cfg, dst_geobox, *, dst=None, selection=None):
        try:
            return self._inner.read(cfg, dst_geobox, dst=dst, selection=selection)
        except _READ_ERRORS as e:
            reason = _read_error_text(e)
        # raised outside the except block: rasterio's error chain (GDAL's CPLE errors) does not
        # unpickle, and a Dask worker would then send a bare Exception instead of CorruptInput
        names = self._src.driver_data if isinstance(self._src.driver_data, dict) else {}
        what = (f"item {names.get('item', '?')}: asset '{names.get('asset', '?')}' ({self._src.uri}) "
                f"cannot be read ({reason})")
        if not self._skip:
            raise CorruptInput(
                f"{what} while loading the cube: the file is corrupt or cut short where the check before "
                "the cube did not read. Download the file again or fix the asset's href, or set "
                "cube.on_bad_asset: skip to leave its unreadable parts out")
        warnings.warn(f"{what}: cube.on_bad_asset is 'skip', so these pixels of the item are left out "
                      "(nodata)", AgrilandWarning, stacklevel=2)
        out = dst[0:0, 0:0] if dst is not None else np.ndarray((0, 0), dtype=cfg.dtype)
        return np.s_[0:0, 0:0], out


class _NamedRioDriver(RioDriver):
    """odc-stac's rasterio driver with :class:`_NamedReader` readers: a read error in a Dask
    task becomes :class:`CorruptInput` naming the item, asset and href, or (``skip``) a
    warning and nodata for that read."""

    def __init__(self, on_bad_asset: str = "fail") -> None:
        super().__init__(md_parser=_AssetNames({}))
        self.skip = on_bad_asset == "skip"

    def open(self, src, ctx):
        return _NamedReader(super().open(src, ctx), src, self.skip)


def _load(items: Sequence[pystac.Item], cfg: CubeConfig, **kw) -> xr.Dataset:
    """``odc.stac.load`` with reads that name the failing item, asset and href."""
    driver = _NamedRioDriver(cfg.on_bad_asset) if _StacMDParser is not None else None
    return odc.stac.load(list(items), fail_on_error=True, driver=driver, **kw)


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
                "it), 's2cloudless' (L1C items) or 'none'")
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
                    "search an L1C collection, or set cube.cloud_mask: auto to mask L2A items with SCL")
    return list(cfg.bands) + [b for b in extra if b not in cfg.bands]


def load_cube(items: Sequence[pystac.Item], cfg: CubeConfig, region: Region | Sequence[float], *,
              normalized: bool = False) -> xr.Dataset:
    """Lazily load, cloud-mask and composite the items of ONE UTM zone (see module doc).

    Nothing is read until the result is computed or written. ``cfg.cloud_mask``: ``auto``
    masks with SCL when every item carries the SCL asset (L2A) and composites L1C items
    unmasked; ``scl`` requires SCL; ``s2cloudless`` masks with the s2cloudless model (L1C,
    see :func:`s2cloudless_mask`); ``none`` masks nodata only. Pixels outside a polygon
    region are nodata.
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
    # one task per band and spatial chunk reads every date: no concatenation, no rechunking
    ds = _load(
        items, cfg, bands=fine, geobox=geobox, groupby="solar_day",
        chunks={"time": -1, "x": cfg.chunk, "y": cfg.chunk},
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
        s2c = s2cloudless_mask(items, cfg, geobox)
        if not np.array_equal(s2c.time.values, ds.time.values):  # same items, same grouping
            raise CorruptInput(f"s2cloudless dates {s2c.time.values} differ from the cube's "
                               f"{ds.time.values}")
        cloud = s2c.data if cloud is None else cloud | s2c.data
    if cloud is not None:
        args.append((cloud, "tyx"))
    if not region.is_box:
        args.append((region_mask(region, geobox, cfg.chunk).data, "yx"))
    factors = np.array([scale_offset(items[0], b) for b in cfg.bands], dtype="float32")
    n_bands = len(cfg.bands)
    # two tasks per chunk on the same reads, with no slicing task between: the composite, and
    # the clear count (which recomputes the clear mask, about 1 ms a 512 px chunk)
    inputs = [x for a in args for x in a]
    common = {"concatenate": True, "n_bands": n_bands, "nodata": nodata, "scl_classes": scl_classes,
              "cloud": cloud is not None, "region": not region.is_box}
    refl = dsa.blockwise(_cube_block, "byx", *inputs, new_axes={"b": n_bands},
                         meta=np.empty((0, 0, 0), dtype="float32"), **common, part="reflectance",
                         scale=factors[:, 0], offset=factors[:, 1], method=cfg.composite)
    n_clear = dsa.blockwise(_cube_block, "yx", *inputs, meta=np.empty((0, 0), dtype="uint16"), **common,
                            part="clear_count")
    coords = {"y": ds.y, "x": ds.x, **{k: v for k, v in ds.coords.items() if k == "spatial_ref"}}
    comp = xr.DataArray(refl, dims=("band", "y", "x"),
                        coords={"band": np.array(cfg.bands, dtype=object), **coords})
    # the count keeps the attributes the first masked band had, but not its nodata: 0 clear
    # observations is a valid count (no _FillValue; Zarr fill_value 65535, see write_georef)
    first = next((b for b, nd in zip(cfg.bands, nodata) if nd is not None), cfg.bands[0])
    attrs = {k: v for k, v in ds[first].attrs.items() if k not in ("nodata", "_FillValue")}
    count = xr.DataArray(n_clear, dims=("y", "x"), coords=coords, attrs=attrs)
    out = xr.Dataset({"reflectance": comp, "clear_count": count})
    out["reflectance"].attrs.update(units="1", long_name="composite reflectance",
                                    composite=cfg.composite)
    out["clear_count"].attrs.update(units="count", long_name="clear observations per pixel",
                                    cloud_mask="scl" if use_scl else "s2cloudless" if use_s2c else "none",
                                    comment="0 = no clear observation (a valid count, not nodata)")
    out["clear_count"].encoding.update(_FillValue=None, fill_value=np.iinfo("uint16").max)
    if use_s2c:
        out["clear_count"].attrs.update(
            s2cloudless_threshold=cfg.s2cloudless_threshold, s2cloudless_average_over=cfg.s2cloudless_average_over,
            s2cloudless_dilation_size=cfg.s2cloudless_dilation_size,
            s2cloudless_resolution_m=cfg.s2cloudless_resolution)
    out.attrs.update(items=[i.id for i in items], resolution_m=cfg.resolution,
                     dates=[str(t)[:10] for t in ds.time.values])
    return write_georef(out, geobox.crs.epsg or str(geobox.crs))


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
                    f"({e}): install it with  pip install 'agriland-scale[s2cloudless]'") from None
            det = S2PixelCloudDetector(threshold=threshold, all_bands=False, average_over=average_over,
                                       dilation_size=dilation_size)
            _ = det.classifier  # load the model now, under the lock
            _DETECTORS[key] = det
        return _DETECTORS[key]


_DETECTORS: dict = {}
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
    return block.repeat(k, axis=1).repeat(k, axis=2)[:, :shape[1], :shape[2]]


def s2cloudless_reflectance(items: Sequence[pystac.Item], cfg: CubeConfig, geobox: GeoBox) -> xr.DataArray:
    """Lazy TOA reflectance of the s2cloudless bands on ``geobox`` zoomed out to
    ``cfg.s2cloudless_resolution``.

    Returns ``(time, y, x, band)`` float32 (unitless, ``dn * scale + offset`` from
    :func:`~agriland_scale.items.scale_offset`, so harmonised across processing baselines),
    bands in :data:`S2CLOUDLESS_BANDS` order, averaged from their native 10/20/60 m pixels,
    in chunks of ``(time, c, c, 10)`` with ``c = chunk * resolution / s2cloudless_resolution``:
    one coarse chunk covers exactly one chunk of the cube. ``items`` must be normalised.
    """
    k = round(cfg.s2cloudless_resolution / cfg.resolution)
    coarse = geobox.zoom_out(k)
    c = cfg.chunk // k
    bands = [canonical_band(b) for b in S2CLOUDLESS_BANDS]
    ds = _load(items, cfg, bands=bands, geobox=coarse, groupby="solar_day",
               chunks={"time": -1, "x": c, "y": c}, resampling="average")
    refl = []
    for b in bands:
        scale, offset = scale_offset(items[0], b)
        refl.append(ds[b].data.astype("float32") * np.float32(scale) + np.float32(offset))
    data = dsa.stack(refl, axis=-1).rechunk({3: -1})
    return xr.DataArray(data, dims=("time", "y", "x", "band"),
                        coords={"time": ds.time, "y": ds.y, "x": ds.x, "band": list(S2CLOUDLESS_BANDS)})


def s2cloudless_mask(items: Sequence[pystac.Item], cfg: CubeConfig, geobox: GeoBox) -> xr.DataArray:
    """Lazy s2cloudless cloud mask ``(time, y, x)`` bool (True = cloud) on ``geobox``.

    The model runs on :func:`s2cloudless_reflectance` chunk by chunk with a halo of
    ``average_over + dilation_size`` coarse pixels (dask ``map_overlap``; no padding at the
    image edges, where s2cloudless reflects as on a whole image), so the chunked mask equals
    the whole-image one. Each coarse pixel is then repeated onto the ``k x k`` cube pixels it
    covers and the grid cropped to ``geobox``; chunks are ``(time, chunk, chunk)``. Raises
    :class:`~agriland_scale.errors.ConfigError` when s2cloudless is not installed.
    """
    params = {"threshold": cfg.s2cloudless_threshold, "average_over": cfg.s2cloudless_average_over,
              "dilation_size": cfg.s2cloudless_dilation_size}
    _s2cloudless_detector(**params)  # fails now, not in a task, when s2cloudless is missing
    refl = s2cloudless_reflectance(items, cfg, geobox)
    halo = cfg.s2cloudless_average_over + cfg.s2cloudless_dilation_size
    coarse = refl.data.map_overlap(_detect_clouds, depth={0: 0, 1: halo, 2: halo, 3: 0}, boundary="none",
                                   drop_axis=3, dtype=bool, **params)
    coarse = coarse.rechunk(refl.chunks[:3])  # map_overlap merges edge chunks smaller than the halo
    k = round(cfg.s2cloudless_resolution / cfg.resolution)
    h, w = geobox.shape
    chunks = (coarse.chunks[0], dsa.core.normalize_chunks(cfg.chunk, (h,))[0],
              dsa.core.normalize_chunks(cfg.chunk, (w,))[0])
    fine = coarse.map_blocks(_repeat_block, k, chunks=chunks, dtype=bool)
    coords = geobox.coordinates
    return xr.DataArray(fine, dims=("time", "y", "x"), name="cloud",
                        coords={"time": refl.time, "y": coords["y"].values, "x": coords["x"].values})


def _sort_small(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Sort along axis 0 with an odd-even transposition network of whole-plane min/max; returns
    the sorted planes.

    For the few dates of a season this is many times faster than ``np.sort`` along a short
    last axis (which pays a per-pixel call); it costs T^2 / 2 plane operations, so beyond 24
    planes ``np.sort`` is used instead.
    """
    planes = list(x)
    n = len(planes)
    if n > 24:
        return list(np.sort(np.asarray(planes), axis=0))
    for r in range(n):
        for i in range(r % 2, n - 1, 2):
            a, b = planes[i], planes[i + 1]
            planes[i], planes[i + 1] = np.minimum(a, b), np.maximum(a, b)
    return planes


def _middle_pair(x: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The two middle values ``((T - 1) // 2, T // 2)`` along axis 0 of ``T`` planes, each a
    ``(y, x)`` plane (the same one twice for odd ``T``), with the fewest whole-plane min/max:
    none for T <= 2, a median-of-three for 3, six for 4; a full sorting network beyond."""
    p = list(x)
    T = len(p)
    if T <= 2:
        return p[0], p[-1]
    if T == 3:
        m = np.maximum(np.minimum(p[0], p[1]), np.minimum(np.maximum(p[0], p[1]), p[2]))
        return m, m
    if T == 4:
        lo1, hi1 = np.minimum(p[0], p[1]), np.maximum(p[0], p[1])
        lo2, hi2 = np.minimum(p[2], p[3]), np.maximum(p[2], p[3])
        return np.maximum(lo1, lo2), np.minimum(hi1, hi2)
    s = _sort_small(p)
    return s[(T - 1) // 2], s[T // 2]


def _picker(idx: np.ndarray, T: int):
    """A function returning ``planes[idx[y, x]][y, x]`` (``idx`` in 0..T-1), built once per block
    and applied to every band, instead of fancy indexing: the plane itself where ``idx`` is
    constant (e.g. every date clear), else one blend per other index value present, made of
    whole-plane bitwise operations for integers (a masked copy costs a branch per pixel)."""
    if T > 24:
        return lambda planes: np.take_along_axis(np.asarray(planes), idx[None], 0)[0]
    i0, i1 = int(idx.min()), int(idx.max())
    if i0 == i1:
        return lambda planes: planes[i0]  # a view: callers only read it
    masks = [(i, idx == i) for i in range(i0 + 1, i1 + 1)]
    ones: dict = {}  # integer dtype -> [(i, all bits set where idx == i)]

    def pick(planes) -> np.ndarray:
        res = planes[i0].copy()
        dt = res.dtype
        if not np.issubdtype(dt, np.integer):
            for i, m in masks:
                np.copyto(res, planes[i], where=m)
            return res
        if dt not in ones:
            ones[dt] = [(i, np.negative(m.astype(dt))) for i, m in masks]
        for i, m in ones[dt]:  # res = m ? planes[i] : res
            res ^= (res ^ planes[i]) & m
        return res

    return pick


def composite_block(dn: np.ndarray | Sequence[np.ndarray], clear: np.ndarray, *, scale: np.ndarray,
                    offset: np.ndarray, method: str, out: np.ndarray | None = None) -> np.ndarray:
    """Composite of one block: ``dn (band, time, y, x)`` digital numbers (an array, or one
    ``(time, y, x)`` array a band) and ``clear (time, y, x)`` -> reflectance ``(band, y, x)``
    float32 (``dn * scale + offset``), NaN where no observation is clear; written into ``out``
    when given.

    ``method``: ``median`` (of the clear observations; the mean of the two middle ones for an
    even count), ``mean``, ``first`` or ``last`` (in time order). The median is taken on the
    digital numbers (scaling is linear and increasing, so it commutes) with a sorting network
    of whole-plane min/max: every operation runs on contiguous (y, x) planes.
    """
    n = _clear_count(clear)  # (y, x)
    if out is None:
        out = np.empty((len(dn),) + clear.shape[1:], dtype="float32")
    _composite(dn, clear, n, out, scale=scale, offset=offset, method=method)
    return out


def _clear_count(clear: np.ndarray) -> np.ndarray:
    """Clear observations per pixel of a ``(time, y, x)`` mask, ``(y, x)``: summed in int16
    (signed, so that ``n - 1`` stays -1 for no observation), ten times faster than int64."""
    return np.add.reduce(clear, axis=0, dtype="int16" if clear.shape[0] < 2**15 else "int64")


def _composite(dn: np.ndarray | Sequence[np.ndarray], clear: np.ndarray, n: np.ndarray, out: np.ndarray, *,
               scale: np.ndarray, offset: np.ndarray, method: str) -> None:
    """:func:`composite_block` into ``out``, given ``n = _clear_count(clear)``. Every step keeps the
    float32 arithmetic of the plain expressions (in place where it saves a copy)."""
    T = clear.shape[0]
    all_clear = bool(n.min() == T)  # the common case: no masking to apply
    if method == "median" and not all_clear:  # every date clear: the middle pair is the same everywhere
        pick_lo, pick_hi = _picker(np.clip((n - 1) // 2, 0, None), T), _picker(np.clip(n // 2, 0, None), T)
    elif method == "first":
        pick = _picker(np.argmax(clear, axis=0), T)
    elif method == "last":
        pick = _picker(T - 1 - np.argmax(clear[::-1], axis=0), T)
    masked_max: dict = {}  # unsigned dtype -> its max where not clear, 0 elsewhere (and the converse)
    for b in range(len(dn)):
        fill = np.iinfo(dn[b].dtype).max if np.issubdtype(dn[b].dtype, np.integer) else np.inf
        with np.errstate(invalid="ignore", divide="ignore"):
            if method == "median":
                if all_clear:
                    lo, hi = _middle_pair(dn[b])
                else:
                    # clear values sort first: the others are set to the dtype's max (np.where
                    # costs a branch per pixel; for unsigned integers an OR with all ones does it)
                    if np.issubdtype(dn[b].dtype, np.unsignedinteger):
                        if dn[b].dtype not in masked_max:
                            masked_max[dn[b].dtype] = np.negative((~clear).astype(dn[b].dtype))
                        x = np.bitwise_or(dn[b], masked_max[dn[b].dtype])
                    else:
                        x = np.where(clear, dn[b], fill)
                    s = _sort_small(x)
                    lo, hi = pick_lo(s), pick_hi(s)
                # (lo + hi) * (scale / 2): one rounding, as (lo + hi) / 2 * scale (halving is exact)
                v = np.add(lo, hi, dtype="float32")
                np.multiply(v, np.float32(0.5) * scale[b], out=out[b], dtype="float32", casting="unsafe")
                if offset[b]:
                    out[b] += offset[b]
                continue
            elif method == "mean":
                if dn[b].dtype.kind == "u" and dn[b].dtype.itemsize <= 2:  # exact integer sums
                    if ("and", dn[b].dtype) not in masked_max:
                        masked_max["and", dn[b].dtype] = np.negative(clear.astype(dn[b].dtype))
                    x = dn[b] if all_clear else np.bitwise_and(dn[b], masked_max["and", dn[b].dtype])
                    v = x.sum(0, dtype="uint32") / n
                else:
                    v = np.where(clear, dn[b], 0).sum(0, dtype="float64") / n
            else:
                v = pick(dn[b])
            np.multiply(v, scale[b], out=out[b], dtype="float32", casting="unsafe")
            out[b] += offset[b]
    if not n.min():
        out[:, n == 0] = np.nan


def _cube_block(*arrays: np.ndarray, n_bands: int, nodata: Sequence[float | None],
                scl_classes: np.ndarray | None, cloud: bool, region: bool, part: str,
                **composite) -> np.ndarray:
    """One spatial chunk of the cube: ``n_bands`` arrays ``(time, y, x)`` of digital numbers,
    then the SCL band (if ``scl_classes``), a cloud mask ``(time, y, x)`` (if ``cloud``) and a
    region mask ``(y, x)`` (if ``region``) -> with ``part="reflectance"`` the composite
    ``(n_bands, y, x)`` float32, with ``part="clear_count"`` the number of clear observations
    ``(y, x)`` uint16."""
    bands, rest = arrays[:n_bands], list(arrays[n_bands:])
    clear = None
    for b, nd in zip(bands, nodata):
        if nd is not None:
            clear = b != nd if clear is None else np.logical_and(clear, b != nd, out=clear)
    if clear is None:
        clear = np.ones(bands[0].shape, dtype=bool)
    if scl_classes is not None:
        clear &= ~np.isin(rest.pop(0), scl_classes)
    if cloud:
        clear &= ~rest.pop(0)
    if region:
        clear &= rest.pop(0)
    n = _clear_count(clear)
    if part == "clear_count":
        return n.astype("uint16")
    out = np.empty((n_bands,) + bands[0].shape[1:], dtype="float32")
    _composite(bands, clear, n, out, **composite)
    return out


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


def _xy_attrs(crs) -> tuple[dict, dict]:
    """CF attributes of the x and y coordinates for ``crs`` (a pyproj/rasterio CRS)."""
    from pyproj import CRS

    c = CRS.from_user_input(crs)
    if c.is_geographic:
        return ({"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east",
                 "axis": "X"},
                {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north",
                 "axis": "Y"})
    unit = c.axis_info[0].unit_name if c.axis_info else "metre"
    unit = {"metre": "m", "meter": "m", "foot": "ft", "US survey foot": "US_survey_foot"}.get(unit, unit)
    return ({"standard_name": "projection_x_coordinate", "long_name": "x coordinate of projection",
             "units": unit, "axis": "X"},
            {"standard_name": "projection_y_coordinate", "long_name": "y coordinate of projection",
             "units": unit, "axis": "Y"})


def _declared_fill(var: xr.DataArray):
    """The CF ``_FillValue`` a variable will be written with (encoding first), or None."""
    for where in (var.encoding, var.attrs):
        if "_FillValue" in where:
            return where["_FillValue"]
    return None


def write_georef(ds: xr.Dataset, crs: int | str) -> xr.Dataset:
    """Attach CRS and GeoTransform as a ``spatial_ref`` coordinate (CF grid mapping), the
    CF attributes of x/y, and nodata that agrees between CF and Zarr.

    - every variable on (y, x) carries ``grid_mapping: spatial_ref`` (GDAL, CF readers) and
      lists ``spatial_ref`` in its ``coordinates``, so that a plain ``xr.open_zarr`` (without
      ``decode_coords="all"``) keeps ``spatial_ref`` a coordinate and rioxarray finds the CRS;
    - x/y get ``standard_name``, ``long_name``, ``units`` (as the CRS says: ``m`` for a
      projected CRS in metres) and ``axis``, and no ``_FillValue``;
    - a variable declaring a CF ``_FillValue`` is written with that value as its Zarr
      ``fill_value`` too; an integer variable declaring none gets its dtype's maximum as Zarr
      ``fill_value`` (a reader that takes the Zarr fill value as nodata, as GDAL does, then
      hides no valid value, e.g. a ``clear_count`` of 0), unless a ``fill_value`` is set.
    """
    ds = ds.rio.write_crs(crs)
    ds = ds.rio.write_transform(ds.rio.transform(recalc=True))
    gm = ds.rio.grid_mapping
    xd, yd = ds.rio.x_dim, ds.rio.y_dim
    x_attrs, y_attrs = _xy_attrs(ds.rio.crs)
    for dim, attrs in ((xd, x_attrs), (yd, y_attrs)):
        keep = {k: v for k, v in ds[dim].attrs.items() if k not in ("_FillValue", "units")}
        ds[dim].attrs = keep | attrs
        ds[dim].encoding["_FillValue"] = None
    non_dim = [str(c) for c in ds.coords if c not in ds.dims]
    for name in ds.data_vars:
        var = ds[name]
        var.attrs.pop("grid_mapping", None)
        if {xd, yd} <= set(var.dims):
            var.encoding["grid_mapping"] = gm
            var.attrs.pop("coordinates", None)
            var.encoding["coordinates"] = " ".join(
                sorted(c for c in non_dim if set(ds[c].dims) <= set(var.dims)))
        else:
            var.encoding.pop("grid_mapping", None)
        fill = _declared_fill(var)
        dtype = np.dtype(var.encoding.get("dtype", var.dtype))
        if fill is not None:
            var.encoding["fill_value"] = dtype.type(fill)
        elif dtype.kind in "iu" and "fill_value" not in var.encoding:
            var.encoding["fill_value"] = np.iinfo(dtype).max
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
    # the store lists its arrays in no fixed order: reflectance first, so that the dataset's
    # dimensions read (band, y, x) on every run
    order = [v for v in ("reflectance",) if v in ds.data_vars]
    return ds[order + sorted(str(v) for v in ds.data_vars if v not in order)]


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
