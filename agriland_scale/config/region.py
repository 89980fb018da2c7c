"""The region of a run: a lon/lat bbox, or polygons from a GeoJSON / GeoParquet file.

The region is held in EPSG:4326. Each UTM zone's cube covers the part of the region inside
that zone's items; pixels outside the polygons are nodata.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import box, mapping
from shapely.geometry.base import BaseGeometry

from agriland_scale.config.checks import short
from agriland_scale.errors import CorruptInput, RegionError

__all__ = ["Region", "read_region_file"]


@dataclass(frozen=True)
class Region:
    """A region in EPSG:4326: ``geometry`` (polygons) and whether it is just a bbox."""

    geometry: BaseGeometry
    is_box: bool = True

    @classmethod
    def from_bbox(cls, bbox) -> Region:
        """Make a box region from ``bbox`` (min lon, min lat, max lon, max lat) in degrees, EPSG:4326."""
        check_bbox(bbox)
        return cls(box(*bbox), True)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(min lon, min lat, max lon, max lat) in degrees."""
        return tuple(float(v) for v in self.geometry.bounds)  # type: ignore[return-value]

    def geojson(self) -> dict:
        """Return the geometry as a GeoJSON-like mapping (EPSG:4326 lon/lat)."""
        return mapping(self.geometry)

    def near(self, bounds: Iterable[float], margin: float = 1.0) -> Region:
        """Return the part of the region within ``margin`` degrees of ``bounds`` (lon/lat).

        Used before projecting to a UTM zone: a region far wider than the zone (a continent,
        the whole world) has no meaning in the zone's projection. The result may be empty.
        """
        x0, y0, x1, y1 = bounds
        return Region(
            self.geometry.intersection(box(x0 - margin, y0 - margin, x1 + margin, y1 + margin)), self.is_box
        )

    def to_crs(self, crs) -> BaseGeometry:
        """Return the region's geometry in ``crs`` (anything pyproj accepts), densified to ~500 m."""
        from pyproj import Transformer

        t = Transformer.from_crs(4326, crs, always_xy=True)
        dense = shapely.segmentize(self.geometry, 0.005)  # ~500 m: straight in lon/lat != in UTM
        return shapely.transform(dense, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def read_region_file(path: str | Path) -> Region:
    """Read polygons (GeoJSON, GeoPackage, GeoParquet, Shapefile…) in any CRS as a Region.

    A missing file, a folder, a file that is not geodata, or one without polygons raises
    :class:`RegionError` / :class:`CorruptInput` naming the file and what to give instead.
    """
    import geopandas as gpd

    p = Path(path)
    give = "give a GeoJSON, GeoPackage or GeoParquet file of polygons (fix search.region)"
    if not p.exists():
        raise RegionError(f"region file {p} does not exist: fix search.region")
    if p.is_dir():
        raise RegionError(f"region file {p} is a folder: {give}")
    try:
        df = gpd.read_parquet(p) if p.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(p)
    except Exception as e:  # noqa: BLE001 - any reader error means the same to the user
        reason = " ".join(str(e).split())
        if "not recognized as being in a supported file format" in reason:  # GDAL's words
            reason = "not a geodata file format GDAL can read"
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise CorruptInput(f"cannot read region file {p} ({type(e).__name__}: {reason}): {give}") from None
    if df.empty or not hasattr(df, "geometry"):
        raise RegionError(f"region file {p} holds no features: {give}")
    geom = df.geometry
    geom = geom[geom.notna() & ~geom.is_empty]
    if geom.empty:
        raise RegionError(f"region file {p} holds no geometry (only empty or null ones): {give}")
    if df.crs is None:
        raise RegionError(f"region file {p} has no CRS: write it with one (GeoJSON is lon/lat)")
    geom = geom.to_crs(4326)
    polys = geom[geom.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polys.empty:
        raise RegionError(
            f"region file {p} holds no polygons (found {sorted(set(geom.geom_type))}): "
            f"the region is an area; {give}"
        )
    union = shapely.make_valid(shapely.union_all(polys.values))
    minx, _, maxx, _ = union.bounds
    if maxx - minx > 180:
        raise RegionError(
            f"region file {p} spans {maxx - minx:.0f} degrees of longitude: a region "
            "crossing the antimeridian is not supported; split it in two runs"
        )
    return Region(union, False)


def _num(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _box(b: Iterable[float]) -> str:
    return "[" + ", ".join(_num(v) for v in b) + "]"


def check_bbox(bbox: tuple[float, float, float, float] | list[float]) -> None:
    """Refuse a lon/lat bbox that is swapped, out of range, or looks projected (metres)."""
    order = "(min lon, min lat, max lon, max lat) in degrees, EPSG:4326"
    try:
        n = len(bbox)
    except TypeError:
        n = -1
    if n != 4:
        raise RegionError(f"bbox must have 4 numbers {order}, got {short(bbox)}")
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise RegionError(f"bbox {short(bbox)} must hold 4 numbers {order}") from None
    b = _box((x0, y0, x1, y1))
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise RegionError(f"bbox {b} holds a value that is not a finite number: give 4 numbers {order}")
    if any(abs(v) > 180 for v in (x0, x1)) or any(abs(v) > 90 for v in (y0, y1)):
        raise RegionError(
            f"bbox {b} is outside -180..180 / -90..90: it must be lon/lat degrees "
            "(EPSG:4326) in the order (min lon, min lat, max lon, max lat); projected "
            "coordinates (metres) are not accepted here"
        )
    if x0 == x1 or y0 == y1:
        raise RegionError(
            f"bbox {b} has min >= max: it has no width or no height; give a box {order} with min < max"
        )
    if x0 > x1 or y0 > y1:
        ylo, yhi = min(y0, y1), max(y0, y1)
        if x0 - x1 > 180:  # swapping would give a box around most of the globe
            parts = [p for p in ((x0, ylo, 180.0, yhi), (-180.0, ylo, x1, yhi)) if p[2] > p[0]]
            runs = " and ".join(_box(p) for p in parts)
            raise RegionError(
                f"bbox {b} has min lon > max lon ({_num(x0)} > {_num(x1)}): it seems to cross the "
                "antimeridian (180 degrees), which is not supported. "
                + (f"Split it in two runs, with bbox {runs}" if len(parts) > 1 else f"Use bbox {runs}")
                + f"; the order is {order}"
            )
        raise RegionError(
            f"bbox {b} has min >= max: the order is (min lon, min lat, max lon, max lat). "
            f"Did you mean {_box((min(x0, x1), ylo, max(x0, x1), yhi))}?"
        )
