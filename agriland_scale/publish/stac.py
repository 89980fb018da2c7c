"""Output STAC: describe a run's products as a self-contained STAC Collection.

:func:`write_stac` writes ``OUT/stac/``::

    collection.json                         the run (extent = the region, EPSG:4326)
    <run>-cluster_map/<run>-cluster_map.json  one Item a COG of OUT/cog (zone-tagged names,
    <run>-probability/...                     utm18n_mask, in multi-zone runs), with the COG
                                              and its Zarr group as assets
    <run>-mask/...
    <run>-mask_r000_c001/...                a product larger than one output tile: one Item a
                                            tile COG (cog/mask/mask_r000_c001.tif; property
                                            agriland:tile), its VRT an asset of the collection
    <run>-zarr/<run>-zarr.json              the whole Zarr store (every group; in a
                                            multi-zone run one Item a zone, <run>-utm18n-zarr)
    sources/<id>.json                       copies of source items whose self link is gone
                                            (without the ``collection`` field when the
                                            collection's link is gone too)

Every Item carries the projection extension (``proj:code``, ``proj:shape``,
``proj:transform``, ``proj:bbox`` in the product's own CRS) and, for rasters, the raster
extension (data type, nodata, scale/offset when not 1/0, unit); geometry and bbox are in
EPSG:4326. ``derived_from`` links point to the STAC items the run read; ``related`` links
of the collection to the models' MLM Items (``OUT/models/*.stac.json``). All hrefs are
relative, so the folder can be moved or published as it is.

Zarr assets: ``zarr`` is the group in the run's Icechunk repository (media type
``application/vnd.zarr+icechunk``), which plain Zarr readers cannot open; its ``description``
and ``agriland:icechunk`` say how to open it with ``icechunk`` (:func:`icechunk_asset`). Each
plain Zarr export in the run folder (``agriland export RUN --zarr RUN/NAME.zarr``; written
before this catalogue, e.g. ``agriland report RUN`` rewrites it) adds an asset ``NAME.zarr``
(``application/vnd+zarr``) whose ``xarray:open_kwargs`` open it with
``xarray.open_dataset(href, **open_kwargs)`` (:func:`zarr_asset`).

The products contain modified Copernicus Sentinel data: ``license`` is ``other`` (STAC 1.1's
value for a licence without an SPDX id) with a ``license`` link to the Sentinel data legal
notice. The collection records the state of the run's finished stages only (a stage still
``running``, such as publish while it writes this catalogue, is left out).

Validation: ``item.validate()`` needs the network because pystac fetches the extension
schemas by URL; ``tests/test_stac_valid.py`` validates every file of the catalogue offline
against the official STAC and extension schemas (copies under ``tests/data/stac-schemas``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pystac
import rasterio
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.warp import transform_bounds, transform_geom

from agriland_scale.errors import CorruptInput
from agriland_scale.files import write_json
from agriland_scale.layout import RunRecord, load_items, load_run_record, local_folder, zones_of
from agriland_scale.publish.stac_zarr import (
    ZARR_MEDIA_TYPE,
    add_zarr_assets,
    icechunk_asset,
    zarr_asset,
    zarr_exports,
)
from agriland_scale.publish.tiles import tiled_products
from agriland_scale.store import is_repo, product_groups, reader, store_location

__all__ = [
    "COG_PRODUCTS",
    "SENTINEL_LICENSE_URL",
    "ZARR_MEDIA_TYPE",
    "icechunk_asset",
    "write_stac",
    "zarr_asset",
]

log = logging.getLogger(__name__)

# the licence of the Copernicus Sentinel data the products are derived from (not an SPDX id)
SENTINEL_LICENSE_URL = "https://sentinels.copernicus.eu/documents/247904/690755/Sentinel_Data_Legal_Notice"
SENTINEL_LICENSE_TITLE = "Legal notice on the use of Copernicus Sentinel Data and Service Information"
# stage states that are final (run.json also says "running" while a stage runs)
_FINAL_STATES = ("done", "failed", "interrupted")

# COG product (file stem without the zone tag) -> (Zarr group, title, unit)
COG_PRODUCTS: dict[str, tuple[str, str, str | None]] = {
    "cluster_map": ("clusters", "DEC cluster per patch (255, or 65535 when k > 255: not clustered)", None),
    "probability": ("segmentation", "agricultural land probability (U-Net)", "1"),
    "mask": ("segmentation", "agricultural land mask (1 agricultural, 0 other, 255 nodata)", None),
    "mosaic_probability": ("mosaic", "agricultural land probability, zones reprojected to one CRS", "1"),
}

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def _footprint(crs: Any, bounds: tuple[float, float, float, float]) -> tuple[dict, list[float]]:
    """Polygon and bbox in EPSG:4326 (lon/lat) of ``bounds`` (left, bottom, right, top) in ``crs``.

    The polygon is densified (5 points a side) so that it follows the projected edges.
    """
    left, bottom, right, top = bounds
    n = 5
    xs = np.linspace(left, right, n)
    ys = np.linspace(bottom, top, n)
    ring = (
        [(x, bottom) for x in xs]
        + [(right, y) for y in ys[1:]]
        + [(x, top) for x in xs[::-1][1:]]
        + [(left, y) for y in ys[::-1][1:]]
    )
    geom = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    geom = {"type": "Polygon", "coordinates": [[list(map(float, p)) for p in geom["coordinates"][0]]]}
    bbox = [float(v) for v in transform_bounds(crs, "EPSG:4326", left, bottom, right, top, densify_pts=n)]
    return geom, bbox


def _epsg_code(crs: Any) -> str | None:
    epsg = crs.to_epsg() if crs is not None else None
    return f"EPSG:{epsg}" if epsg else None


def _time_range(items: list[dict[str, Any]], record: RunRecord) -> tuple[str, str]:
    """Start and end (ISO 8601) of the source items: the products are composites over it.

    Falls back to the searched ``datetime`` interval of the config when items.json is absent.
    """
    starts, ends = [], []
    for f in items:
        p = f.get("properties") or {}
        start = p.get("start_datetime") or p.get("datetime")
        end = p.get("end_datetime") or p.get("datetime")
        if start:
            starts.append(pystac.utils.str_to_datetime(start))
        if end:
            ends.append(pystac.utils.str_to_datetime(end))
    if starts and ends:
        return (pystac.utils.datetime_to_str(min(starts)), pystac.utils.datetime_to_str(max(ends)))
    interval = ((record.get("config") or {}).get("search") or {}).get("datetime") or ""
    a, _, b = str(interval).partition("/")
    if not (a and b and ".." not in (a, b)):
        raise CorruptInput(
            "cannot date the products: items.json is missing and the config's "
            f"search.datetime is {interval!r}, not a closed interval; re-run the "
            "search stage"
        )
    return (
        pystac.utils.datetime_to_str(pystac.utils.str_to_datetime(a)),
        pystac.utils.datetime_to_str(pystac.utils.str_to_datetime(b)),
    )


def _new_item(
    item_id: str, geom: dict, bbox: list[float], start: str, end: str, created: str | None, title: str
) -> pystac.Item:
    item = pystac.Item(
        id=item_id,
        geometry=geom,
        bbox=bbox,
        datetime=None,
        start_datetime=pystac.utils.str_to_datetime(start),
        end_datetime=pystac.utils.str_to_datetime(end),
        properties={"title": title},
    )
    if created:
        item.common_metadata.created = pystac.utils.str_to_datetime(created)
    return item


def _apply_projection(
    item: pystac.Item, code: str | None, shape: list[int], transform: list[float], bounds: list[float]
) -> None:
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.apply(
        code=code,
        shape=[int(v) for v in shape],
        transform=[float(v) for v in transform],
        bbox=[float(v) for v in bounds],
    )


def _raster_band(src: rasterio.DatasetReader, unit: str | None) -> RasterBand:
    nodata = src.nodata
    if nodata is not None and np.isnan(nodata):
        nodata = "nan"
    band = RasterBand.create(
        nodata=nodata,
        data_type=DataType(src.dtypes[0]),
        unit=unit,
        spatial_resolution=float(abs(src.transform.a)),
    )
    scale, offset = src.scales[0], src.offsets[0]
    if (scale, offset) != (1.0, 0.0):  # only where the stored values are scaled
        band.scale, band.offset = float(scale), float(offset)
    return band


def _cog_product(stem: str, zones: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """``utm18n_mask`` -> (``mask``, ``utm18n/``); ``mask`` -> (``mask``, ``""``); unknown -> None."""
    for name, z in zones.items():
        if name and stem.startswith(f"{name}_") and stem[len(name) + 1 :] in COG_PRODUCTS:
            return stem[len(name) + 1 :], z.get("prefix") or ""
    return (stem, "") if stem in COG_PRODUCTS else None


def _cog_item(
    path: Path,
    item_id: str,
    product: str,
    prefix: str,
    dates: tuple[str, str, str | None],
    store: str,
    groups: list[str],
    exports: dict[Path, list[str]],
) -> pystac.Item:
    group, title, unit = COG_PRODUCTS[product]
    group = group if product.startswith("mosaic") else prefix + group
    try:
        with rasterio.open(path) as src:
            crs, bounds, shape = src.crs, tuple(src.bounds), [src.height, src.width]
            transform = list(src.transform)[:6]
            band = _raster_band(src, unit)
    except rasterio.errors.RasterioIOError as e:
        raise CorruptInput(f"{path} cannot be read as a GeoTIFF ({e}): re-run the publish stage") from e
    geom, bbox = _footprint(crs, bounds)
    item = _new_item(item_id, geom, bbox, *dates, title)
    _apply_projection(item, _epsg_code(crs), shape, transform, list(bounds))
    asset = pystac.Asset(
        href=str(path.resolve()), media_type=pystac.MediaType.COG, title=title, roles=["data"]
    )
    item.add_asset("cog", asset)
    RasterExtension.ext(asset, add_if_missing=True).apply(bands=[band])
    if group in groups:
        add_zarr_assets(item, store, group, f"{title}: Zarr group '{group}'", exports, group)
    return item


def _zarr_item(
    zone: dict[str, Any],
    item_id: str,
    dates: tuple[str, str, str | None],
    store: str,
    all_groups: list[str],
    exports: dict[Path, list[str]],
) -> pystac.Item:
    """Make an Item for the store (single zone) or for one zone's subtree of it (``group`` = zone).

    An export's asset opens the zone's ``cube`` group (one xarray Dataset a group).
    """
    from pyproj import CRS

    crs = CRS.from_user_input(zone["crs"])
    geom, bbox = _footprint(crs, tuple(zone["bounds"]))
    prefix = zone.get("prefix") or ""
    groups = sorted(
        g[len(prefix) :] for g in all_groups if g.startswith(prefix) and "/" not in g[len(prefix) :]
    )
    where = f"zone group '{prefix.rstrip('/')}' of the Zarr store" if prefix else "the Zarr store"
    item = _new_item(item_id, geom, bbox, *dates, f"every product of the run as groups of {where}")
    shape = zone.get("shape") or {}
    _apply_projection(
        item, _epsg_code(crs), [shape.get("y", 0), shape.get("x", 0)], zone["transform"], zone["bounds"]
    )
    item.properties["agriland:groups"] = [prefix + g for g in groups]
    add_zarr_assets(
        item,
        store,
        prefix.rstrip("/") or None,
        f"Zarr store, groups: {', '.join(prefix + g for g in groups)}",
        exports,
        prefix + "cube",
    )
    return item


def _lasting(href: str | None) -> bool:
    """Tell whether ``href`` is an http(s) URL that outlives the run (not on a loopback address)."""
    url = urlparse(href) if href else None
    return bool(url and url.scheme in ("http", "https") and url.hostname not in _LOOPBACK)


def _source_links(items: list[dict[str, Any]], stac_dir: Path) -> list[pystac.Link]:
    """``derived_from`` links to the source items.

    An item's self link is used when it is a lasting URL; a self link on a loopback address
    (the local STAC API the run started and stopped) is dead after the run, so the item is
    copied to ``stac/sources/<id>.json`` and the link points there. The copy keeps its
    ``collection`` link when that is a lasting URL; otherwise it drops the link and the
    ``collection`` field with it (STAC requires the link where the field is present).
    """
    links = []
    for f in items:
        self_href = next((lk.get("href") for lk in f.get("links") or [] if lk.get("rel") == "self"), None)
        if self_href is not None and _lasting(self_href):
            href = self_href
        else:
            src = stac_dir / "sources" / f"{f['id']}.json"
            src.parent.mkdir(parents=True, exist_ok=True)
            copy = dict(f)
            copy["links"] = [
                lk
                for lk in f.get("links") or []
                if lk.get("rel") not in ("self", "root", "parent", "collection")
                or (lk.get("rel") == "collection" and _lasting(lk.get("href")))
            ]
            if not any(lk.get("rel") == "collection" for lk in copy["links"]):
                copy.pop("collection", None)
            write_json(copy, src)
            href = str(src.resolve())
        links.append(
            pystac.Link(rel="derived_from", target=href, media_type=pystac.MediaType.GEOJSON, title=f["id"])
        )
    return links


def _relative_source_links(coll: pystac.Collection) -> None:
    """Make ``derived_from`` and ``related`` links to local files relative to the object that holds them.

    pystac makes only hierarchical links relative when saving; call after ``normalize_hrefs``.
    """
    for obj in [coll, *coll.get_items()]:
        for link in obj.links:
            if (
                link.rel in ("derived_from", "related")
                and isinstance(link.target, str)
                and link.target.startswith("/")
            ):
                base = obj.get_self_href()
                assert base is not None, "call after normalize_hrefs"
                link.target = pystac.utils.make_relative_href(link.target, base)


def write_stac(out_dir: str | Path) -> Path:
    """Write a self-contained STAC Collection of the run's products under ``OUT/stac/``.

    Reads only the output folder (``run.json``, ``items.json``, ``cog/*.tif``,
    ``agriland.icechunk``); describes the products that exist, so it also works on a run whose
    later stages failed. Idempotent: ``OUT/stac`` is replaced on every call.

    Returns
    -------
    Path
        ``OUT/stac/collection.json``.

    Raises
    ------
    CorruptInput
        Not a run folder, unreadable ``run.json``/``items.json``/COG, or a run that wrote no
        product yet (nothing to describe).
    """
    out = local_folder(out_dir)
    record = load_run_record(out)
    items = load_items(out)
    cfg = record.get("config") or {}
    run = str(cfg.get("name") or out.name)
    start, end = _time_range(items, record)
    created = record.get("finished") or record.get("started")
    if created:  # run.json writes +0000; make it RFC 3339
        created = pystac.utils.datetime_to_str(pystac.utils.str_to_datetime(created))
    store = store_location(out)
    all_groups = product_groups(reader(store)) if is_repo(store) else []
    exports = zarr_exports(out)
    stac_dir = out / "stac"
    if stac_dir.exists():
        shutil.rmtree(stac_dir)
    stac_dir.mkdir(parents=True)

    dates = (start, end, created)
    zones = zones_of(record)
    products: list[pystac.Item] = []
    for path in sorted((out / "cog").glob("*.tif")):
        found = _cog_product(path.stem, zones)
        if found is None:
            log.warning("%s is not a known product; left out of the STAC catalog", path)
            continue
        products.append(_cog_item(path, f"{run}-{path.stem}", *found, dates, store, all_groups, exports))
    tiled = tiled_products(out / "cog")
    for stem, tiles in tiled.items():  # a product too large for one COG: one Item an output tile
        found = _cog_product(stem, zones)
        if found is None:
            log.warning("%s is not a known product; left out of the STAC catalog", stem)
            continue
        for path, row, col in tiles:
            item = _cog_item(path, f"{run}-{path.stem}", *found, dates, store, all_groups, exports)
            item.properties["agriland:tile"] = {
                "product": stem,
                "row": row,
                "col": col,
                "vrt": f"cog/{stem}.vrt",
            }
            products.append(item)
    for name, zone in zones.items():
        if (zone.get("prefix") or "") + "cube" in all_groups:
            zid = f"{run}-{name}-zarr" if zone.get("prefix") else f"{run}-zarr"
            products.append(_zarr_item(zone, zid, dates, store, all_groups, exports))
    if not products:
        shutil.rmtree(stac_dir)
        raise CorruptInput(
            f"{out} holds no product to describe (no cog/*.tif, no cube in "
            f"agriland.icechunk; stages: {record.get('stages')}): finish the run first"
        )
    sources = _source_links(items, stac_dir)
    for item in products:
        for link in sources:
            item.add_link(link.clone())

    bboxes = np.array([i.bbox for i in products])
    extent = pystac.Extent(
        pystac.SpatialExtent(
            [
                [
                    float(bboxes[:, 0].min()),
                    float(bboxes[:, 1].min()),
                    float(bboxes[:, 2].max()),
                    float(bboxes[:, 3].max()),
                ]
            ]
        ),
        pystac.TemporalExtent([[pystac.utils.str_to_datetime(start), pystac.utils.str_to_datetime(end)]]),
    )
    coll = pystac.Collection(
        id=run,
        extent=extent,
        license="other",  # + the license link below
        title=f"agriland-scale run '{run}'",
        description=(
            f"Agricultural land products of the agriland-scale run '{run}' (composite of "
            f"{len(items)} Sentinel-2 item(s), {start[:10]} to {end[:10]}): DEC cluster map, "
            "U-Net agricultural-land probability and mask, and the Zarr store of every stage. "
            "Contains modified Copernicus Sentinel data."
        ),
        extra_fields={
            "agriland:stages": {
                s: state for s, state in (record.get("stages") or {}).items() if state in _FINAL_STATES
            },
            "agriland:versions": record.get("versions") or {},
        },
    )
    coll.add_link(
        pystac.Link(rel=pystac.RelType.LICENSE, target=SENTINEL_LICENSE_URL, title=SENTINEL_LICENSE_TITLE)
    )
    for link in sources:
        coll.add_link(link.clone())
    for model in sorted((out / "models").glob("*.stac.json")):  # the MLM items beside the models
        coll.add_link(
            pystac.Link(
                rel="related",
                target=str(model.resolve()),
                media_type=pystac.MediaType.GEOJSON,
                title=f"model (STAC MLM Item): {model.name.removesuffix('.stac.json')}",
            )
        )
    for item in products:
        coll.add_item(item)
    coll.normalize_hrefs(str(stac_dir))
    for stem in tiled:  # the VRT over a tiled product's COGs (GDAL reads it as one raster)
        found = _cog_product(stem, zones)
        title = f"{COG_PRODUCTS[found[0]][1] if found else stem}: GDAL VRT over its tile COGs"
        coll.add_asset(f"{stem}-vrt", pystac.Asset(f"../cog/{stem}.vrt", title, media_type="application/xml"))
    coll.make_all_asset_hrefs_relative()
    _relative_source_links(coll)
    coll.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    log.info("STAC: %d item(s) in %s", len(products), stac_dir)
    return stac_dir / "collection.json"
