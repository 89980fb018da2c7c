"""Choosing inputs and thresholds by measurement (issue 33).

Per-band normalisation recorded in the model sidecar and refused when it differs; the mask
threshold chosen on the validation strip, recorded and used unless ``segment.threshold`` is
set; the SWIR bands of the embedded window resampled to the 10 m cube; an RGB weights file
meeting a 4-band U-Net (first convolution adapted, offline).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from agriland_scale.config.bands import DEFAULT_REFLECTANCE_MAX, reflectance_scale
from agriland_scale.config.schema import SegmentConfig
from agriland_scale.errors import BandMismatch, ConfigError
from agriland_scale.labels.classes import IGNORE

from .conftest import DEMO_YAML, ORIGIN_X, ORIGIN_Y, SIZE

BANDS4 = ["red", "green", "blue", "nir"]
PER_BAND = {"red": 0.3, "green": 0.3, "blue": 0.3, "nir": 0.6}


def _block_labels(cube) -> np.ndarray:
    """Labels on a 96 x 192 px block astride the demo's west validation split (307 px).

    Agricultural where NIR > red * 2 (vegetation), so both classes are present; everything
    else ignored: 2 validation and 4 training windows of 64 px.
    """
    refl = cube["reflectance"]
    nir = refl.sel(band="nir").values[:96, 224:416]
    red = refl.sel(band="red").values[:96, 224:416]
    label = np.full((SIZE, SIZE), IGNORE, dtype="uint8")
    label[:96, 224:416] = (nir > 2 * red).astype("uint8")
    return label


def _tiny_cfg(demo_cfg, **changes) -> SegmentConfig:
    train = demo_cfg.segment.train.model_copy(update={"epochs": 1, "batch_size": 2, "augment_factor": 0})
    return demo_cfg.segment.model_copy(
        update={"window": 64, "overlap": 16, "inference_window": None, "train": train, **changes}
    )


@pytest.fixture(scope="module")
def trained(cube_store, cube, demo_cfg, tmp_path_factory):
    """A U-Net trained one epoch on RGB+NIR with a per-band reflectance_max (seconds)."""
    from agriland_scale.models.train import train_unet

    cfg = _tiny_cfg(demo_cfg, bands=BANDS4, reflectance_max=PER_BAND)
    out = tmp_path_factory.mktemp("unet") / "unet.keras"
    meta = train_unet(cube_store, _block_labels(cube), cfg, str(out), seed=0)
    return out, meta, cfg


# -- per-band normalisation ---------------------------------------------------------------------
def test_reflectance_max_forms_resolve_per_band():
    assert reflectance_scale(0.3, BANDS4) == (0.3, 0.3, 0.3, 0.3)  # one number: every band (as before)
    assert reflectance_scale("auto", ["B04", "nir", "swir16", "swir22"]) == tuple(
        DEFAULT_REFLECTANCE_MAX[b] for b in ("red", "nir", "swir16", "swir22")
    )
    assert reflectance_scale({"B08": 0.6}, BANDS4) == (0.3, 0.3, 0.3, 0.6)  # ids, defaults for the rest
    assert reflectance_scale([0.2, 0.3, 0.4, 0.5], BANDS4) == (0.2, 0.3, 0.4, 0.5)
    # the demo scene's NIR (99.5th percentile 0.43) no longer clips at the visible bands' 0.3
    assert DEFAULT_REFLECTANCE_MAX["nir"] > 0.43 and DEFAULT_REFLECTANCE_MAX["red"] == 0.3


def test_reflectance_max_that_does_not_fit_the_bands_is_refused(demo_cfg):
    with pytest.raises(ConfigError, match=r"segment.reflectance_max has 2 value\(s\) for 3 band\(s\)"):
        demo_cfg.with_overrides(**{"segment.reflectance_max": [0.3, 0.3]})
    with pytest.raises(ConfigError, match=r"names band\(s\) \['swir16'\] that are not in the bands"):
        demo_cfg.with_overrides(**{"segment.reflectance_max": {"swir16": 0.5}})
    with pytest.raises(ConfigError, match="must be positive reflectances"):
        demo_cfg.with_overrides(**{"segment.reflectance_max": {"red": 0}})


def test_per_band_normalisation_is_applied_recorded_and_checked(trained, cube):
    from agriland_scale.models.embed import check_model
    from agriland_scale.models.files import read_sidecar
    from agriland_scale.patches import read_patches

    out, meta, cfg = trained
    side = read_sidecar(out)
    assert side["normalisation"]["reflectance_max"] == PER_BAND  # one a band, by name
    assert side["bands"] == BANDS4
    # the model input divides each band by its own maximum
    x = read_patches(cube["reflectance"], np.array([0]), np.array([0]), 8, BANDS4, PER_BAND)
    raw = cube["reflectance"].sel(band=BANDS4).values[:, :8, :8].transpose(1, 2, 0)
    np.testing.assert_allclose(x[0], np.clip(raw / np.array([0.3, 0.3, 0.3, 0.6]), 0, 1), rtol=1e-6)
    # the same normalisation, however written, passes; another one is refused by name
    check_model(str(out), "segmentation", BANDS4, {"nir": 0.6}, 64)
    check_model(str(out), "segmentation", BANDS4, [0.3, 0.3, 0.3, 0.6], 64)
    with pytest.raises(BandMismatch) as e:
        check_model(str(out), "segmentation", BANDS4, 0.3, 64, key="segment.model")
    assert str(e.value) == (
        f"segment.model = {out} was trained with reflectance_max {{red: 0.3, green: 0.3, blue: 0.3, "
        "nir: 0.6} (the reflectance that maps to 1, per band), the run uses 0.3: set "
        "segment.reflectance_max to {red: 0.3, green: 0.3, blue: 0.3, nir: 0.6} or retrain"
    )
    with pytest.raises(BandMismatch, match=r"the run uses \{red: 0.3, green: 0.3, blue: 0.3, nir: 0.5\}"):
        check_model(str(out), "segmentation", BANDS4, "auto", 64)  # auto gives NIR 0.5


def test_old_scalar_sidecar_still_works_and_refuses_per_band(tmp_path):
    """Sidecars written before per-band normalisation hold one number: it means every band."""
    import keras

    from agriland_scale.models.embed import check_model
    from agriland_scale.models.files import write_sidecar
    from agriland_scale.models.unet import build_unet

    path = tmp_path / "old.keras"
    build_unet("plain", 64, 3, filters=(4, 8)).save(path)
    write_sidecar(
        path,
        {
            "task": "segmentation",
            "bands": ["red", "green", "blue"],
            "patch_size": 64,
            "normalisation": {"reflectance_max": 0.3},
        },
    )
    bands = ["red", "green", "blue"]
    assert check_model(str(path), "segmentation", bands, 0.3, 64)["bands"] == bands
    check_model(str(path), "segmentation", bands, "auto", 64)  # auto is 0.3 for visible bands
    with pytest.raises(
        BandMismatch,
        match=r"trained with reflectance_max 0.3 .*the run uses \{red: 0.3, green: 0.3, blue: 0.4\}",
    ):
        check_model(str(path), "segmentation", bands, {"blue": 0.4}, 64)
    keras.backend.clear_session()


# -- the threshold chosen on validation ---------------------------------------------------------
def test_choose_threshold_maximises_validation_iou():
    from agriland_scale.models.windows import THRESHOLDS, _metrics, choose_threshold

    y = np.array([1, 1, 1, 0, 0, 0, IGNORE], dtype="uint8")
    p = np.array([0.42, 0.38, 0.36, 0.30, 0.20, 0.10, 0.99])  # an under-confident model
    t, ious = choose_threshold(y, p)
    assert t == 0.35 and ious["0.35"] == 1.0 and ious["0.5"] == 0.0
    assert list(ious) == [f"{v:g}" for v in THRESHOLDS] and THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 0.95
    m = _metrics(y, p, t)
    assert m["iou"] == m["precision"] == m["recall"] == 1.0
    assert m["labelled_fraction"] == 0.5 and m["mean_probability"] == pytest.approx(1.76 / 6)
    assert choose_threshold(np.zeros(4, "uint8"), np.zeros(4))[0] == 0.5  # nothing to choose on


def test_threshold_is_chosen_on_validation_and_recorded(trained):
    from agriland_scale.models.files import model_threshold, read_sidecar
    from agriland_scale.models.windows import THRESHOLDS

    out, meta, _ = trained
    side = read_sidecar(out)
    t = side["threshold"]
    assert t in THRESHOLDS and model_threshold(side) == t == meta["threshold"]
    ious = side["threshold_choice"]["iou_by_threshold"]
    assert side["validation_metrics"]["iou"] == pytest.approx(max(ious.values()))
    assert side["threshold_choice"]["at_0.5"]["iou"] == pytest.approx(ious["0.5"])
    vm = side["validation_metrics"]
    assert {"precision", "recall", "mean_probability", "labelled_fraction"} <= set(vm)
    # a sidecar from before the choice: 0.5
    assert model_threshold({k: v for k, v in side.items() if k != "threshold"}) == 0.5


def test_mask_uses_the_recorded_threshold_unless_one_is_given(trained, cube, tmp_path):
    import dask

    from agriland_scale.models.files import read_sidecar, write_sidecar
    from agriland_scale.models.segment import segment_region
    from agriland_scale.store import write_group

    out, _, cfg = trained
    side = read_sidecar(out)
    write_sidecar(out, side | {"threshold": 0.3})  # a threshold the test knows
    local = cube.isel(y=slice(0, 128), x=slice(0, 128))
    store = str(tmp_path / "small.zarr")
    write_group(local, store, "cube")
    kw = dict(window=64, overlap=16, reflectance_max=PER_BAND, batch_size=8, block=128)
    try:
        with dask.config.set(scheduler="synchronous"):
            chosen = segment_region(str(out), store, local, BANDS4, threshold=None, **kw).compute()
            given = segment_region(str(out), store, local, BANDS4, threshold=0.7, **kw).compute()
    finally:
        write_sidecar(out, side)
    p = chosen["probability"].values
    assert chosen["mask"].attrs["threshold"] == 0.3 and given["mask"].attrs["threshold"] == 0.7
    assert np.array_equal(chosen["mask"].values, (p >= 0.3).astype("uint8"))
    assert np.array_equal(given["mask"].values, (p >= 0.7).astype("uint8"))


def test_config_tells_an_unset_threshold_from_a_given_one(demo_cfg):
    from agriland_scale.pipeline.model_stages import _mask_threshold

    assert SegmentConfig().threshold is None
    assert demo_cfg.segment.threshold is None  # the demo takes the validation's
    assert demo_cfg.with_overrides(**{"segment.threshold": 0.5}).segment.threshold == 0.5
    assert _mask_threshold(None, {"threshold": 0.35}) == {
        "mask_threshold": 0.35,
        "mask_threshold_from": "validation",
    }
    assert _mask_threshold(0.5, {"threshold": 0.35}) == {
        "mask_threshold": 0.5,
        "mask_threshold_from": "segment.threshold",
    }
    assert _mask_threshold(None, {})["mask_threshold"] == 0.5


# -- SWIR in the embedded window -----------------------------------------------------------------
def test_swir_bands_load_into_the_10m_cube_from_the_builtin_catalog(demo_cfg, items):
    import dask
    import rasterio

    from agriland_scale.config.files import resolve_path
    from agriland_scale.cube.load import load_cube

    catalog = resolve_path(demo_cfg.search.catalog, None)
    item = json.loads((catalog / "item.json").read_text())
    for key, band in (("swir16", "B11"), ("swir22", "B12")):
        a = item["assets"][key]
        assert a["href"] == f"./{band}.tif" and a["gsd"] == 20 and a["eo:bands"][0]["common_name"] == key
        assert a["raster:bands"][0]["scale"] == 0.0001 and a["proj:transform"][0] == 20.0
    bands = ["red", "nir", "swir16", "swir22"]
    cfg = demo_cfg.cube.model_copy(update={"bands": bands})
    with dask.config.set(scheduler="synchronous"):
        cube = load_cube(items, cfg, demo_cfg.search.bbox).compute()
    refl = cube["reflectance"]
    assert list(refl["band"].values) == bands and refl.shape == (4, SIZE, SIZE)
    assert tuple(cube.rio.transform())[:6] == (10.0, 0.0, ORIGIN_X, 0.0, -10.0, ORIGIN_Y)
    swir = refl.sel(band="swir16").values
    assert np.isfinite(swir).all()
    # bilinear from the 20 m file: 2 x 2 blocks of the cube average to its pixels (the 20 m grid
    # is offset by half a 20 m pixel in x, hence the loose tolerance)
    with rasterio.open(catalog / "B11.tif") as ds:
        src = ds.read(1)[:, 1:] * 1e-4  # column 0 lies west of the window
    blocks = swir.reshape(SIZE // 2, 2, SIZE // 2, 2).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), src[:, : SIZE // 2].ravel())[0, 1] > 0.95
    assert abs(swir.mean() - src.mean()) < 0.002
    assert not np.allclose(swir, refl.sel(band="nir").values)


def test_demo_pipeline_files_agree():
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
    assert shipped.read_text() == DEMO_YAML.read_text()


# -- an RGB weights file meeting 4 bands ---------------------------------------------------------
def test_rgb_weights_file_initialises_a_4_band_unet(tmp_path):
    """Offline, as ImageNet weights would: the first convolution's NIR channel gets the mean
    of the red, green and blue kernels, every kernel scaled by 3/4; other layers as in the file."""
    import keras

    from agriland_scale.models.unet import build_unet

    keras.utils.set_random_seed(3)
    rgb = build_unet("plain", 64, 3, filters=(4, 8, 16))
    path = tmp_path / "rgb.keras"
    rgb.save(path)
    four = build_unet(
        "plain", 64, 4, weights=str(path), filters=(4, 8, 16), bands=["nir", "red", "green", "blue"]
    )
    src, dst = rgb.get_weights(), four.get_weights()
    k3, k4 = src[0], dst[0]  # the first convolution: (3, 3, bands, 4)
    assert k3.shape == (3, 3, 3, 4) and k4.shape == (3, 3, 4, 4)
    np.testing.assert_allclose(k4[:, :, 0], k3.mean(axis=2) * 0.75, rtol=1e-6)  # nir: the mean
    for i in range(3):  # red, green, blue where those bands now are
        np.testing.assert_allclose(k4[:, :, i + 1], k3[:, :, i] * 0.75, rtol=1e-6)
    for a, b in zip(src[1:], dst[1:]):
        np.testing.assert_array_equal(a, b)
    keras.backend.clear_session()


# -- the report -----------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", [None, 0.6])
def test_report_shows_bands_threshold_and_over_prediction(tmp_path, setting):
    from agriland_scale.models.files import write_sidecar
    from agriland_scale.publish.report import write_report

    (tmp_path / "models").mkdir()
    vm = {"iou": 0.871, "f1": 0.93, "precision": 0.9, "recall": 0.95}
    vm |= {"mean_probability": 0.412, "labelled_fraction": 0.37, "predicted_fraction": 0.4}
    write_sidecar(
        str(tmp_path / "models" / "unet.keras"),
        {
            "model": "unet_plain",
            "bands": BANDS4,
            "normalisation": {"reflectance_max": PER_BAND},
            "threshold": 0.45,
            "threshold_choice": {"at_0.5": {"iou": 0.861}},
            "validation_metrics": vm,
            "validation_windows": 7,
            "train_windows": 27,
            "validation": {"side": "west", "split_px": 307},
        },
    )
    config = {"name": "q", "segment": {"threshold": setting}}
    (tmp_path / "run.json").write_text(json.dumps({"config": config, "stages": {}, "timings_s": {}}))
    page = write_report(tmp_path).read_text()
    assert (
        "Bands red, green, blue, nir (reflectance mapped to 1: red 0.3, green 0.3, blue 0.3, nir 0.6)."
        in page
    )
    if setting is None:
        assert "Mask threshold 0.45, chosen on the validation strip" in page and "IoU at 0.5: 0.861" in page
    else:
        assert "Mask threshold 0.6, set by segment.threshold (the validation strip chose 0.45)." in page
    assert "Over-prediction: mean probability 0.412 against 0.370 of the labelled validation pixels" in page
    assert "(+0.042); 0.400 of them in the mask." in page
    assert "0.950" in page  # recall, in the metrics table
