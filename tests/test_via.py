"""VIA export of cluster patches and import of the drawn regions as a georeferenced mask."""

import json
import shutil
import warnings

import numpy as np
import pytest
import rasterio
import xarray as xr
from matplotlib.path import Path as MplPath
from PIL import Image

from agriland_scale.errors import ConfigError, CorruptInput, EmptyRegion, IgnoredRegion, OutputExists
from agriland_scale.labels.classes import IGNORE
from agriland_scale.labels.via import export_via, import_via, parse_patch_filename
from agriland_scale.patches import patch_index
from agriland_scale.publish.cog import write_cog
from agriland_scale.render import to_rgb8
from agriland_scale.store import write_group

K = 4  # clusters 0..3; cluster 3 is left empty


@pytest.fixture(scope="module")
def store(cube_store, cube, tmp_path_factory):
    """A copy of the real demo cube with its patch index and labels by patch-mean NDVI
    (cluster 0 = lowest third ... 2 = highest; patch 0 is 'not clustered')."""
    path = tmp_path_factory.mktemp("via") / "products.zarr"
    shutil.copytree(cube_store, path)
    index = patch_index(cube, 256, 128)
    write_group(index, path, "patches")
    refl = cube["reflectance"]
    ndvi = (
        (refl.sel(band="nir") - refl.sel(band="red")) / (refl.sel(band="nir") + refl.sel(band="red"))
    ).values
    means = np.array(
        [np.nanmean(ndvi[a : a + 256, b : b + 256]) for a, b in zip(index.y0.values, index.x0.values)]
    )
    labels = np.digitize(means, np.quantile(means, [1 / 3, 2 / 3])).astype("int16")
    labels[0] = -1
    cl = xr.Dataset(
        {"labels": ("patch", labels)}, coords={"patch": index.patch.values, "cluster": np.arange(K)}
    )
    write_group(cl, path, "clusters")
    return path, index.load(), labels


def _project(folder):
    return json.loads((folder / "via_project.json").read_text())


def _annotate(folder, regions_by_file, *, plain=False, name="annotated.json"):
    """Save the exported project with regions drawn (as VIA does), or the plain export."""
    proj = _project(folder)
    for key, entry in proj["_via_img_metadata"].items():
        entry["regions"] = regions_by_file.get(entry["filename"], [])
    data = {k: v for k, v in proj["_via_img_metadata"].items() if v["regions"]} if plain else proj
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def _polygon(xs, ys, cls="arable"):
    attrs = {} if cls is None else {"class": cls}
    return {
        "shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
        "region_attributes": attrs,
    }


def test_export_writes_pngs_a_via_project_and_the_sidecar(store, cube, tmp_path):
    path, index, labels = store
    proj_path = export_via(path, tmp_path, [2])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == (labels == 2).sum() > 0
    side = json.loads((tmp_path / "patches.json").read_text())
    assert sorted(side["patches"]) == pngs
    assert side["crs"] == "EPSG:32618"
    assert side["transform"] == list(cube.rio.transform())[:6]
    assert (side["height"], side["width"]) == (1024, 1024)
    lo, hi = np.array(side["stretch"]["low"]), np.array(side["stretch"]["high"])
    for fn in pngs:
        rec = side["patches"][fn]
        p, y0, x0 = parse_patch_filename(fn)
        assert (p, y0, x0) == (rec["patch"], rec["y0"], rec["x0"])
        assert (y0, x0) == (int(index.y0[p]), int(index.x0[p])) and labels[p] == rec["cluster"] == 2
    fn = pngs[0]
    rec = side["patches"][fn]
    img = np.asarray(Image.open(tmp_path / fn))
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    window = (
        cube["reflectance"]
        .sel(band=["red", "green", "blue"])
        .values[:, rec["y0"] : rec["y0"] + 256, rec["x0"] : rec["x0"] + 256]
    )
    np.testing.assert_array_equal(img, to_rgb8(window, lo, hi))
    proj = json.loads(proj_path.read_text())
    assert {"_via_settings", "_via_img_metadata", "_via_attributes"} <= set(proj)
    for key, entry in proj["_via_img_metadata"].items():
        size = (tmp_path / entry["filename"]).stat().st_size
        assert key == entry["filename"] + str(size) and entry["size"] == size and entry["regions"] == []
    assert proj["_via_image_id_list"] == list(proj["_via_img_metadata"])
    assert set(proj["_via_attributes"]["region"]["class"]["options"]) == {"arable", "other"}


def test_export_rejects_unknown_or_empty_clusters(store, tmp_path):
    path, _, _ = store
    with pytest.raises(ConfigError, match=r"\[7\] do not exist.*0\.\.3"):
        export_via(path, tmp_path, [1, 7])
    with pytest.raises(ConfigError, match=r"cluster\(s\) \[3\] hold no patch"):
        export_via(path, tmp_path, [3])
    with pytest.raises(ConfigError):
        export_via(path, tmp_path, [])


