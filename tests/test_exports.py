"""What ``agriland export RUN --zarr DEST`` gives the readers outside agriland (Zarr v2 and v3).

GDAL's ``_CRS`` on every georeferenced array (what every GDAL and QGIS reads, Debian 12's GDAL
3.6 included, where only newer GDAL reads CF's ``grid_mapping``), consolidated metadata (no
warning from ``xr.open_zarr``, a ``.zmetadata`` for remote v2 readers), ``Conventions``, values
copied bit for bit, and product attributes that name no path of the machine.

A small synthetic run: a packed probability and a mask (encoded as segment_region encodes them)
in two UTM zones, and a group without CRS, written through the run's Icechunk store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from pyproj import CRS

ZONES = {"utm18n": 32618, "utm17n": 32617}
SPATIAL = ("probability", "mask")


def _segmentation(epsg: int) -> xr.Dataset:
    from agriland_scale.store import write_georef

    y = 4174340.0 - 5 - 10 * np.arange(32)
    x = 438290.0 + 5 + 10 * np.arange(48)
    prob = np.linspace(0, 1, 32 * 48, dtype="float32").reshape(32, 48)
    prob[:4, :6] = np.nan
    mask = np.where(np.isnan(prob), 255, prob >= 0.5).astype("uint8")
    ds = xr.Dataset({"probability": (("y", "x"), prob), "mask": (("y", "x"), mask)}, coords={"y": y, "x": x})
    ds["probability"].attrs.update(
        long_name="agricultural land probability", units="1", valid_range=np.array([0, 254], dtype="uint8")
    )
    ds["mask"].attrs.update(
        long_name="agricultural land mask",
        flag_values=np.array([0, 1], dtype="uint8"),
        flag_meanings="other agricultural",
    )
    ds["probability"].encoding.update(
        dtype="uint8",
        scale_factor=np.float32(1 / 254),
        add_offset=np.float32(0),
        _FillValue=np.uint8(255),
        fill_value=np.uint8(255),
        chunks=(16, 24),
    )
    ds["mask"].encoding.update(_FillValue=np.uint8(255), fill_value=np.uint8(255), chunks=(16, 24))
    return write_georef(ds, epsg)


def _cube(epsg: int) -> xr.Dataset:
    """A (band, y, x) reflectance packed in int16, as the cube stores it."""
    from agriland_scale.store import write_georef

    seg = _segmentation(epsg)
    refl = np.stack([seg["probability"].values * 0.3, seg["probability"].values * 0.2])
    ds = xr.Dataset(
        {"reflectance": (("band", "y", "x"), refl)},
        coords={"band": np.array(["red", "nir"], dtype=object), "y": seg.y.values, "x": seg.x.values},
    )
    ds["reflectance"].attrs.update(long_name="composite reflectance", units="1")
    ds["reflectance"].encoding.update(
        dtype="int16", scale_factor=np.float32(5e-5), _FillValue=np.int16(-32768)
    )
    return write_georef(ds, epsg)


GROUPS = ["utm17n/segmentation", "utm18n/cube", "utm18n/patches", "utm18n/segmentation"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A run's store with ``{zone}/segmentation`` for two zones, ``utm18n/cube`` (3-D) and
    ``utm18n/patches`` (no CRS), and its exports: ``{2: v2 path, 3: v3 path, "run": run folder}``."""
    from agriland_scale.store import export_zarr
    from agriland_scale.store.resume import Products

    tmp = tmp_path_factory.mktemp("exports")
    products = Products(tmp / "run")
    for zone, epsg in ZONES.items():
        products.write(_segmentation(epsg), f"{zone}/segmentation")
    patches = xr.Dataset(
        {"valid_fraction": ("patch", np.linspace(0, 1, 6, dtype="float32"))}, coords={"patch": np.arange(6)}
    )
    patches["valid_fraction"].attrs.update(long_name="fraction of clear pixels", units="1")
    products.write(patches, "utm18n/patches")
    products.write(_cube(32618), "utm18n/cube")
    out = {"run": tmp / "run"}
    for fmt in (2, 3):
        out[fmt] = tmp / f"export_v{fmt}.zarr"
        assert export_zarr(tmp / "run", out[fmt], zarr_format=fmt) == GROUPS
    return out


