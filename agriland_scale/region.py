"""The region of a run: a lon/lat bbox, or polygons from a GeoJSON / GeoParquet file.

The region is held in EPSG:4326. Each UTM zone's cube covers the part of the region inside
that zone's items; pixels outside the polygons are nodata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import box, mapping
from shapely.geometry.base import BaseGeometry

from .errors import CorruptInput, RegionError

__all__ = ["Region", "read_region_file"]


@dataclass(frozen=True)
class Region:
    """A region in EPSG:4326: ``geometry`` (polygons) and whether it is just a bbox."""

    geometry: BaseGeometry
    is_box: bool = True

    @classmethod
    def from_bbox(cls, bbox) -> Region:
        from .config import check_bbox

        check_bbox(bbox)
        return cls(box(*bbox), True)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(min lon, min lat, max lon, max lat) in degrees."""
        return tuple(float(v) for v in self.geometry.bounds)  # type: ignore[return-value]

    def geojson(self) -> dict:
        return mapping(self.geometry)

    def to_crs(self, crs) -> BaseGeometry:
        """The region's geometry in ``crs`` (anything pyproj accepts)."""
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
        raise RegionError(f"region file {p} holds no polygons (found {sorted(set(geom.geom_type))}): "
                          f"the region is an area; {give}")
    union = shapely.make_valid(shapely.union_all(polys.values))
    minx, _, maxx, _ = union.bounds
    if maxx - minx > 180:
        raise RegionError(f"region file {p} spans {maxx - minx:.0f} degrees of longitude: a region "
                          "crossing the antimeridian is not supported; split it in two runs")
    return Region(union, False)
