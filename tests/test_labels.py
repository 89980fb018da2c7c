import json

import numpy as np
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import mapping, shape

from agriland_scale.errors import CorruptInput, EmptyRegion
from agriland_scale.labels.classes import IGNORE
from agriland_scale.labels.raster import rasterize_labels

from .conftest import VIRGINIA


def test_digitised_labels_rasterise_on_the_cube(cube):
    lab = rasterize_labels(VIRGINIA / "labels.geojson", cube, ["arable"])
    assert lab.shape == (cube.sizes["y"], cube.sizes["x"])
    assert set(np.unique(lab.values)) == {0, 1, IGNORE}
    # arable polygons are brighter in red than forest (checked when digitising): on the cube too
    red = cube["reflectance"].sel(band="red").values
    assert np.nanmedian(red[lab.values == 1]) > np.nanmedian(red[lab.values == 0]) * 0.8
    ha = (lab.values == 1).sum() * 100 / 1e4
    assert 700 < ha < 1000  # LABELS.md: 881 ha of arable polygons


def test_labels_in_another_crs_give_the_same_mask(cube, tmp_path):
    data = json.loads((VIRGINIA / "labels.geojson").read_text())
    to_utm = Transformer.from_crs(4326, 32618, always_xy=True).transform
    for f in data["features"]:
        f["geometry"] = mapping(shapely.transform(shape(f["geometry"]), to_utm, interleaved=False))
    data["crs"] = {"type": "name", "properties": {"name": "EPSG:32618"}}
    p = tmp_path / "utm.geojson"
    p.write_text(json.dumps(data))
    a = rasterize_labels(VIRGINIA / "labels.geojson", cube, ["arable"]).values
    b = rasterize_labels(p, cube, ["arable"]).values
    assert (a != b).mean() < 0.002  # only boundary pixels may differ


def test_bad_label_files(cube, tmp_path):
    p = tmp_path / "x.geojson"
    p.write_text("{not json")
    with pytest.raises(CorruptInput, match="not valid JSON"):
        rasterize_labels(p, cube, ["arable"])
    p.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {"class": "arable"},
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[10, 45], [10.1, 45], [10.1, 45.1], [10, 45]]],
                        },
                    }
                ],
            }
        )
    )
    with pytest.raises(EmptyRegion, match="check the file's CRS"):
        rasterize_labels(p, cube, ["arable"])


def test_raster_labels_in_any_crs_match_the_polygons(cube, tmp_path):
    """A label GeoTIFF (here the polygons burnt, then reprojected to UTM 17N) lands back on the
    cube grid: identical in the cube's CRS, nearly identical after a round trip via another."""
    from agriland_scale.labels.raster import load_labels
    from agriland_scale.publish.cog import write_cog

    ref = rasterize_labels(VIRGINIA / "labels.geojson", cube, ["arable"])
    write_cog(ref, tmp_path / "same.tif", nodata=255)
    same = load_labels(tmp_path / "same.tif", cube, ["arable"])
    np.testing.assert_array_equal(same.values, ref.values)
    other = ref.rio.write_nodata(255).rio.reproject("EPSG:32617", resolution=10)
    write_cog(other, tmp_path / "other.tif", nodata=255)
    back = load_labels(tmp_path / "other.tif", cube, ["arable"]).values
    both = (back != 255) & (ref.values != 255)
    assert both.sum() > 0.9 * (ref.values != 255).sum()
    assert (back[both] == ref.values[both]).mean() > 0.97


def test_lazy_labels_rasterise_only_their_window_and_equal_the_whole(cube, tmp_path):
    """``lazy=True`` (the segmentation stage over a region): the polygons' window is rasterised,
    the zone around it is a lazy array of 255, and the values equal the whole-zone mask, also
    for labels reaching past the cube's edge."""
    import dask.array as dsa

    whole = rasterize_labels(VIRGINIA / "labels.geojson", cube, ["arable"])
    lazy = rasterize_labels(VIRGINIA / "labels.geojson", cube, ["arable"], lazy=True)
    assert isinstance(lazy.data, dsa.Array)
    # no chunk the size of the zone: the labels' window and the padding around it
    assert max(lazy.data.chunks[0]) * max(lazy.data.chunks[1]) < whole.size, lazy.data.chunks
    np.testing.assert_array_equal(lazy.values, whole.values)
    assert lazy.rio.crs == whole.rio.crs and (lazy.x == whole.x).all()
    # a polygon far outside the cube: nothing to label
    far = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"class": "arable"},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[10, 10], [10.1, 10], [10.1, 10.1], [10, 10]]],
                },
            }
        ],
    }
    p = tmp_path / "far.geojson"
    p.write_text(json.dumps(far))
    with pytest.raises(EmptyRegion, match="no label polygon"):
        rasterize_labels(p, cube, ["arable"], lazy=True)
