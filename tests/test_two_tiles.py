"""Two adjacent source tiles end to end: one seamless zone, tiled COGs, a VRT and STAC items.

Tile A is the embedded real Sentinel-2 window (1024 x 1024 px, UTM 18N); tile B, just east of
it, is the same pixels mirrored left to right, written as real GeoTIFFs with their own
geotransform and served by the local STAC API as a second item. The run applies the demo
run's trained models (no training), writes its rasters in 512 px squares
(``runtime.block_px``) and publishes them on an output tile grid of 1024 px
(``publish.tile_px``), so every product of the 1024 x 2048 px zone is two COGs and a VRT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from pyproj import Transformer

from agriland_scale.pipeline.runner import run
from agriland_scale.store import reader

pytestmark = pytest.mark.slow

VIRGINIA = Path(__file__).parents[1] / "agriland_scale" / "data" / "virginia"
SIDE = 1024  # px a side of each source tile (10 m)


def _catalog(folder: Path) -> list[float]:
    """Items A (the real window) and B (its mirror, east of it); returns their lon/lat bbox."""
    folder.mkdir()
    item = json.loads((VIRGINIA / "item.json").read_text())
    x0, y0 = item["assets"]["red"]["proj:transform"][2], item["assets"]["red"]["proj:transform"][5]
    to_ll = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    lons, lats = [], []
    for name, shift in (("A", 0), ("B", SIDE * 10)):
        doc = json.loads(json.dumps(item))
        doc["id"] = f"virginia_{name}"
        # the 10 m bands the run reads (the 20 m SWIR files would need their own grid here)
        doc["assets"] = {k: a for k, a in doc["assets"].items() if a.get("gsd") == 10}
        for key, a in doc["assets"].items():
            src = (VIRGINIA / a["href"]).resolve()
            if shift:
                dst = folder / f"{name}_{src.name}"
                with rasterio.open(src) as ds:
                    profile = ds.profile | {
                        "tiled": True,
                        "blockxsize": 256,
                        "blockysize": 256,
                        "compress": "deflate",
                    }
                    profile["transform"] = ds.transform * rasterio.Affine.translation(SIDE, 0)
                    with rasterio.open(dst, "w", **profile) as out:
                        out.write(ds.read()[:, :, ::-1])
                src = dst
            a["href"] = str(src)
            a["proj:transform"] = [10.0, 0.0, x0 + shift, 0.0, -10.0, y0]
        ring = [
            (x0 + shift + dx, y0 - dy)
            for dx, dy in ((0, 0), (SIDE * 10, 0), (SIDE * 10, SIDE * 10), (0, SIDE * 10))
        ]
        ll = [to_ll.transform(x, y) for x, y in ring + ring[:1]]
        doc["geometry"] = {"type": "Polygon", "coordinates": [[list(p) for p in ll]]}
        doc["bbox"] = [
            min(p[0] for p in ll),
            min(p[1] for p in ll),
            max(p[0] for p in ll),
            max(p[1] for p in ll),
        ]
        doc["links"] = []
        lons += [p[0] for p in ll]
        lats += [p[1] for p in ll]
        (folder / f"item_{name}.json").write_text(json.dumps(doc))
    coll = json.loads((VIRGINIA / "collection.json").read_text())
    bbox = [min(lons), min(lats), max(lons), max(lats)]
    coll["extent"]["spatial"]["bbox"] = [bbox]
    (folder / "collection.json").write_text(json.dumps(coll))
    # inside the two tiles, clear of their outer edges (the output grid snaps outwards)
    inner = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    lo, la = inner.transform([x0 + 15, x0 + 2 * SIDE * 10 - 15], [y0 - SIDE * 10 + 15, y0 - 15])
    return [lo[0], la[0], lo[1], la[1]]


@pytest.fixture(scope="module")
def two_tiles(demo_run, external_cluster, tmp_path_factory):
    cfg, demo_out, record = demo_run
    tmp = tmp_path_factory.mktemp("two-tiles")
    bbox = _catalog(tmp / "catalog")
    two = cfg.with_overrides(
        **{
            "name": "two-tiles",
            "search.catalog": str(tmp / "catalog"),
            "search.bbox": bbox,
            "embed.model": record["cae"]["encoder_path"],
            "segment.model": record["unet"]["model_path"],
            "runtime.block_px": 512,
            "publish.tile_px": 1024,
        }
    )
    out = tmp / "out"
    return out, run(two, out, scheduler=external_cluster, report=print)


def test_the_two_tiles_make_one_seamless_zone(two_tiles):
    out, record = two_tiles
    assert list(record["zones"]) == ["utm18n"] and len(record["inputs"]["items"]) == 2
    cube = xr.open_zarr(reader(out), group="cube", consolidated=False)
    x0 = json.loads((VIRGINIA / "item.json").read_text())["assets"]["red"]["proj:transform"][2]
    e = int(np.searchsorted(cube["x"].values, x0 + SIDE * 10))  # the first column of tile B
    k = min(e, cube.sizes["x"] - e)
    assert k > SIDE - 8 and abs(cube.sizes["y"] - SIDE) < 8, dict(cube.sizes)
    # every asset placed by its own geotransform: B is A mirrored about the tiles' edge
    red = cube["reflectance"].sel(band="red").values
    west, east = red[:, e - k : e][:, ::-1], red[:, e : e + k]
    both = np.isfinite(west) & np.isfinite(east)
    assert both.mean() > 0.95
    np.testing.assert_array_equal(west[both], east[both])
    seg = xr.open_zarr(reader(out), group="segmentation", consolidated=False)
    p = seg["probability"].values
    clear = cube["clear_count"].values > 0
    # no seam: the columns on both sides of the tiles' edge are predicted where they are clear
    edge = slice(e - 2, e + 2)
    assert np.isfinite(p[:, edge][clear[:, edge]]).all() and clear[:, edge].mean() > 0.9
    assert set(seg["probability"].chunks[1][:-1]) == {512}  # written in 512 px squares
    blocks = record["zones"]["utm18n"]["segmentation_blocks"]["blocks"]
    assert blocks == len(seg["probability"].chunks[0]) * len(seg["probability"].chunks[1]) >= 8


def test_tiled_cogs_and_their_vrt_cover_the_zone_exactly(two_tiles):
    out, _ = two_tiles
    seg = xr.open_zarr(reader(out), group="segmentation", consolidated=False, mask_and_scale=False)
    stored = seg["probability"].values  # uint8, 255 = nodata
    tiles = sorted((out / "cog" / "probability").glob("probability_r*_c*.tif"))
    assert [t.name for t in tiles][:2] == ["probability_r000_c000.tif", "probability_r000_c001.tif"]
    with rasterio.open(out / "cog" / "probability.vrt") as vrt:
        assert (vrt.height, vrt.width) == stored.shape and vrt.crs.to_epsg() == 32618
        np.testing.assert_array_equal(vrt.read(1), stored)
        cube = xr.open_zarr(reader(out), group="cube", consolidated=False)
        assert tuple(vrt.transform)[:6] == tuple(cube.rio.transform())[:6]
    with rasterio.open(tiles[0]) as ds:
        assert (ds.height, ds.width) == (1024, 1024) and ds.overviews(1)  # a COG with overviews


def test_one_stac_item_a_tile_covering_the_zone(two_tiles):
    import pystac

    out, _ = two_tiles
    coll = pystac.Collection.from_file(str(out / "stac" / "collection.json"))
    tiles = [i for i in coll.get_items(recursive=True) if "agriland:tile" in i.properties]
    prob = sorted(
        (
            i
            for i in tiles
            if i.properties["agriland:tile"]["product"] == "probability"
            and i.properties["agriland:tile"]["row"] == 0
        ),
        key=lambda i: i.properties["agriland:tile"]["col"],
    )
    assert len(prob) >= 2
    from shapely.geometry import shape

    west, east = (shape(i.geometry) for i in prob[:2])
    # adjacent: they share their edge, with no gap and no overlap (in lon/lat their bboxes do
    # overlap: a UTM square is not one in lon/lat)
    assert west.intersection(east).area < 1e-6 * west.area and west.distance(east) < 1e-9
    assert "probability-vrt" in coll.assets


def test_the_tiles_are_the_runs_files_linked_and_inspected(two_tiles):
    """The tile COGs and VRTs are recorded as the run's files (so ``--force``/``--overwrite``
    remove them, object storage mirrors them), linked in the report and listed by inspect."""
    from agriland_scale.publish.inspect import summarise_run

    out, record = two_tiles
    files = set(record["files"]["publish"])
    assert {"cog/probability.vrt", "cog/probability/probability_r000_c000.tif", "cog/mask.vrt"} <= files, (
        files
    )
    html = (out / "report.html").read_text()
    assert 'href="cog/probability.vrt"' in html and "tile COGs" in html
    rows = {r["path"]: r for r in summarise_run(out)["products"]}
    assert rows["cog/probability.vrt"]["exists"] and "cog/probability.tif" not in rows
