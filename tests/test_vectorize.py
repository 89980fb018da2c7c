"""Field polygons from a mask: blockwise vectorisation equals the whole-image one, on the
real demo grid with the hand-digitised label polygons rasterised onto it."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from agriland_scale.config.files import resolve_path
from agriland_scale.labels.raster import load_labels
from agriland_scale.publish.vector import vectorize_mask, write_fields
from agriland_scale.store import write_georef


@pytest.fixture(scope="module")
def mask(cube):
    lab = load_labels(resolve_path("builtin:virginia/labels.geojson", None), cube, ["arable"])
    ds = xr.Dataset({"mask": (("y", "x"), lab.values.astype("uint8"))}, coords={"y": cube.y, "x": cube.x})
    return write_georef(ds, cube.rio.crs)["mask"]


def test_blocks_merge_into_the_whole_image_polygons(mask):
    whole = vectorize_mask(mask, block=4096)
    tiled = vectorize_mask(mask, block=200)  # 6 x 6 blocks, many fields cut by block borders
    n_px = int((mask.values == 1).sum())
    assert len(whole) > 20 and n_px > 0
    assert whole.crs == mask.rio.crs
    np.testing.assert_allclose(whole["area_m2"].sum(), n_px * 100.0)  # 10 m pixels, exact edges
    assert len(tiled) == len(whole)
    np.testing.assert_allclose(np.sort(tiled["area_m2"].values), np.sort(whole["area_m2"].values))
    assert whole.geometry.is_valid.all() and tiled.geometry.is_valid.all()
    # the same shapes: every tiled polygon covers one whole-image polygon exactly
    sym = tiled.geometry.union_all().symmetric_difference(whole.geometry.union_all())
    assert sym.area < 1e-6
    np.testing.assert_allclose(whole["area_ha"], whole["area_m2"] / 1e4)


def test_small_fields_dropped_and_geoparquet_written(mask, tmp_path):
    import geopandas as gpd

    all_ = vectorize_mask(mask)
    cut = float(np.median(all_["area_m2"]))
    n = write_fields(mask, tmp_path / "fields.parquet", min_area_m2=cut)
    back = gpd.read_parquet(tmp_path / "fields.parquet")
    assert n == len(back) == int((all_["area_m2"] >= cut).sum()) and back.crs == mask.rio.crs
    assert not (tmp_path / "fields.parquet.partial").exists()
    empty = vectorize_mask(mask.where(False, 0).astype("uint8"))
    assert len(empty) == 0
