"""Sentinel-2 band names: the canonical (Earth Search v1) names and the band ids of other APIs.

A pipeline file may name a band either way (``red`` or ``B04``); everything inside
agriland-scale uses the canonical name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

from pydantic import AfterValidator

from agriland_scale.config.checks import short

__all__ = [
    "ALIASES",
    "CLASS_BANDS",
    "DEFAULT_REFLECTANCE_MAX",
    "Bands",
    "ReflectanceMax",
    "canonical_band",
    "check_reflectance_max",
    "reflectance_record",
    "reflectance_scale",
]


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


# The reflectance (0..1) each band's model input saturates at (maps to 1), when
# ``reflectance_max`` is ``auto`` or a mapping that leaves a band out. Measured on the demo
# window (Virginia Eastern Shore, L1C top-of-atmosphere, 1024 x 1024 px at 10 m): the 99.5th
# percentiles are blue 0.232, green 0.224, red 0.247, nir 0.429, swir16 0.312, swir22 0.247
# (98th: 0.149, 0.134, 0.137, 0.373, 0.281, 0.199). The visible bands keep the seed's 0.3;
# nir, swir16 and swir22 get their 99.5th percentile rounded up to a tenth (0.5, 0.4, 0.3), so
# that under 0.5 % of their pixels clip (NIR: none) where a single 0.3 clipped 9.2 % of the
# NIR. Bands not in the sample follow their spectral neighbours (red edge 2-3 and nir08 like
# nir; coastal, red edge 1, nir09, cirrus like the visible bands).
DEFAULT_REFLECTANCE_MAX: dict[str, float] = {
    "coastal": 0.3,
    "blue": 0.3,
    "green": 0.3,
    "red": 0.3,
    "rededge1": 0.3,
    "rededge2": 0.5,
    "rededge3": 0.5,
    "nir": 0.5,
    "nir08": 0.5,
    "nir09": 0.3,
    "cirrus": 0.3,
    "swir16": 0.4,
    "swir22": 0.3,
}
_FALLBACK_REFLECTANCE_MAX = 0.3  # a band of another sensor, not in the table

# a pipeline's ``reflectance_max``: one number for every band, ``auto`` (the table above), a
# mapping band -> number (bands left out: the table), or a list of numbers, one a band in order
ReflectanceMax = float | Literal["auto"] | dict[str, float] | list[float]


def check_reflectance_max(value: ReflectanceMax, bands: Sequence[str], key: str) -> None:
    """Refuse a ``reflectance_max`` that does not fit ``bands``, naming ``key`` and the fix.

    Raises
    ------
    ValueError
        A number <= 0, a list of another length than ``bands``, a mapping naming a band that
        is not in ``bands``.
    """
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(
                f"{key} must be a number, 'auto', a mapping band: number or a list, not {value!r}"
            )
        return
    if isinstance(value, (int, float)):
        values = [float(value)]
    elif isinstance(value, Mapping):
        extra = [b for b in value if canonical_band(b) not in [canonical_band(x) for x in bands]]
        if extra:
            raise ValueError(
                f"{key} names band(s) {short(extra)} that are not in the bands {short(list(bands))}: "
                "name only the model's bands (the others take their defaults)"
            )
        values = [float(v) for v in value.values()]
    else:
        values = [float(v) for v in value]
        if len(values) != len(bands):
            raise ValueError(
                f"{key} has {len(values)} value(s) for {len(bands)} band(s) {short(list(bands))}: give "
                "one a band, in their order, or a mapping band: number"
            )
    bad = [v for v in values if not v > 0]
    if bad:
        raise ValueError(f"{key} must be positive reflectances (e.g. 0.3), got {short(bad)}")


def reflectance_scale(
    value: ReflectanceMax | Sequence[float] | None, bands: Sequence[str]
) -> tuple[float, ...]:
    """Resolve a ``reflectance_max`` setting to one reflectance a band, in the order of ``bands``.

    Parameters
    ----------
    value : float, 'auto', mapping or list
        One number for every band; ``auto`` for :data:`DEFAULT_REFLECTANCE_MAX`; a mapping
        band name (common name or id) -> reflectance, the bands it leaves out from the table;
        or a sequence of reflectances, one a band. ``None`` (a model sidecar without
        normalisation) gives an empty tuple.
    bands : sequence of str
        The model's bands, in input order.

    Returns
    -------
    tuple of float
        ``(len(bands),)`` reflectances (unitless, 0..1 scale) that map to model input 1.
    """
    if value is None:
        return ()
    names = [canonical_band(b) for b in bands]
    if isinstance(value, (int, float)):
        return tuple(float(value) for _ in names)
    if isinstance(value, str):
        value = {}
    if isinstance(value, Mapping):
        given = {canonical_band(str(k)): float(v) for k, v in value.items()}
        return tuple(given.get(b, DEFAULT_REFLECTANCE_MAX.get(b, _FALLBACK_REFLECTANCE_MAX)) for b in names)
    return tuple(float(v) for v in value)


def reflectance_record(value: ReflectanceMax, bands: Sequence[str]) -> float | dict[str, float]:
    """Return what a model's sidecar records of ``reflectance_max`` for its ``bands``.

    One number stays one number (as every sidecar before per-band normalisation); ``auto``, a
    mapping or a list become the mapping canonical band -> reflectance, in band order.
    """
    if isinstance(value, (int, float)):
        return float(value)
    names = [canonical_band(b) for b in bands]
    return dict(zip(names, reflectance_scale(value, bands)))
