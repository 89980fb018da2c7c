"""End-to-end over three UTM zones (real samples in 18N, 29N, 33N) on the real external cluster."""

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from agriland_scale import load_config
from agriland_scale.pipeline.runner import run
from agriland_scale.store import reader

PIPELINE = Path(__file__).parent / "data" / "three-zones" / "pipeline.yaml"
ZONES = {"utm18n": 32618, "utm29n": 32629, "utm33n": 32633}


# A Western Sahara region cut to what the tests check, for a faster run: 192 x 256 px at 20 m
# in UTM 29N (3 x 4 cube chunks of 64 px, on the item's pixel grid) with two chunks that SCL
# masking leaves without a clear pixel, and five valid patches (more than Virginia's four: the
# CAE still learns from the half-cloudy zone). The pipeline file's polygon there gives 394 x
# 360 px (42 chunks, 2.9 times the pixels); Virginia and Austria are the file's polygons.
SAHARA_UTM29N = (292340.0, 2784500.0, 297460.0, 2788340.0)  # left, bottom, right, top (m)


def _small_region(folder: Path) -> Path:
    """The pipeline's region file with its 29N polygon replaced by ``SAHARA_UTM29N``, inset by
    2 m (the cube snaps outwards to the 20 m grid) and densified (straight in UTM, not in
    lon/lat)."""
    from pyproj import Transformer

    doc = json.loads((PIPELINE.parent / "region.geojson").read_text())
    (sahara,) = [f for f in doc["features"] if f["properties"]["name"] == "western-sahara"]
    x0, y0, x1, y1 = SAHARA_UTM29N
    x0, y0, x1, y1 = x0 + 2, y0 + 2, x1 - 2, y1 - 2
    t = np.linspace(0, 1, 33)[:-1]
    ring = [
        *[(x0 + (x1 - x0) * f, y0) for f in t],
        *[(x1, y0 + (y1 - y0) * f) for f in t],
        *[(x1 - (x1 - x0) * f, y1) for f in t],
        *[(x0, y1 - (y1 - y0) * f) for f in t],
    ]
    to_ll = Transformer.from_crs("EPSG:32629", "EPSG:4326", always_xy=True)
    lonlat = [list(to_ll.transform(x, y)) for x, y in ring]
    sahara["geometry"] = {"type": "Polygon", "coordinates": [lonlat + lonlat[:1]]}
    path = folder / "region.geojson"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def zones_run(external_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zones")
    cfg = load_config(PIPELINE).with_overrides(**{"search.region": str(_small_region(tmp))})
    out = tmp / "out"
    return cfg, out, run(cfg, out, scheduler=external_cluster, report=print)


@pytest.mark.slow
def test_each_zone_published_in_its_native_crs(zones_run):
    cfg, out, record = zones_run
    store = reader(out)
    tree = xr.open_datatree(store, engine="zarr")
    assert set(ZONES) | {"mosaic"} == set(tree.children)
    for zone, epsg in ZONES.items():
        cube = xr.open_zarr(store, group=f"{zone}/cube")
        seg = xr.open_zarr(store, group=f"{zone}/segmentation")
        assert cube.rio.crs.to_epsg() == epsg and seg.rio.crs.to_epsg() == epsg
        assert seg.rio.transform() == cube.rio.transform()  # nothing resampled across zones
        p = seg["probability"].values
        clear = cube["clear_count"].values > 0
        assert np.isfinite(p[clear]).all() and np.isnan(p[~clear]).all()
        assert 0 <= np.nanmin(p) and np.nanmax(p) <= 1
        with rasterio.open(out / "cog" / f"{zone}_probability.tif") as ds:
            assert ds.crs.to_epsg() == epsg
        assert record["zones"][zone]["epsg"] == epsg
    # the 29N sample is half cloud: SCL masking leaves whole chunks empty, and they are counted
    assert record["zones"]["utm29n"]["empty_chunks"] > 0
    assert record["unet"]["zone"] == "utm18n"  # the labels are in Virginia


@pytest.mark.slow
def test_one_clustering_over_all_zones(zones_run):
    cfg, out, record = zones_run
    store = reader(out)
    cents = [xr.open_zarr(store, group=f"{z}/clusters")["centroids"].values for z in ZONES]
    for c in cents[1:]:
        np.testing.assert_array_equal(c, cents[0])
    labels = np.concatenate([xr.open_zarr(store, group=f"{z}/clusters")["labels"].values for z in ZONES])
    assert sum(record["clusters"]["sizes"]) == (labels >= 0).sum() == record["patches"]["valid"]


@pytest.mark.slow
def test_optional_mosaic_in_one_crs(zones_run):
    _, out, _ = zones_run
    m = xr.open_zarr(reader(out), group="mosaic")
    assert m.rio.crs.to_epsg() == 4326
    assert np.isfinite(m["probability"].values).sum() > 0
