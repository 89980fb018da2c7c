"""Rendering reflectance for people: the one 2–98 % stretch behind every picture of a run.

Quicklooks, the HTML report, the cluster gallery and the VIA label images all call
:func:`stretch_limits` and :func:`to_rgb8`/:func:`to_rgb`, so that they show the same colours.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.errors import BandMismatch, EmptyRegion

__all__ = [
    "RGB",
    "check_bands",
    "display_bands",
    "figure_png",
    "percentile_limits",
    "stretch_limits",
    "to_rgb",
    "to_rgb8",
]

RGB = ("red", "green", "blue")


def display_bands(cube: xr.Dataset) -> tuple[str, ...]:
    """Return the bands shown as red, green, blue: B04, B03, B02 when the cube has them, else its first 3."""
    have = tuple(str(b) for b in cube["band"].values)
    return RGB if set(RGB) <= set(have) else have[:3]


def stretch_limits(
    cube: xr.Dataset,
    bands: tuple[str, ...] = RGB,
    *,
    percentiles: tuple[float, float] = (2, 98),
    max_pixels: int = 1_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band ``percentiles`` ``(low (n_bands,), high (n_bands,))`` of ``bands`` over the region.

    Reflectance, unitless. Computed on a regular subsample of at most ``max_pixels`` pixels
    (every n-th row and column), so it costs one pass over the cube and little memory.
    Per-band limits balance the colours of top-of-atmosphere (L1C) data, where blue is
    the brightest band.
    """
    check_bands(cube, bands)
    h, w = cube.sizes["y"], cube.sizes["x"]
    step = max(1, math.ceil(math.sqrt(h * w / max_pixels)))
    sub = cube["reflectance"].sel(band=list(bands)).isel(y=slice(None, None, step), x=slice(None, None, step))
    return percentile_limits(np.asarray(sub.values, dtype="float32"), bands, percentiles=percentiles)


def percentile_limits(
    sample: np.ndarray, bands: tuple[str, ...] | list[str], *, percentiles: tuple[float, float] = (2, 98)
) -> tuple[np.ndarray, np.ndarray]:
    """Return per-band ``percentiles`` of a reflectance ``sample (n_bands, ...)``, as :func:`stretch_limits` does.

    NaN is no data; ``bands`` name the sample's bands (for the error).
    """
    vals = sample.reshape(len(bands), -1)
    if not np.isfinite(vals).any(1).all():
        raise EmptyRegion(f"the cube holds no valid reflectance in band(s) {list(bands)}: nothing to display")
    lo, hi = np.nanpercentile(vals, percentiles, axis=1)
    hi = np.where(hi > lo, hi, lo + 1e-6)
    return lo.astype("float64"), hi.astype("float64")


def to_rgb8(block: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
    """Stretch ``block (3, h, w)`` reflectance linearly from ``[lo, hi]`` (per band) to ``(h, w, 3)`` uint8.

    Values are clipped; pixels with NaN (no data) in any band become 0 (black).
    """
    lo3 = np.broadcast_to(np.asarray(lo, dtype="float64"), (block.shape[0],))[:, None, None]
    hi3 = np.broadcast_to(np.asarray(hi, dtype="float64"), (block.shape[0],))[:, None, None]
    x = np.clip((block - lo3) / (hi3 - lo3), 0.0, 1.0)
    nodata = ~np.isfinite(block).all(0)
    x = np.round(np.nan_to_num(np.moveaxis(x, 0, -1), nan=0.0) * 255.0).astype("uint8")
    x[nodata] = 0
    return x


def check_bands(cube: xr.Dataset, bands: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`.BandMismatch`, naming what to add to ``cube.bands``, unless ``cube`` has ``bands``."""
    have = [str(b) for b in cube["band"].values]
    missing = [b for b in bands if b not in have]
    if missing:
        raise BandMismatch(
            f"the cube has no band(s) {missing} (it has {have}): the report needs "
            f"{list(bands)}; add them to cube.bands"
        )


def to_rgb(block: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
    """Stretch ``block (3, h, w)`` as :func:`to_rgb8` does, to ``(h, w, 3)`` float in [0, 1] (matplotlib)."""
    return to_rgb8(block, lo, hi).astype("float32") / 255.0


def figure_png(fig: Any, dpi: float, *, compress_level: int = 6) -> bytes:
    """Draw a matplotlib figure at ``dpi`` and return it as an RGB PNG (no alpha channel).

    A figure's background is opaque, so the alpha channel ``savefig`` writes carries nothing:
    without it the demo's cluster gallery is 12 % smaller (1.26 MB, not 1.44) and encodes faster. ``compress_level``
    is zlib's (PIL's default 6; 1 encodes about twice as fast, for ~10 % more bytes).
    """
    import io

    from PIL import Image

    fig.set_dpi(dpi)
    fig.canvas.draw()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]).save(
        buf, format="png", compress_level=compress_level
    )
    return buf.getvalue()