def test_reexport_replaces_stale_pngs_and_protects_annotations(store, tmp_path):
    path, _, labels = store
    export_via(path, tmp_path, [0])
    export_via(path, tmp_path, [1])
    assert len(list(tmp_path.glob("*.png"))) == (labels == 1).sum()
    first = sorted(_project(tmp_path)["_via_img_metadata"].values(), key=lambda e: e["filename"])[0]
    _annotate(tmp_path, {first["filename"]: [_polygon([1, 9, 9], [1, 1, 9])]}, name="via_project.json")
    with pytest.raises(OutputExists, match="already holds drawn regions"):
        export_via(path, tmp_path, [1])
    export_via(path, tmp_path, [1], overwrite=True)
    assert all(not e["regions"] for e in _project(tmp_path)["_via_img_metadata"].values())


def test_round_trip_polygon_lands_on_the_right_cube_pixels(store, cube, tmp_path):
    path, _, _ = store
    export_via(path, tmp_path, [1, 2])
    side = json.loads((tmp_path / "patches.json").read_text())["patches"]
    recs = sorted(side.items(), key=lambda kv: (kv[1]["y0"], kv[1]["x0"]))
    (fa, a), (fb, b) = (
        recs[0],
        next(
            r
            for r in recs
            if abs(r[1]["y0"] - recs[0][1]["y0"]) >= 256 or abs(r[1]["x0"] - recs[0][1]["x0"]) >= 256
        ),
    )
    # a triangle in patch A (image pixels, as drawn in VIA), an 'other' rectangle in patch B
    xs, ys = [30, 200, 60], [40, 90, 220]
    rect = {
        "shape_attributes": {"name": "rect", "x": 0, "y": 0, "width": 50, "height": 50},
        "region_attributes": {"class": "other"},
    }
    mask = import_via(_annotate(tmp_path, {fa: [_polygon(xs, ys)], fb: [rect]}), cube)

    expected = np.full((1024, 1024), IGNORE, dtype="uint8")
    expected[b["y0"] : b["y0"] + 256, b["x0"] : b["x0"] + 256] = 0
    expected[a["y0"] : a["y0"] + 256, a["x0"] : a["x0"] + 256] = 0
    cy, cx = np.mgrid[0:256, 0:256] + 0.5  # pixel centres, image coordinates
    inside = MplPath(np.c_[xs, ys]).contains_points(np.c_[cx.ravel(), cy.ravel()]).reshape(256, 256)
    expected[a["y0"] : a["y0"] + 256, a["x0"] : a["x0"] + 256][inside] = 1
    differ = mask.values != expected
    assert differ.sum() <= 4, np.argwhere(differ)  # only pixel centres on the polygon's edge may differ
    assert inside.sum() > 5000 and (mask.values == 1).sum() == pytest.approx(inside.sum(), abs=4)

    # georeferencing: the cube's grid, CRS and transform
    assert mask.dtype == np.uint8 and mask.dims == ("y", "x")
    assert mask.rio.crs == cube.rio.crs and mask.rio.transform() == cube.rio.transform()
    np.testing.assert_array_equal(mask.x, cube.x)
    np.testing.assert_array_equal(mask.y, cube.y)
    # the triangle's centroid, as map coordinates (EPSG:32618 metres), is labelled 1
    t = cube.rio.transform()
    mx, my = t @ (a["x0"] + np.mean(xs), a["y0"] + np.mean(ys))
    assert int(mask.sel(x=mx, y=my, method="nearest")) == 1
    mx, my = t @ (b["x0"] + 100, b["y0"] + 100)  # patch B, outside its rectangle: looked at, 0
    assert int(mask.sel(x=mx, y=my, method="nearest")) == 0


def test_plain_export_circles_no_class_and_ignored_shapes(store, cube, tmp_path):
    path, _, _ = store
    export_via(path, tmp_path, [0])
    side = json.loads((tmp_path / "patches.json").read_text())["patches"]
    fn, rec = sorted(side.items())[0]
    circle = {"shape_attributes": {"name": "circle", "cx": 128, "cy": 100, "r": 40}, "region_attributes": {}}
    line = {
        "shape_attributes": {"name": "polyline", "all_points_x": [0, 50], "all_points_y": [0, 50]},
        "region_attributes": {"class": "arable"},
    }
    path_json = _annotate(tmp_path, {fn: [circle, line]}, plain=True)
    data = json.loads(path_json.read_text())  # VIA 1 style: regions as a dict
    for entry in data.values():
        entry["regions"] = {str(i): r for i, r in enumerate(entry["regions"])}
    path_json.write_text(json.dumps(data))
    assert "_via_img_metadata" not in data
    with pytest.warns(IgnoredRegion, match="polyline"):
        mask = import_via(path_json, cube).values
    win = mask[rec["y0"] : rec["y0"] + 256, rec["x0"] : rec["x0"] + 256]
    cy, cx = np.mgrid[0:256, 0:256] + 0.5
    d = np.hypot(cx - 128, cy - 100)
    assert (win[d < 39] == 1).all() and (win[d > 41] == 0).all()  # no class -> arable
    outside = np.ones_like(mask, bool)
    outside[rec["y0"] : rec["y0"] + 256, rec["x0"] : rec["x0"] + 256] = False
    assert (mask[outside] == IGNORE).all()


