"""Raster products at region scale: COGs on a fixed output tile grid, written by the workers.

A product raster (a zone's probability, mask or cluster map) that fits one output tile
(``publish.tile_px`` a side, :data:`TILE_PX` by default) leaves as one COG, as it always
has. A larger one is cut on the zone's output tile grid: tiles of ``tile_px`` x ``tile_px``
pixels from the raster's top-left corner (the last row and column of tiles are smaller), one
COG per tile, and a GDAL VRT over them::

    OUT/cog/probability.tif                          small: one COG
    OUT/cog/utm18n_probability.vrt                   large: the VRT of the product and zone ...
    OUT/cog/utm18n_probability/utm18n_probability_r000_c001.tif   ... over one COG a tile

Each tile is written by a task on a worker (:func:`write_window`: the window read from the
store, a COG with internal overviews, the same dtype, nodata, scale, colour table,
description and unit as the one-file COG), which returns the file's bytes (workers may share
no filesystem with the client); the client writes them into the run folder and, once a
product's tiles are all there, its VRT (:func:`write_vrt`, plain XML: no GDAL Python
bindings or ``gdalbuildvrt`` needed; sources relative to the VRT, so the folder can move).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from agriland_scale.layout import COG_DIR
from agriland_scale.publish.cog import PRODUCT_VARIABLES, write_product_cog

__all__ = [
    "TILE_PX",
    "CogJob",
    "Tile",
    "cog_jobs",
    "tile_grid",
    "tile_of",
    "tile_rel",
    "tiled_products",
    "write_vrt",
    "write_window",
]

TILE_PX = 4096  # the output tiles' side, pixels (publish.tile_px): a multiple of the COGs' 512 px blocks

_TILE_NAME = re.compile(r"^(?P<stem>.+)_r(?P<row>\d{3,})_c(?P<col>\d{3,})$")


@dataclass(frozen=True)
class Tile:
    """One output tile: its row and column in the grid and its pixel window ``[y0:y1, x0:x1]``."""

    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int


def tile_grid(height: int, width: int, tile_px: int = TILE_PX) -> list[Tile]:
    """Cut a ``height`` x ``width`` raster into tiles of ``tile_px`` a side, row by row.

    The tiles cover the raster exactly, without overlap; the last row and column are cut
    short by the raster's edge. A raster that fits one tile gives one tile.
    """
    if tile_px < 1:
        raise ValueError(f"tile_px must be positive, got {tile_px}")
    return [
        Tile(r, c, y0, min(y0 + tile_px, height), x0, min(x0 + tile_px, width))
        for r, y0 in enumerate(range(0, height, tile_px))
        for c, x0 in enumerate(range(0, width, tile_px))
    ]


def tile_rel(stem: str, tile: Tile) -> str:
    """``cog/STEM/STEM_rRRR_cCCC.tif``: where a tile's COG goes, relative to OUT."""
    return f"{COG_DIR}/{stem}/{stem}_r{tile.row:03d}_c{tile.col:03d}.tif"


def tile_of(path: str | Path) -> tuple[str, int, int] | None:
    """``.../STEM_r000_c001.tif`` -> ``(STEM, 0, 1)``; None for a name that is not a tile's."""
    m = _TILE_NAME.match(Path(path).stem)
    return (m["stem"], int(m["row"]), int(m["col"])) if m else None


def write_window(
    store: Any,
    group: str,
    product: str,
    k: int,
    window: tuple[int, int, int, int] | None,
    rel: str,
    out_dir: str,
) -> None:
    """Write product ``product`` of ``group`` (its ``window`` ``(y0, y1, x0, x1)``, or all) as a COG.

    Runs on a worker: the window is read from the store without dask (lazily indexed: only
    its Zarr chunks, ``rows`` at a time), written to ``out_dir/rel`` by
    :func:`~.cog.write_product_cog`.
    """
    from agriland_scale.store import open_cube

    da = open_cube(store, group, dask=False)[PRODUCT_VARIABLES[product][1]]
    if window is not None:
        y0, y1, x0, x1 = window
        da = da.isel(y=slice(y0, y1), x=slice(x0, x1))
    write_product_cog(da, Path(out_dir) / rel, product, k=k)


@dataclass(frozen=True)
class CogJob:
    """One COG to write: the product, its zone's group, its output tile (None: the whole raster), where it goes."""

    stem: str
    product: str
    group: str
    tile: Tile | None
    rel: str


def cog_jobs(
    stem: str, product: str, group: str, height: int, width: int, tile_px: int = TILE_PX
) -> list[CogJob]:
    """Plan the COGs of one product raster: one file when it fits a tile, else one a tile.

    ``stem`` is the file name without suffix (zone-tagged in multi-zone runs), ``group`` the
    product's Zarr group (``utm18n/segmentation``).
    """
    if height <= tile_px and width <= tile_px:
        return [CogJob(stem, product, group, None, f"{COG_DIR}/{stem}.tif")]
    return [CogJob(stem, product, group, t, tile_rel(stem, t)) for t in tile_grid(height, width, tile_px)]


