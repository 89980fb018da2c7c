"""The CF metadata of a composite: its time (``time`` + ``time_bounds``) and its reflectance's standard name.

Read from the items alone (no pixel): :func:`composite_time` (the middle and the range of the
acquisitions), :func:`processing_level` (L1C or L2A, hence the reflectance's CF
``standard_name`` in :data:`REFLECTANCE_STANDARD_NAMES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pystac
import xarray as xr

__all__ = ["REFLECTANCE_STANDARD_NAMES", "composite_time", "processing_level"]


# the CF standard name of the reflectance of each Sentinel-2 processing level
REFLECTANCE_STANDARD_NAMES = {
    "L1C": "toa_bidirectional_reflectance",
    "L2A": "surface_bidirectional_reflectance",
}


def processing_level(items: Sequence[pystac.Item]) -> str | None:
    """Return the items' Sentinel-2 processing level, ``L1C`` or ``L2A``, when they all have the same one.

    Read from ``processing:level``, else ``s2:product_type`` (``S2MSI1C``, ``S2MSI2A``), else
    the collection id (``sentinel-2-l2a``); None when an item says neither or they differ.
    """
    levels = set()
    for item in items:
        p = item.properties
        text = str(p.get("processing:level") or p.get("s2:product_type") or item.collection_id or "").upper()
        levels.add(
            "L2A"
            if "L2A" in text or text.endswith("2A")
            else "L1C"
            if "L1C" in text or text.endswith("1C")
            else None
        )
    return levels.pop() if len(levels) == 1 else None


def composite_time(items: Sequence[pystac.Item]) -> dict[str, xr.Variable]:
    """Return the CF time coordinates of a composite of ``items``: ``time`` and ``time_bounds``.

    ``time_bounds`` (dim ``nv``, 2) holds the first and the last acquisition (UTC; an item's
    ``start_datetime`` / ``end_datetime`` where it covers a range); ``time``, a scalar
    coordinate (no dimension: the cube stays ``(band, y, x)``), the middle of that range, with
    ``bounds: time_bounds``. Both are stored as int64 seconds since 1970-01-01. Empty when no
    item has a time.
    """
    from datetime import timezone

    def utc(when: Any) -> np.datetime64:
        if when.tzinfo is not None:
            when = when.astimezone(timezone.utc).replace(tzinfo=None)
        return np.datetime64(when, "s")

    starts = [utc(t) for i in items if (t := i.common_metadata.start_datetime or i.datetime) is not None]
    ends = [utc(t) for i in items if (t := i.common_metadata.end_datetime or i.datetime) is not None]
    if not starts or not ends:
        return {}
    first, last = min(starts), max(ends)
    enc = {"units": "seconds since 1970-01-01 00:00:00", "calendar": "proleptic_gregorian", "dtype": "int64"}
    # "bounds" in the encoding, as xarray decodes it: written as the attribute, and time_bounds
    # then not listed in a (non-CF) global "coordinates" attribute
    time = xr.Variable(
        (),
        first + (last - first) // 2,
        {"standard_name": "time", "long_name": "time of the composite (middle of its acquisitions)"},
        enc | {"bounds": "time_bounds"},
    )
    bounds = xr.Variable(
        ("nv",),
        np.array([first, last]),
        {"long_name": "first and last acquisition of the composite"},
        dict(enc),
    )
    return {"time": time, "time_bounds": bounds}
