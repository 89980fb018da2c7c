"""What a run would load, described before any pixel is read (``agriland search``)."""

from __future__ import annotations

from typing import Any

import pystac

from agriland_scale.config.region import Region
from agriland_scale.cube.load import cube_geobox
from agriland_scale.search.items import acquired, item_epsg, normalize_items
from agriland_scale.search.stac import item_tile

__all__ = ["describe_search"]


def describe_search(
    items: list[pystac.Item], bands: list[str], region: Region | tuple[float, ...], resolution: float
) -> dict[str, Any]:
    """Describe what a run would load, without reading any pixel.

    Per item: id, datetime, cloud cover, tile, EPSG. Per UTM zone: items, grid shape of the
    region at ``resolution`` m and estimated pixels and bytes (uint16 source reads and the
    float32 composite).

    Parameters
    ----------
    items : list of pystac.Item
        The items a search found (normalised here).
    bands : list of str
        The bands the cube holds.
    region : Region or tuple of float
        The region, or a (min lon, min lat, max lon, max lat) bbox in degrees (EPSG:4326).
    resolution : float
        The cube's pixel size in metres (UTM).

    Returns
    -------
    dict
        ``{"items": [...], "zones": {"EPSG:nnnnn": {...}}, "bands": [...]}``; a zone whose
        grid cannot be made holds ``items`` and ``error`` only.
    """
    items = normalize_items(items, bands)  # canonical keys; proj:* from headers if missing
    rows = [
        {
            "id": i.id,
            "datetime": acquired(i),
            "cloud_cover": i.properties.get("eo:cloud_cover"),
            "tile": item_tile(i),
            "epsg": item_epsg(i),
        }
        for i in items
    ]
    zones: dict[str, Any] = {}
    by_epsg: dict[Any, list[pystac.Item]] = {}
    for i, r in zip(items, rows):
        by_epsg.setdefault(r["epsg"], []).append(i)
    for epsg, group in sorted(by_epsg.items(), key=lambda kv: str(kv[0])):
        try:
            gb = cube_geobox(group, region, resolution)
        except Exception as e:  # noqa: BLE001 - reported per zone, nothing is loaded
            zones[f"EPSG:{epsg}"] = {"items": len(group), "error": str(e)}
            continue
        h, w = gb.shape
        n_dates = len({(acquired(i) or "")[:10] for i in group})
        px = h * w
        zones[f"EPSG:{epsg}"] = {
            "items": len(group),
            "dates": n_dates,
            "shape": [h, w],
            "pixels": px,
            "source_bytes": px * len(bands) * n_dates * 2,
            "composite_bytes": px * len(bands) * 4,
        }
    return {"items": rows, "zones": zones, "bands": list(bands)}
