import numpy as np
import pytest
import rasterio
import xarray as xr

from agriland_scale.config.schema import CubeConfig
from agriland_scale.cube.load import cube_geobox, load_cube
from agriland_scale.errors import BandMismatch, NoItemsFound

from .conftest import ORIGIN_X, ORIGIN_Y, SIZE, VIRGINIA


def test_cube_grid_matches_input(cube):
    assert cube.rio.crs.to_epsg() == 32618
    t = cube.rio.transform()
    assert (t.a, t.e, t.c, t.f) == (10.0, -10.0, ORIGIN_X, ORIGIN_Y)
    assert cube.sizes["y"] == cube.sizes["x"] == SIZE
    assert cube["reflectance"].dims == ("band", "y", "x")
    assert cube["reflectance"].chunks[1][0] == 256


def test_cube_values_are_scaled_source_pixels(cube):
    with rasterio.open(VIRGINIA / "B04.tif") as ds:
        raw = ds.read(1, window=((100, 110), (200, 210)))
    got = cube["reflectance"].sel(band="red").isel(y=slice(100, 110), x=slice(200, 210)).values
    np.testing.assert_allclose(got, raw * 1e-4, rtol=1e-6)
    assert int(cube["clear_count"].min()) == 1


def test_zarr_reopens_with_crs_without_options(cube_store):
    ds = xr.open_zarr(cube_store, group="cube", consolidated=False)
    assert ds.rio.crs.to_epsg() == 32618
    assert ds["reflectance"].rio.crs.to_epsg() == 32618


def test_missing_band(items, demo_cfg):
    with pytest.raises(BandMismatch, match="swir16"):
        load_cube(items, CubeConfig(bands=["red", "swir16"]), demo_cfg.search.bbox)


def test_bbox_outside_items(items):
    with pytest.raises(NoItemsFound, match="does not overlap"):
        cube_geobox(items, (-75.0, 37.0, -74.9, 37.1), 10)


def test_region_inside_item_is_cropped_on_grid(items):
    gb = cube_geobox(items, (-75.68, 37.64, -75.62, 37.69), 10)
    assert gb.transform.c % 10 == 0 and gb.transform.f % 10 == 0
    assert gb.shape[0] < SIZE and gb.shape[1] < SIZE
