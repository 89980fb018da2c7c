"""Ingest at region scale on three real samples (UTM 18N L1C, 29N L2A with SCL, 33N L2A without
proj:* fields), served by a real local STAC API: zones, SCL masking, item flavours, bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import dask
import numpy as np
import pystac
import pytest
import rasterio

from agriland_scale.config.bands import canonical_band
from agriland_scale.config.region import Region, read_region_file
from agriland_scale.config.schema import CubeConfig, SearchConfig
from agriland_scale.cube.assets import check_assets
from agriland_scale.cube.describe import describe_search
from agriland_scale.cube.load import load_cube, load_zone_cubes
from agriland_scale.cube.masks import check_not_empty
from agriland_scale.errors import AgrilandWarning, BandMismatch, CorruptInput, EmptyRegion, RegionError
from agriland_scale.search.items import normalize_items, scale_offset
from agriland_scale.search.stac import local_stac_api, region_of, search_items

DATA = Path(__file__).parent / "data"
THREE = DATA / "three-zones"
L2A = DATA / "l2a-29rkh"


@pytest.fixture(scope="module")
def three_search() -> SearchConfig:
    return SearchConfig(
        api="local",
        catalog=str(THREE),
        collections=["agriland-test-samples"],
        region=str(THREE / "region.geojson"),
    )


@pytest.fixture(scope="module")
def three_items(three_search):
    with local_stac_api(three_search.catalog) as url:
        return search_items(three_search, url)


@pytest.fixture(scope="module")
def l2a_item() -> pystac.Item:
    return pystac.Item.from_file(str(L2A / "item.json"))


def _compute(obj):
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return obj.compute()


def test_polygon_region_searched_with_intersects(three_items):
    """Three polygons far apart: the server's `intersects` finds one item under each."""
    assert sorted(i.id for i in three_items) == [
        "S2A_29RKH_20200219_0_L2A_window",
        "S2_L1C_18S_virginia_demo_window",
        "S2_L2A_33U_austria_window_a",
    ]


def test_three_zones_each_in_its_native_crs(three_items, three_search):
    region = region_of(three_search)
    cubes = load_zone_cubes(three_items, CubeConfig(resolution=20, chunk=128), region)
    assert sorted(cubes) == [32618, 32629, 32633]
    for epsg, cube in cubes.items():
        assert cube.rio.crs.to_epsg() == epsg
        t = cube.rio.transform()
        item = next(i for i in three_items if i.id == cube.attrs["items"][0])
        with rasterio.open(item.assets[next(k for k in item.assets if k in ("red", "B04"))].href) as src:
            st = src.transform  # the cube's pixel edges fall on the source's pixel edges
        step = min(st.a, t.a)
        assert t.a == 20 and t.e == -20 and (t.c - st.c) % step == 0 and (st.f - t.f) % step == 0
        assert len(cube.attrs["items"]) == 1
        # every cube lies inside its polygon's bounds (+ one pixel), nothing beyond
        poly = region.to_crs(f"EPSG:{epsg}")
        left, b, r, tp = cube.rio.bounds()
        px0, py0, px1, py1 = poly.bounds
        assert left >= px0 - 20 and b >= py0 - 20 and r <= px1 + 20 and tp <= py1 + 20
    cc = _compute(cubes[32618]["clear_count"]).values
    # pixels of the bounding grid outside the (slightly rotated in UTM) polygon are nodata
    assert 0.9 < (cc > 0).mean() < 1.0


@pytest.mark.parametrize("method", ["median", "mean"])
def test_an_encoded_cube_stores_what_the_float_cube_stores(three_items, three_search, tmp_path, method):
    """``load_cube(encoded=True)`` (what the cube stage writes: int16 computed in integers,
    no float pass) stores bit for bit what writing the float32 composite stores, with the
    same attributes, on real data with SCL-masked clouds and nodata outside the polygon."""
    import zarr

    from agriland_scale.store import open_cube, write_group

    region = region_of(three_search)
    cfg = CubeConfig(resolution=20, chunk=128, composite=method)
    stores = {}
    for encoded in (False, True):
        cubes = load_zone_cubes(three_items, cfg, region, encoded=encoded)
        for epsg, cube in cubes.items():
            stores[encoded, epsg] = str(tmp_path / f"{encoded}-{epsg}.zarr")
            if encoded:
                assert cube["reflectance"].dtype == np.int16 and "scale_factor" in cube["reflectance"].attrs
            with dask.config.set(scheduler="synchronous"):
                write_group(cube, stores[encoded, epsg], "cube")
    masked = 0
    for epsg in (32618, 32629, 32633):
        a = zarr.open_group(stores[False, epsg], mode="r", path="cube")["reflectance"]
        b = zarr.open_group(stores[True, epsg], mode="r", path="cube")["reflectance"]
        assert b.dtype == a.dtype == np.int16 and b.fill_value == a.fill_value == -32768
        np.testing.assert_array_equal(b[:], a[:])
        assert dict(b.attrs) == dict(a.attrs)
        masked += int((a[:] == -32768).sum())
        assert open_cube(stores[True, epsg]).identical(open_cube(stores[False, epsg]))
    assert masked > 0  # clouds and the polygon's outside were compared too


