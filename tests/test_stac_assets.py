"""The STAC catalogue's Zarr assets open as they say (STAC -> xarray), and the collection links
the models' MLM Items.

* ``zarr`` (the run's Icechunk repository, ``application/vnd.zarr+icechunk``): no
  ``xarray:open_kwargs`` (plain ``xr.open_dataset(href)`` fails on a repository); the recipe
  in ``agriland:icechunk`` opens it with icechunk.
* ``NAME.zarr`` (a plain Zarr export in the run folder, ``application/vnd+zarr``):
  ``xr.open_dataset(href, **xarray:open_kwargs)`` opens it.

A small synthetic single-zone run (a cube and a segmentation group written through the
run's store, one probability COG), as in ``tests/test_exports.py``; no items.json.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pystac
import pytest
import xarray as xr

from agriland_scale.store import ICECHUNK_MEDIA_TYPE

EPSG = 32618


def _run(out: Path) -> Path:
    from agriland_scale.publish.cog import write_cog
    from agriland_scale.store import write_georef
    from agriland_scale.store.resume import Products

    y = 4174340.0 - 5 - 10 * np.arange(32)
    x = 438290.0 + 5 + 10 * np.arange(48)
    prob = np.linspace(0, 1, 32 * 48, dtype="float32").reshape(32, 48)
    seg = write_georef(xr.Dataset({"probability": (("y", "x"), prob)}, coords={"y": y, "x": x}), EPSG)
    cube = write_georef(
        xr.Dataset(
            {"reflectance": (("band", "y", "x"), np.stack([prob * 0.3, prob * 0.2]))},
            coords={"band": np.array(["red", "nir"], dtype=object), "y": y, "x": x},
        ),
        EPSG,
    )
    products = Products(out)
    products.write(cube, "cube")
    products.write(seg, "segmentation")
    write_cog(seg["probability"], out / "cog" / "probability.tif", nodata=255, scale=1 / 254)
    transform = [10.0, 0.0, 438290.0, 0.0, -10.0, 4174340.0]
    (out / "run.json").write_text(
        json.dumps(
            {
                "config": {"name": "assets", "search": {"datetime": "2024-06-01/2024-07-01"}},
                "started": "2025-05-01T10:00:00+0000",
                "stages": {"cube": "done", "segmentation": "done"},
                "cube": {
                    "shape": {"band": 2, "y": 32, "x": 48},
                    "crs": f"EPSG:{EPSG}",
                    "transform": transform,
                    "bounds": [438290.0, 4174020.0, 438770.0, 4174340.0],
                },
            }
        )
    )
    (out / "models").mkdir()
    (out / "models" / "unet.keras.stac.json").write_text(json.dumps({"type": "Feature", "id": "unet"}))
    return out


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    from agriland_scale.publish.stac import write_stac
    from agriland_scale.store import export_zarr

    out = _run(tmp_path_factory.mktemp("stac-assets") / "run")
    export_zarr(out, out / "plain.zarr", zarr_format=3)  # agriland export RUN --zarr RUN/plain.zarr
    coll = pystac.Collection.from_file(str(write_stac(out)))
    return out, coll, {i.id: i for i in coll.get_items()}


def test_icechunk_asset_claims_no_plain_open_and_its_recipe_works(catalogue):
    import icechunk

    out, _, items = catalogue
    for item_id, group in (("assets-probability", "segmentation"), ("assets-zarr", None)):
        asset = items[item_id].assets["zarr"]
        assert asset.media_type == ICECHUNK_MEDIA_TYPE and asset.roles == ["data"]
        assert "xarray:open_kwargs" not in asset.extra_fields  # xr.open_dataset(href) cannot open it
        href = asset.get_absolute_href()
        assert href is not None and Path(href) == out / "agriland.icechunk"
        recipe = asset.extra_fields["agriland:icechunk"]
        assert recipe["open_kwargs"].get("group") == group
        assert "icechunk.Repository.open" in (asset.description or "")
        # exactly as the asset says
        storage = getattr(icechunk, recipe["storage"])(href)
        store = icechunk.Repository.open(storage).readonly_session(recipe["branch"]).store
        if group:
            ds = xr.open_dataset(store, **recipe["open_kwargs"])
            assert "probability" in ds and ds.rio.crs.to_epsg() == EPSG
    with pytest.raises(Exception):  # what the asset used to claim
        xr.open_dataset(
            items["assets-probability"].assets["zarr"].get_absolute_href(),
            engine="zarr",
            group="segmentation",
            consolidated=False,
        )


@pytest.mark.parametrize(
    ("item_id", "var"), [("assets-probability", "probability"), ("assets-zarr", "reflectance")]
)
def test_plain_zarr_asset_opens_with_its_open_kwargs(catalogue, item_id, var):
    out, _, items = catalogue
    item = items[item_id]
    asset = item.assets["plain.zarr"]
    assert asset.media_type == "application/vnd+zarr"
    assert "https://stac-extensions.github.io/xarray-assets/v1.0.0/schema.json" in item.stac_extensions
    assert not Path(asset.href).is_absolute()  # relative, like every href of the catalogue
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated: no warning
        ds = xr.open_dataset(asset.get_absolute_href(), **asset.extra_fields["xarray:open_kwargs"])
    assert var in ds and ds.rio.crs.to_epsg() == EPSG
    np.testing.assert_array_equal(ds.rio.transform(), item.properties["proj:transform"][:6] + [0, 0, 1])


def test_collection_links_the_mlm_items(catalogue):
    out, coll, _ = catalogue
    (link,) = coll.get_links("related")
    assert link.media_type == pystac.MediaType.GEOJSON and "unet" in (link.title or "")
    raw = json.loads((out / "stac" / "collection.json").read_text())
    (href,) = [lk["href"] for lk in raw["links"] if lk["rel"] == "related"]
    assert href == "../models/unet.keras.stac.json"
    assert (out / "stac" / href).resolve() == out / "models" / "unet.keras.stac.json"


def test_no_export_no_plain_asset(tmp_path):
    from agriland_scale.publish.stac import write_stac

    coll = pystac.Collection.from_file(str(write_stac(_run(tmp_path / "run"))))
    for item in coll.get_items():
        assert set(item.assets) <= {"cog", "zarr"}
        assert not any("xarray:open_kwargs" in a.extra_fields for a in item.assets.values())


def test_agriland_export_into_the_run_refreshes_its_stac(tmp_path, capsys):
    """``agriland export RUN --zarr RUN/NAME.zarr`` on a run with a STAC collection: the
    catalog lists the export at once (before, only the next ``agriland report`` did)."""
    from agriland_scale import cli
    from agriland_scale.publish.stac import write_stac

    out = _run(tmp_path / "run")
    write_stac(out)
    assert cli.main(["export", str(out), "--zarr", str(out / "plain.zarr"), "-q"]) == 0
    coll = pystac.Collection.from_file(str(out / "stac" / "collection.json"))
    assert any("plain.zarr" in item.assets for item in coll.get_items(recursive=True))