def _array_attrs(path: Path, fmt: int, array: str) -> dict:
    if fmt == 2:
        return json.loads((path / array / ".zattrs").read_text())
    return json.loads((path / array / "zarr.json").read_text())["attributes"]


def _arrays(path: Path) -> list[str]:
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return sorted(name for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array))


@pytest.mark.parametrize("fmt", [2, 3])
def test_every_georeferenced_array_carries_gdal_crs(exports, fmt):
    """GDAL's ``_CRS`` (wkt, projjson, url) beside CF's grid_mapping on each (y, x) array, in its
    zone's CRS; none on coordinates, the grid mapping or arrays without a CRS."""
    path = exports[fmt]
    seen = set()
    for array in _arrays(path):
        a = _array_attrs(path, fmt, array)
        group, _, name = array.rpartition("/")
        if "grid_mapping" not in a:
            assert "_CRS" not in a, array
            continue
        seen.add(array)
        epsg = ZONES[group.split("/")[0]]
        crs = a["_CRS"]
        assert set(crs) == {"wkt", "projjson", "url"}, array
        assert CRS.from_wkt(crs["wkt"]).to_epsg() == epsg
        assert CRS.from_json_dict(crs["projjson"]).to_epsg() == epsg
        assert crs["url"] == f"http://www.opengis.net/def/crs/EPSG/0/{epsg}"
        assert a["grid_mapping"] == "spatial_ref"
    assert seen == {f"{z}/segmentation/{v}" for z in ZONES for v in SPATIAL} | {"utm18n/cube/reflectance"}


def test_gdal_finds_the_crs_from_gdal_crs_alone(exports, tmp_path):
    """The v2 export read by the rasterio wheel's GDAL with CF's grid_mapping taken away (as a
    GDAL that reads no grid_mapping sees it): the CRS and the transform come from ``_CRS`` and
    the x/y coordinates."""
    copy = tmp_path / "v2.zarr"
    shutil.copytree(exports[2], copy)
    for meta in copy.rglob(".zmetadata"):  # GDAL would read the consolidated copy first
        meta.unlink()
    for zone, epsg in ZONES.items():
        zattrs = copy / zone / "segmentation" / "probability" / ".zattrs"
        attrs = json.loads(zattrs.read_text())
        del attrs["grid_mapping"]
        zattrs.write_text(json.dumps(attrs))
        with rasterio.open(f'ZARR:"{copy}":/{zone}/segmentation/probability') as src:
            assert src.crs == rasterio.crs.CRS.from_epsg(epsg), zone
            assert src.transform == rasterio.Affine(10, 0, 438290, 0, -10, 4174340)
            assert src.nodata == 255 and src.scales[0] == pytest.approx(1 / 254)