def test_search_summary_lists_every_zone(three_items, three_search):
    info = describe_search(three_items, ["red", "green", "blue", "nir"], region_of(three_search), 20)
    assert set(info["zones"]) == {"EPSG:32618", "EPSG:32629", "EPSG:32633"}
    assert all("error" not in z and z["pixels"] > 0 for z in info["zones"].values())
    # Austria has no proj:* fields: its zone comes from its files' headers
    assert {r["epsg"] for r in info["items"]} == {32618, 32629, 32633}


def test_item_without_proj_fields_is_read_from_its_files():
    item = pystac.Item.from_file(str(THREE / "item_33n.json"))
    assert "proj:epsg" not in item.properties and "B04" in item.assets
    (norm,) = normalize_items([item], ["red", "nir"])
    assert set(norm.assets) == {"red", "green", "blue", "nir"}  # Planetary-Computer keys -> common
    assert norm.properties["proj:epsg"] == 32633
    with rasterio.open(DATA / "austria-33n" / "B04.tif") as ds:
        assert norm.assets["red"].extra_fields["proj:shape"] == [ds.height, ds.width]
        assert norm.assets["red"].extra_fields["proj:transform"] == list(ds.transform)[:6]


def test_band_aliases_and_missing_band(l2a_item):
    assert (
        canonical_band("B04") == "red" and canonical_band("SCL") == "scl" and canonical_band("nir") == "nir"
    )
    with pytest.raises(BandMismatch, match=r"S2A_29RKH_20200219_0_L2A_window.*rededge1"):
        normalize_items([l2a_item], ["red", "rededge1"])


def test_scale_and_offset_from_every_flavour(l2a_item):
    assert scale_offset(l2a_item, "red") == (1e-4, 0.0)  # Earth Search v1 raster:bands
    v1_2022 = l2a_item.clone()
    v1_2022.assets["red"].extra_fields["raster:bands"][0]["offset"] = -0.1
    assert scale_offset(v1_2022, "red") == (1e-4, -0.1)
    pc = l2a_item.clone()  # Planetary Computer: no raster:bands, baseline decides the offset
    del pc.assets["red"].extra_fields["raster:bands"]
    pc.properties["s2:processing_baseline"] = "05.09"
    assert scale_offset(pc, "red") == (1e-4, -0.1)
    pc.properties["s2:processing_baseline"] = "03.01"
    assert scale_offset(pc, "red") == (1e-4, 0.0)
    assert scale_offset(l2a_item, "scl") == (1.0, 0.0)


def _l2a_cube(**cube_kw):
    cfg = CubeConfig(bands=["red", "green", "blue", "nir"], resolution=100, chunk=128, **cube_kw)
    bbox = pystac.Item.from_file(str(L2A / "item.json")).bbox
    return load_cube([pystac.Item.from_file(str(L2A / "item.json"))], cfg, bbox)


def test_scl_masks_exactly_the_configured_classes():
    cube = _compute(_l2a_cube())
    with rasterio.open(L2A / "SCL.tif") as ds:  # 200 m: each SCL pixel covers 2 x 2 cube pixels
        scl = ds.read(1).repeat(2, 0).repeat(2, 1)
    assert cube.sizes["y"] == scl.shape[0] and cube.sizes["x"] == scl.shape[1]
    cloudy = np.isin(scl, [0, 1, 3, 8, 9, 10])
    assert 0.3 < cloudy.mean() < 0.7  # the window was chosen half cloudy
    np.testing.assert_array_equal(cube["clear_count"].values == 0, cloudy)
    assert np.isnan(cube["reflectance"].values[:, cloudy]).all()
    with rasterio.open(L2A / "B04.tif") as ds:  # clear pixels: DN * 1e-4, unchanged
        red = ds.read(1) * 1e-4
    np.testing.assert_allclose(cube["reflectance"].sel(band="red").values[~cloudy], red[~cloudy], rtol=1e-6)