def _colour_table(cmap: dict[int, tuple[int, ...]]) -> str:
    last = max(cmap) if cmap else -1
    entries = "".join(
        '<Entry c1="{}" c2="{}" c3="{}" c4="{}"/>'.format(*(tuple(cmap.get(i, (0, 0, 0, 0))) + (255,))[:4])
        for i in range(last + 1)
    )
    return f"<ColorTable>{entries}</ColorTable>"


_GDAL_TYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "float32": "Float32",
    "float64": "Float64",
}


def write_vrt(path: str | Path, tiles: list[tuple[str, Tile]]) -> None:
    """Write a GDAL VRT at ``path`` that mosaics the tile COGs ``tiles`` (path relative to the VRT's folder, tile).

    Its grid is the tiles' (the first tile's georeferencing, shifted to the grid's corner);
    its band the tiles' dtype, nodata, scale/offset, description, unit and colour table (read
    from the first tile). Sources are relative to the VRT; GDAL reads the tiles' own
    overviews through it. Written to a temporary name, then renamed.
    """
    import rasterio
    from rasterio.transform import Affine

    from agriland_scale.files import atomic_path

    path = Path(path)
    first_rel, first = min(tiles, key=lambda t: (t[1].y0, t[1].x0))
    with rasterio.open(path.parent / first_rel) as src:
        crs, dtype, nodata = src.crs, src.dtypes[0], src.nodata
        t = src.transform @ Affine.translation(-first.x0, -first.y0)
        scale, offset = src.scales[0], src.offsets[0]
        desc, unit = src.descriptions[0], src.units[0]
        block = src.block_shapes[0]
        try:
            cmap: dict[int, tuple[int, ...]] | None = src.colormap(1)
        except ValueError:  # no colour table
            cmap = None
    height = max(tl.y1 for _, tl in tiles)
    width = max(tl.x1 for _, tl in tiles)
    gdal_type = _GDAL_TYPES[dtype]
    band = [f'<VRTRasterBand dataType="{gdal_type}" band="1">']
    if nodata is not None:
        band.append(
            f"<NoDataValue>{nodata!r}</NoDataValue>" if nodata == nodata else "<NoDataValue>nan</NoDataValue>"
        )
    if desc:
        band.append(f"<Description>{escape(desc)}</Description>")
    if unit:
        band.append(f"<UnitType>{escape(unit)}</UnitType>")
    if (scale, offset) != (1.0, 0.0):
        band.append(f"<Offset>{offset!r}</Offset><Scale>{scale!r}</Scale>")
    if cmap:
        band.append("<ColorInterp>Palette</ColorInterp>" + _colour_table(cmap))
    else:
        band.append("<ColorInterp>Gray</ColorInterp>")
    for rel, tl in sorted(tiles, key=lambda x: (x[1].y0, x[1].x0)):
        h, w = tl.y1 - tl.y0, tl.x1 - tl.x0
        band.append(
            "<SimpleSource>"
            f'<SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>'
            "<SourceBand>1</SourceBand>"
            f'<SourceProperties RasterXSize="{w}" RasterYSize="{h}" DataType="{gdal_type}" '
            f'BlockXSize="{block[1]}" BlockYSize="{block[0]}"/>'
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{tl.x0}" yOff="{tl.y0}" xSize="{w}" ySize="{h}"/>'
            "</SimpleSource>"
        )
    band.append("</VRTRasterBand>")
    gt = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    xml = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt())}</SRS>\n'
        f"  <GeoTransform>{gt}</GeoTransform>\n  " + "\n  ".join(band) + "\n</VRTDataset>\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(xml, encoding="utf-8")


def tiled_products(cog_dir: str | Path) -> dict[str, list[tuple[Path, int, int]]]:
    """Find the tiled products of a run's ``cog`` folder: ``{stem: [(tile COG, row, col), ...]}``.

    A product is tiled when ``cog/STEM.vrt`` exists; its tiles are ``cog/STEM/STEM_r*_c*.tif``.
    """
    cog_dir = Path(cog_dir)
    found: dict[str, list[tuple[Path, int, int]]] = {}
    for vrt in sorted(cog_dir.glob("*.vrt")):
        tiles = []
        for p in sorted((cog_dir / vrt.stem).glob(f"{vrt.stem}_r*_c*.tif")):
            got = tile_of(p)
            if got is not None and got[0] == vrt.stem:
                tiles.append((p, got[1], got[2]))
        found[vrt.stem] = tiles
    return found
