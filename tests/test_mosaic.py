"""The mosaic of every zone in one CRS (``cube.mosaic_crs``) is lazy and chunked: its
size costs the client nothing, each chunk is a task, the first zone wins where zones
overlap, and a mosaic of zones far apart is refused with its size."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from agriland_scale.errors import ConfigError
from agriland_scale.publish.mosaic import mosaic_zones
from agriland_scale.store import write_georef


def _zone(epsg: int, x0: float, value: float, n: int = 300) -> xr.Dataset:
    """A zone's segmentation: ``n`` x ``n`` px of 10 m at ``value``, its first 10 rows nodata."""
    x = x0 + 10 * np.arange(n) + 5
    y = 4_100_000 - 10 * np.arange(n) - 5
    p = np.full((n, n), value, dtype="float32")
    p[:10] = np.nan
    ds = xr.Dataset({"probability": (("y", "x"), p)}, coords={"y": y, "x": x})
    return write_georef(ds, f"EPSG:{epsg}").chunk(128)


# two zones across the 17N / 18N boundary at 78 deg W (37 deg N), overlapping by about 2 km
ZONES = {"utm17n": _zone(32617, 765_000, 0.25), "utm18n": _zone(32618, 232_000, 0.75)}


def test_the_mosaic_is_lazy_chunked_and_georeferenced():
    m = mosaic_zones(ZONES, "EPSG:4326", 0.0001, chunk=256)
    p = m["probability"]
    assert p.chunks is not None and max(max(c) for c in p.chunks) <= 256  # bounded tasks
    assert m.rio.crs.to_epsg() == 4326 and p.dims == ("y", "x")
    assert p.attrs["zones"] == ["utm17n", "utm18n"] and p.encoding["dtype"] == "uint8"
    values = p.values
    # each zone's value where it alone covers; bilinear keeps constants constant
    assert set(np.unique(values[np.isfinite(values)]).round(4)) == {0.25, 0.75}
    lon = np.broadcast_to(m.x.values, values.shape)
    assert np.all(values[np.isfinite(values) & (lon < -78.012)] == 0.25)  # 17N alone, west
    assert np.all(values[np.isfinite(values) & (lon > -77.984)] == 0.75)  # 18N alone, east
    assert np.isnan(values).any()  # the nodata rows and the corners no zone covers


def test_where_zones_overlap_the_first_wins():
    a = mosaic_zones(ZONES, "EPSG:32618", None)
    b = mosaic_zones(dict(reversed(ZONES.items())), "EPSG:32618", None)
    va, vb = a["probability"].values, b["probability"].values
    both = np.isfinite(va) & (va != vb)
    assert both.any()  # the overlap
    assert np.all(va[both] == 0.25) and np.all(vb[both] == 0.75)


def test_a_mosaic_of_zones_far_apart_is_refused_with_its_size():
    far = {"a": ZONES["utm17n"], "b": _zone(32633, 500_000, 0.5)}
    with pytest.raises(ConfigError, match="far apart.*cube.mosaic_resolution"):
        mosaic_zones(far, "EPSG:4326", 0.0001, max_pixels=1e8)
    with pytest.raises(ConfigError, match="geographic"):
        mosaic_zones(ZONES, "EPSG:4326", None)
