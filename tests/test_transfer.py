"""A model trained in one region maps another; a model whose bands differ is refused."""

from pathlib import Path

import numpy as np
import pystac
import pytest
import xarray as xr

from agriland_scale import load_config
from agriland_scale.errors import BandMismatch
from agriland_scale.pipeline.runner import run
from agriland_scale.store import reader

pytestmark = pytest.mark.slow

PIPELINE = Path(__file__).parent / "data" / "three-zones" / "pipeline.yaml"
AUSTRIA = [13.1220, 48.2805, 13.1572, 48.3040]  # the 33N sample (farmland), lon/lat


def _austria(unet: Path, **more):
    return load_config(PIPELINE).with_overrides(
        **{
            "name": "austria-transfer",
            "search.region": None,
            "search.bbox": AUSTRIA,
            "cube.resolution": 10.0,
            "cube.chunk": 256,
            "cube.mosaic_crs": None,
            "cube.mosaic_resolution": None,
            "segment.model": str(unet),
            "segment.labels": None,
            "segment.window": 256,
            "segment.overlap": 64,
            **more,
        }
    )


def test_unet_from_virginia_maps_austria(demo_run, external_cluster, tmp_path):
    _, out, _ = demo_run
    unet = out / "models" / "unet.keras"
    rec = run(_austria(unet), tmp_path / "at", scheduler=external_cluster, until="segmentation")
    assert rec["unet"]["given"] and rec["unet"]["training_region"] == "demo-virginia"
    assert list(rec["stages"]) == ["search", "cube", "unet", "segmentation"]
    store = reader(tmp_path / "at")
    seg = xr.open_zarr(store, group="segmentation", consolidated=False)
    cube = xr.open_zarr(store, group="cube", consolidated=False)
    assert seg.rio.crs.to_epsg() == 32633 and seg.rio.transform() == cube.rio.transform()
    p, clear = seg["probability"].values, cube["clear_count"].values > 0
    assert clear.mean() > 0.9 and np.isfinite(p[clear]).all() and 0 <= np.nanmin(p) <= np.nanmax(p) <= 1
    assert not (tmp_path / "at" / "models" / "unet.keras").exists()  # nothing retrained


def test_model_with_other_bands_is_refused(demo_run, external_cluster, tmp_path):
    _, out, _ = demo_run
    unet = out / "models" / "unet.keras"
    cfg = _austria(unet, **{"segment.bands": ["red", "green", "nir"]})
    with pytest.raises(
        BandMismatch, match=r"trained on bands \['red', 'green', 'blue'\].*\['red', 'green', 'nir'\]"
    ):
        run(cfg, tmp_path / "bad", scheduler=external_cluster, until="segmentation")
    # refused before any stage ran (nothing searched, loaded or written)
    assert (
        not (tmp_path / "bad" / "run.json").exists() and not (tmp_path / "bad" / "agriland.icechunk").exists()
    )


def test_models_carry_mlm_items(demo_run):
    _, out, _ = demo_run
    for name, task in (("unet.keras", "semantic-segmentation"), ("encoder.keras", "similarity-search")):
        item = pystac.Item.from_file(str(out / "models" / f"{name}.stac.json"))
        assert task in item.properties["mlm:tasks"] and item.properties["mlm:framework"] == "keras"
        assert item.properties["mlm:input"][0]["bands"] == ["red", "green", "blue"]
        assert item.assets["model"].href.endswith(name) and "mlm:model" in item.assets["model"].roles
        assert item.properties["mlm:total_parameters"] > 1000
        w, s, e, n = item.bbox
        assert -75.71 < w < e < -75.58 and 37.62 < s < n < 37.72  # the Virginia training window
    assert not (out / "models" / "cae.checkpoint.keras").exists()  # removed once the model is saved