def test_gdalinfo_shows_the_coordinate_system_of_a_v2_export(exports):
    """Debian's ``gdalinfo`` (GDAL 3.6 on Debian 12, QGIS 3.22's): the CRS, origin and pixel size
    of each zone's probability, and of a band of the cube (``:0``: the first index of ``band``).
    Skipped where gdal-bin is not installed."""
    if shutil.which("gdalinfo") is None:
        pytest.skip("gdalinfo not installed (Debian: apt-get install gdal-bin)")
    arrays = [(f"{zone}/segmentation/probability", epsg, 255) for zone, epsg in ZONES.items()]
    for array, epsg, nodata in [*arrays, ("utm18n/cube/reflectance:0", 32618, -32768)]:
        url = f'ZARR:"{exports[2]}":/{array}'
        run = subprocess.run(["gdalinfo", "-json", url], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        info = json.loads(run.stdout)
        assert "coordinateSystem" in info, f"gdalinfo shows no coordinate system for {url}"
        assert CRS.from_wkt(info["coordinateSystem"]["wkt"]).to_epsg() == epsg
        assert info["geoTransform"] == [438290.0, 10.0, 0.0, 4174340.0, 0.0, -10.0]
        assert info["size"] == [48, 32] and info["bands"][0]["noDataValue"] == nodata


@pytest.mark.parametrize("fmt", [2, 3])
def test_export_metadata_is_consolidated_and_opens_without_warning(exports, fmt):
    """Every group opens with ``xr.open_zarr`` (and the whole export with ``open_datatree``)
    without any warning; v2 has ``.zmetadata`` at the root and in each group, v3 zarr-python's
    consolidated metadata, and both list every array."""
    path = exports[fmt]
    groups = GROUPS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)  # affine's `*` in rioxarray
        for g in groups:
            ds = xr.open_zarr(path, group=g)
            assert ds.attrs["Conventions"] == "CF-1.10", g
        tree = xr.open_datatree(path, engine="zarr")
        assert (
            tree["utm18n/segmentation"]["probability"].attrs["long_name"] == "agricultural land probability"
        )
    if fmt == 2:
        for where in ["", *groups]:
            meta = json.loads((path / where / ".zmetadata").read_text())
            assert meta["zarr_consolidated_format"] == 1
        listed = json.loads((path / ".zmetadata").read_text())["metadata"]
        assert {k.rsplit("/", 1)[0] for k in listed if k.endswith("/.zarray")} == set(_arrays(path))
    else:
        root = json.loads((path / "zarr.json").read_text())
        assert root["consolidated_metadata"] is not None
    consolidated = zarr.open_consolidated(str(path), zarr_format=fmt)
    assert sorted(
        name for name, node in consolidated.members(max_depth=None) if isinstance(node, zarr.Array)
    ) == _arrays(path)


@pytest.mark.parametrize("fmt", [2, 3])
def test_export_copies_values_bit_for_bit_and_says_conventions(exports, fmt):
    """The export changes metadata only: every array's stored values (packed integers as stored)
    equal the run's; the root and every group say ``Conventions: CF-1.10``."""
    from agriland_scale.store import reader

    src = zarr.open_group(reader(exports["run"]), mode="r")
    dest = zarr.open_group(str(exports[fmt]), mode="r", use_consolidated=False)
    assert dest.attrs["Conventions"] == "CF-1.10"
    for array in _arrays(exports[fmt]):
        a, b = src[array], dest[array]
        assert isinstance(a, zarr.Array) and isinstance(b, zarr.Array)
        if a.dtype.kind in "OTU":  # band names: v2 has no variable-length strings
            assert [str(v) for v in a[...]] == [str(v) for v in b[...]], array
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, array
        assert np.array_equal(a[...], b[...], equal_nan=a.dtype.kind == "f"), array
    for g in GROUPS:
        assert dest[g].attrs["Conventions"] == "CF-1.10", g


def test_run_relative_names_no_path_of_the_machine(tmp_path):
    """Model paths as product attributes give them: relative to the run folder or URL; a local
    file elsewhere by its name alone; an object-storage URL elsewhere kept."""
    from agriland_scale.store import run_relative

    run = tmp_path / "run"
    url = "s3://bucket/runs/r1"
    assert run_relative(run / "models" / "unet.keras", run, url) == "models/unet.keras"
    assert run_relative(f"{url}/models/unet.keras", run, url) == "models/unet.keras"
    assert run_relative(f"file://{run}/models/cae.keras", run) == "models/cae.keras"
    assert run_relative(tmp_path / "elsewhere" / "unet.keras", run, url) == "unet.keras"
    assert run_relative("s3://other/models/unet.keras", run, url) == "s3://other/models/unet.keras"
    assert run_relative("models/../models/unet.keras", Path.cwd()) == "models/unet.keras"