def test_scl_dilation_grows_the_mask_by_the_distance():
    plain = _compute(_l2a_cube())["clear_count"].values == 0
    grown = _compute(_l2a_cube(scl_dilation_m=300))["clear_count"].values == 0
    assert (grown >= plain).all() and grown.sum() > plain.sum()
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~plain) * 100  # metres to the nearest masked pixel
    assert not grown[dist > 300].any() and grown[(dist > 0) & (dist <= 300)].all()


def test_mixed_resolution_band_resampled_to_the_grid():
    cfg = CubeConfig(bands=["red", "swir16"], resolution=100, chunk=128, cloud_mask=False)
    item = pystac.Item.from_file(str(L2A / "item.json"))
    cube = _compute(load_cube([item], cfg, item.bbox))
    swir = cube["reflectance"].sel(band="swir16").values
    assert swir.shape == (256, 256) and np.isfinite(swir).all()
    with rasterio.open(L2A / "B11.tif") as ds:
        src = ds.read(1) * 1e-4
    # bilinear upsampling 2x preserves the block means closely
    means = swir.reshape(128, 2, 128, 2).mean((1, 3))
    assert np.median(np.abs(means - src)) < 0.01


def test_all_cloud_region_is_refused():
    cube = _l2a_cube(scl_mask_classes=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    with pytest.raises(EmptyRegion, match="every pixel"):
        with dask.config.set(scheduler="synchronous"):
            check_not_empty(cube)


def test_truncated_asset_fails_or_is_skipped(tmp_path, l2a_item):
    bad = tmp_path / "l2a"
    shutil.copytree(L2A, bad)
    data = (bad / "B04.tif").read_bytes()
    (bad / "B04.tif").write_bytes(data[: len(data) // 2])  # a download cut in the middle
    item = pystac.Item.from_file(str(bad / "item.json"))
    good = pystac.Item.from_file(str(THREE / "item_18n.json"))
    with pytest.raises(CorruptInput, match=r"S2A_29RKH_20200219_0_L2A_window.*'red'.*on_bad_asset: skip"):
        check_assets([item], ["red", "green"], "fail")
    with pytest.warns(AgrilandWarning, match="skipping item S2A_29RKH"):
        kept, skipped = check_assets([good, item], ["red", "green"], "skip")
    assert [i.id for i in kept] == [good.id]
    assert skipped[0]["asset"] == "red" and skipped[0]["href"].endswith("B04.tif")


def test_region_file_errors(tmp_path):
    anti = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[179, 0], [-179, 0], [-179, 1], [179, 1], [179, 0]]],
                },
            }
        ],
    }
    (tmp_path / "anti.geojson").write_text(json.dumps(anti))
    with pytest.raises(RegionError, match="antimeridian"):
        read_region_file(tmp_path / "anti.geojson")
    with pytest.raises(RegionError, match="does not exist"):
        read_region_file(tmp_path / "missing.geojson")
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(CorruptInput, match="bad.geojson"):
        read_region_file(tmp_path / "bad.geojson")
    with pytest.raises(RegionError, match="min >= max"):
        Region.from_bbox((10, 50, 9, 51))


def test_region_as_geoparquet(tmp_path):
    import geopandas as gpd

    df = gpd.read_file(THREE / "region.geojson").to_crs(32633)  # another CRS on purpose
    df.to_parquet(tmp_path / "region.parquet")
    a, b = read_region_file(THREE / "region.geojson"), read_region_file(tmp_path / "region.parquet")
    assert a.geometry.symmetric_difference(b.geometry).area < 1e-9


@pytest.mark.parametrize("name", ["earth-search.yaml", "planetary-computer.yaml"])
def test_public_api_pipelines_are_valid(name):
    from agriland_scale import load_config

    cfg = load_config(Path(__file__).parents[1] / "pipelines" / name)
    assert cfg.search.api.startswith("https://") and cfg.cube.bands == ["red", "green", "blue", "nir"]


def _online(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


@pytest.mark.network
@pytest.mark.parametrize("name", ["earth-search.yaml", "planetary-computer.yaml"])
def test_public_api_search(name):
    """Search the real public API (skipped offline): items in one zone with their sizes."""
    from agriland_scale import load_config

    cfg = load_config(Path(__file__).parents[1] / "pipelines" / name)
    if not _online(cfg.search.api):
        pytest.skip(f"{cfg.search.api} not reachable (offline)")
    items = search_items(cfg.search, cfg.search.api)
    info = describe_search(items, cfg.cube.bands, region_of(cfg.search), cfg.cube.resolution)
    assert items and all(z.get("pixels", 0) > 0 for z in info["zones"].values())
