"""Sentinel-2 band names: the canonical (Earth Search v1) names and the band ids of other APIs.

A pipeline file may name a band either way (``red`` or ``B04``); everything inside
agriland-scale uses the canonical name.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from pydantic import AfterValidator

from agriland_scale.config.checks import short

__all__ = ["ALIASES", "CLASS_BANDS", "Bands", "canonical_band"]


# canonical (Earth Search v1 common name) -> Sentinel-2 band id used by other catalogues
ALIASES: dict[str, str] = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "cirrus": "B10",
    "swir16": "B11",
    "swir22": "B12",
    "scl": "SCL",
}


_BY_ID = {v.lower(): k for k, v in ALIASES.items()}


# classification / quality bands: not reflectance, no scale, nearest resampling
CLASS_BANDS = {"scl"}


def canonical_band(name: str) -> str:
    """Return the canonical (common) name of a band: ``B04``/``b04``/``red`` -> ``red``.

    Unknown names are returned unchanged (lower case only when they are band ids).
    """
    low = name.lower()
    if low in ALIASES:
        return low
    return _BY_ID.get(low, name)


def _canonical_bands(v: list[str]) -> list[str]:
    out = [canonical_band(b) for b in v]
    if len(set(out)) != len(out):
        twice = sorted(b for b, n in Counter(out).items() if n > 1)
        raise ValueError(f"bands {short(v)} name a band twice ({short(twice)}): list each band once")
    return out


# Sentinel-2 band names: common names (red) or band ids (B04), stored as common names
Bands = Annotated[list[str], AfterValidator(_canonical_bands)]
