"""Items of every current flavour, made uniform before loading.

Sentinel-2 items differ between APIs and versions:

- asset keys: Earth Search v1 uses common names (``red``, ``nir``, ``scl``); Earth Search v0
  and Planetary Computer use band ids (``B04``, ``B08``, ``SCL``);
- projection extension v1 (``proj:epsg``) or v2 (``proj:code``), on the item or per asset,
  or no ``proj:*`` fields at all (then the grid is read from the file header);
- reflectance scaling in ``raster:bands`` (Earth Search v1, including the ``-0.1`` offset
  of processing baseline 04.00, 2022-01-25 on) or not at all (Planetary Computer: digital
  numbers, with ``s2:processing_baseline`` telling whether the 1000 DN offset applies).

:func:`normalize_items` returns copies with canonical asset keys (Earth Search v1 names)
and complete ``proj:*`` fields; :func:`scale_offset` gives the factors turning an asset's
digital numbers into reflectance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pystac

from agriland_scale.config.bands import CLASS_BANDS, canonical_band
from agriland_scale.errors import BandMismatch, CorruptInput

__all__ = [
    "acquired",
    "asset_epsg",
    "check_datetime",
    "group_by_zone",
    "item_epsg",
    "normalize_items",
    "scale_offset",
]

log = logging.getLogger(__name__)


def acquired(item: pystac.Item | dict) -> str | None:
    """When an item was acquired, as its ISO 8601 text: ``datetime``, else ``start_datetime``.

    Accepts a pystac Item or its dict (a feature of ``items.json``); None when it has neither.
    """
    props = item.properties if isinstance(item, pystac.Item) else (item.get("properties") or {})
    return props.get("datetime") or props.get("start_datetime")


def item_epsg(item: pystac.Item) -> int | None:
    """Return the EPSG code of an item; ``None`` when the item carries none.

    Read from the projection extension v1 (``proj:epsg``) or v2 (``proj:code``), on the
    item or on any asset.
    """
    for fields in [item.properties] + [a.extra_fields for a in item.assets.values()]:
        epsg = _epsg_of(fields)
        if epsg is not None:
            return epsg
    return None


def _epsg_of(fields: dict) -> int | None:
    if fields.get("proj:epsg"):
        return int(fields["proj:epsg"])
    code = str(fields.get("proj:code") or "")
    if code.upper().startswith("EPSG:"):
        return int(code.split(":")[1])
    return None


def asset_epsg(item: pystac.Item, band: str) -> int | None:
    """Return the EPSG code declared for one asset; ``None`` when neither it nor the item declares one.

    The asset's own ``proj:epsg``/``proj:code`` overrides the item's, as the projection
    extension says; else the item's is used (see :func:`item_epsg`).
    """
    asset = item.assets.get(band)
    own = _epsg_of(asset.extra_fields) if asset is not None else None
    return own if own is not None else item_epsg(item)


def check_datetime(item: pystac.Item) -> None:
    """Refuse an item that says nothing of when it was acquired.

    Items are grouped by day and sorted by time, so one without ``datetime`` and without
    ``start_datetime`` is refused.

    Raises
    ------
    CorruptInput
        Naming the item and how to fix it.
    """
    if item.datetime is None and not item.properties.get("start_datetime"):
        raise CorruptInput(
            f"item {item.id} has no datetime and no start_datetime: a Sentinel-2 item must say "
            "when it was acquired. Fix the item (set properties.datetime, or start_datetime and "
            "end_datetime) or drop it from the catalog / the search"
        )


def _canonical_assets(item: pystac.Item) -> pystac.Item:
    item = item.clone()
    renamed = {}
    for key, asset in item.assets.items():
        canon = canonical_band(key)
        if canon in renamed and canon != key:
            continue  # both spellings present: keep the canonical one
        renamed[canon] = asset
    item.assets = renamed
    return item


def _read_grid(item_id: str, band: str, href: str) -> tuple[int, list[int], list[float]]:
    import rasterio

    try:
        with rasterio.open(href) as ds:
            if ds.crs is None or ds.crs.to_epsg() is None:
                raise CorruptInput(
                    f"item {item_id}: asset '{band}' ({href}) has no EPSG CRS in its header and the "
                    "item has no proj:* fields: cannot place it. Add proj:code (or proj:epsg), "
                    "proj:shape and proj:transform to the item, or drop it"
                )
            return ds.crs.to_epsg(), [ds.height, ds.width], list(ds.transform)[:6]
    except rasterio.errors.RasterioIOError as e:
        raise CorruptInput(
            f"item {item_id}: cannot read the header of asset '{band}' ({href}): {e}. The item has "
            "no proj:* fields, so the grid must come from the file: download it again, fix the "
            "asset's href, or drop the item"
        ) from None


def _fill_projection(item: pystac.Item, bands: Sequence[str]) -> pystac.Item:
    """Add the projection fields, read from the files of ``bands``, to an item whose assets lack them.

    The fields are ``proj:epsg``/``proj:shape``/``proj:transform``; a copy of the item is
    returned (the item itself when nothing is missing).
    """
    missing = [
        b
        for b in bands
        if b in item.assets and not {"proj:shape", "proj:transform"} <= set(item.assets[b].extra_fields)
    ]
    if not missing and item_epsg(item) is not None:
        return item
    from pystac.extensions.projection import ProjectionExtension

    item = item.clone()
    ProjectionExtension.add_to(item)  # readers such as odc-stac look for the declared extension
    for b in missing or [next(iter(bands))]:
        href = item.assets[b].get_absolute_href() or item.assets[b].href
        epsg, shape, transform = _read_grid(item.id, b, href)
        item.assets[b].extra_fields.update({"proj:shape": shape, "proj:transform": transform})
        item.properties.setdefault("proj:epsg", epsg)
    log.info("item %s: proj:* read from the files of %s", item.id, missing)
    return item


def normalize_items(items: Sequence[pystac.Item], bands: Sequence[str]) -> list[pystac.Item]:
    """Return copies of ``items`` with canonical asset keys and complete projection fields.

    Headers of items without ``proj:*`` are read in parallel (one small read per asset).

    Parameters
    ----------
    items : sequence of pystac.Item
        The items found by a search.
    bands : sequence of str
        The bands to load, canonical names (see :func:`canonical_band`).

    Returns
    -------
    list of pystac.Item
        The normalised copies, in order.

    Raises
    ------
    BandMismatch
        Naming the item and the missing band.
    CorruptInput
        Naming an item without any datetime (see :func:`check_datetime`), or one whose
        grid can be read neither from its fields nor from its files.
    """
    for item in items:
        check_datetime(item)
    out = [_canonical_assets(i) for i in items]
    for item in out:
        missing = [b for b in bands if b not in item.assets]
        if missing:
            raise BandMismatch(
                f"item {item.id} has no asset for band(s) {missing} (its assets: "
                f"{sorted(item.assets)}): choose cube.bands among them, or drop the item's "
                "collection from search.collections"
            )
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: _fill_projection(i, bands), out))


def group_by_zone(items: Sequence[pystac.Item]) -> dict[int, list[pystac.Item]]:
    """Items per EPSG code (one UTM zone each), in a stable order."""
    zones: dict[int, list[pystac.Item]] = {}
    for item in items:
        epsg = item_epsg(item)
        if epsg is None:
            raise CorruptInput(
                f"item {item.id} has no CRS (no proj:epsg / proj:code): normalise "
                "items with normalize_items() first"
            )
        zones.setdefault(epsg, []).append(item)
    return dict(sorted(zones.items()))


def scale_offset(item: pystac.Item, band: str) -> tuple[float, float]:
    """Factors turning the digital numbers of ``band`` into reflectance: ``dn * scale + offset``.

    Taken from ``raster:bands`` when the item gives a scale. Otherwise (Planetary Computer,
    Earth Search v0) Sentinel-2 reflectance is DN / 10000, minus 0.1 from processing
    baseline 04.00 on (``s2:processing_baseline``, the 2022 radiometric offset).
    Classification bands (SCL) are returned unscaled.
    """
    if band in CLASS_BANDS:
        return 1.0, 0.0
    rb = (item.assets[band].extra_fields.get("raster:bands") or [{}])[0]
    if "scale" in rb:
        return float(rb["scale"]), float(rb.get("offset", 0.0))
    baseline = str(item.properties.get("s2:processing_baseline") or "0")
    try:
        new = float(baseline) >= 4.0
    except ValueError:
        new = False
    return 1e-4, (-0.1 if new else 0.0)
