"""End-to-end over three UTM zones (real samples in 18N, 29N, 33N) on the real external cluster."""

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


@pytest.fixture(scope="module")
def zones_run(external_cluster, tmp_path_factory):
    cfg = load_config(PIPELINE)
    out = tmp_path_factory.mktemp("zones")
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