def test_import_errors_are_clear(store, cube, tmp_path):
    path, _, _ = store
    export_via(path, tmp_path, [2])
    fn = sorted(json.loads((tmp_path / "patches.json").read_text())["patches"])[0]
    good = _annotate(tmp_path, {fn: [_polygon([1, 50, 50], [1, 1, 50])]})
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(good, other / "a.json")
    with pytest.raises(CorruptInput, match="no patches.json next to"):
        import_via(other / "a.json", cube)
    unknown = json.loads(good.read_text())
    unknown["_via_img_metadata"]["x.png1"] = {
        "filename": "holiday.png",
        "size": 1,
        "file_attributes": {},
        "regions": [_polygon([1, 5, 5], [1, 1, 5])],
    }
    (tmp_path / "u.json").write_text(json.dumps(unknown))
    with pytest.raises(CorruptInput, match="'holiday.png'.*not in"):
        import_via(tmp_path / "u.json", cube)
    (tmp_path / "bad.json").write_text(good.read_text()[:-20])
    with pytest.raises(CorruptInput, match="not valid JSON"):
        import_via(tmp_path / "bad.json", cube)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CorruptInput, match="not a VIA 2 project"):
        import_via(tmp_path / "list.json", cube)
    with pytest.raises(EmptyRegion, match="holds no polygon"):
        import_via(tmp_path / "via_project.json", cube)
    with pytest.raises(CorruptInput, match="exported from a cube"):
        import_via(good, cube.isel(x=slice(128, None)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredRegion)
        assert (import_via(good, cube).values == 1).sum() > 0


@pytest.mark.slow
def test_via_round_trip_on_the_demo_run(demo_run, tmp_path):
    """The intended workflow on a real run: pick the greenest DEC cluster, export it, draw a
    polygon, import it, and publish the mask as a COG that GIS tools place correctly."""
    from agriland_scale.cluster.report import cluster_stats
    from agriland_scale.store import open_cube, open_product, reader

    cfg, out, _ = demo_run
    store = reader(out)
    cube = open_cube(store)
    labels = open_product(store, "clusters")["labels"].values
    stats = cluster_stats(cube, open_product(store, "patches").load(), labels, cfg.cluster.k)
    greenest = int(np.nanargmax(stats["ndvi_mean"].values))
    export_via(store, tmp_path, [greenest])
    side = json.loads((tmp_path / "patches.json").read_text())["patches"]
    assert len(side) == (labels == greenest).sum()
    fn, rec = sorted(side.items())[0]
    mask = import_via(_annotate(tmp_path, {fn: [_polygon([16, 240, 240, 16], [16, 16, 112, 112])]}), cube)
    y0, x0 = rec["y0"], rec["x0"]
    assert (mask.values[y0 + 16 : y0 + 112, x0 + 16 : x0 + 240] == 1).all()
    assert (mask.values == 1).sum() == 96 * 224
    assert (mask.values[y0 : y0 + 256, x0 : x0 + 256] != IGNORE).all() and (
        mask.values == 0
    ).sum() == 256**2 - 96 * 224
    write_cog(mask, tmp_path / "label.tif", nodata=IGNORE)
    with rasterio.open(tmp_path / "label.tif") as src:
        assert src.crs.to_epsg() == 32618 and src.transform == cube.rio.transform()
        r, c = src.index(*cube.rio.transform() @ (x0 + 100.5, y0 + 50.5))
        assert (r, c) == (y0 + 50, x0 + 100) and src.read(1)[r, c] == 1


def test_via_names_cannot_reach_outside_the_export(store, cube, tmp_path):
    """Path traversal in a VIA project or in the sidecar never reads or deletes a file outside."""
    path, _, _ = store
    out = tmp_path / "via"
    export_via(path, out, [2])
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    side = json.loads((out / "patches.json").read_text())
    side["patches"]["../victim.png"] = next(iter(side["patches"].values()))
    (out / "patches.json").write_text(json.dumps(side))
    export_via(path, out, [1], overwrite=True)  # removes the earlier export's PNGs it listed
    assert victim.read_bytes() == b"keep"
    proj = _project(out)
    proj["_via_img_metadata"]["evil"] = {
        "filename": "../../../../etc/passwd",
        "size": 1,
        "file_attributes": {},
        "regions": [_polygon([1, 5, 5], [1, 1, 5])],
    }
    (out / "evil.json").write_text(json.dumps(proj))
    with pytest.raises(CorruptInput, match=r"'\.\./\.\./\.\./\.\./etc/passwd'.*not in"):
        import_via(out / "evil.json", cube)
