"""Cloud masks on real samples: s2cloudless on the Virginia L1C window (all the bands it needs,
tests/data/virginia-l1c), the SCL / s2cloudless choice, and the cloud_mask configuration."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import dask
import numpy as np
import pystac
import pytest
from pydantic import ValidationError

from agriland_scale import load_config
from agriland_scale.config.schema import CubeConfig
from agriland_scale.cube.clouds import S2CLOUDLESS_BANDS, s2cloudless_mask, s2cloudless_reflectance
from agriland_scale.cube.load import cube_geobox, load_bands, load_cube
from agriland_scale.cube.masks import check_not_empty
from agriland_scale.errors import BandMismatch, ConfigError, EmptyRegion
from agriland_scale.search.items import normalize_items

from .conftest import DEMO_YAML, SIZE, VIRGINIA

# the detector is the [s2cloudless] extra, not the lean [test] one: CI installs it (.ci/run)
NEEDS_S2CLOUDLESS = pytest.mark.skipif(
    importlib.util.find_spec("s2cloudless") is None,
    reason="s2cloudless is not installed: pip install -e '.[s2cloudless]' (CI installs it)",
)

DATA = Path(__file__).parent / "data"
L1C = DATA / "virginia-l1c" / "item.json"
L2A = DATA / "l2a-29rkh" / "item.json"
# the demo window: the cube covers exactly the 10 m bands' 1024 x 1024 px
BBOX = pystac.Item.from_file(str(VIRGINIA / "item.json")).bbox


def _item(path: Path = L1C) -> pystac.Item:
    return pystac.Item.from_file(str(path))


def _compute(obj):
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return obj.compute()


@NEEDS_S2CLOUDLESS
def test_s2cloudless_on_cloud_free_l1c_flags_little():
    """The Virginia scene is cloud-free: at the s2cloudless defaults (measured: 0 % flagged;
    the largest averaged cloud probability is about 0.16 < 0.4) almost every pixel is clear."""
    cfg = CubeConfig(cloud_mask="s2cloudless")
    assert (
        cfg.s2cloudless_threshold,
        cfg.s2cloudless_average_over,
        cfg.s2cloudless_dilation_size,
        cfg.s2cloudless_resolution,
    ) == (0.4, 4, 2, 160)
    cube = _compute(load_cube([_item()], cfg, BBOX))
    assert cube.sizes["y"] == cube.sizes["x"] == SIZE
    attrs = cube["clear_count"].attrs
    assert attrs["cloud_mask"] == "s2cloudless" and attrs["s2cloudless_threshold"] == 0.4
    flagged = (cube["clear_count"].values == 0).mean()
    assert flagged < 0.02
    # the composite itself is untouched by the mask's extra bands: still the 10 m pixels
    plain = _compute(load_cube([_item()], CubeConfig(cloud_mask="none"), BBOX))
    clear = cube["clear_count"].values > 0
    np.testing.assert_array_equal(cube["reflectance"].values[:, clear], plain["reflectance"].values[:, clear])


def test_s2cloudless_reflectance_is_toa_on_the_coarse_grid():
    cfg = CubeConfig(cloud_mask="s2cloudless", chunk=128)
    (item,) = normalize_items([_item()], load_bands([_item()], cfg))
    refl = s2cloudless_reflectance([item], cfg, cube_geobox([item], BBOX, 10))
    assert refl.dims == ("time", "y", "x", "band") and list(refl.band.values) == list(S2CLOUDLESS_BANDS)
    assert refl.shape == (1, 64, 64, 10) and refl.chunks[1] == (8,) * 8 and refl.dtype == "float32"
    assert float(refl.x[1] - refl.x[0]) == 160
    r = _compute(refl).values
    assert np.isfinite(r).all() and 0 <= r.min() and r.max() < 1  # DN / 10000, baseline < 04.00
    # B10 (cirrus) is dark in a clear sky, B08 (NIR) bright over vegetation
    assert r[..., S2CLOUDLESS_BANDS.index("B10")].max() < 0.01 < r[..., S2CLOUDLESS_BANDS.index("B08")].mean()


@NEEDS_S2CLOUDLESS
def test_chunked_mask_equals_whole_image_s2cloudless():
    """8 x 8 chunks of 8 coarse px with a 6 px halo give the whole-image result exactly. The
    threshold is lowered so that the mask is mixed (about 40 % cloud) and seams would show."""
    from s2cloudless import S2PixelCloudDetector

    cfg = CubeConfig(cloud_mask="s2cloudless", chunk=128, s2cloudless_threshold=0.08)
    (item,) = normalize_items([_item()], load_bands([_item()], cfg))
    gb = cube_geobox([item], BBOX, 10)
    mask = s2cloudless_mask([item], cfg, gb)
    assert mask.dims == ("time", "y", "x") and mask.shape == (1, SIZE, SIZE)
    assert mask.chunks[1] == (128,) * 8
    with dask.config.set(scheduler="synchronous"):  # one read of the bands for both
        got, bands = dask.compute(mask.data, s2cloudless_reflectance([item], cfg, gb).data)
    assert bands.shape == (1, 64, 64, 10)
    det = S2PixelCloudDetector(threshold=0.08, average_over=4, dilation_size=2, all_bands=False)
    whole = det.get_cloud_masks(bands).astype(bool)
    assert 0.2 < whole.mean() < 0.8
    np.testing.assert_array_equal(got, whole.repeat(16, axis=1).repeat(16, axis=2))


@NEEDS_S2CLOUDLESS
def test_mask_crops_to_a_grid_not_a_multiple_of_the_processing_pixel():
    """A region whose grid is not a whole number of 160 m pixels: repeat, then crop."""
    cfg = CubeConfig(cloud_mask="s2cloudless", chunk=128, s2cloudless_threshold=0.08)
    (item,) = normalize_items([_item()], load_bands([_item()], cfg))
    gb = cube_geobox([item], (-75.69, 37.63, -75.62, 37.69), 10)
    assert gb.shape[0] % 16 and gb.shape[1] % 16
    mask = s2cloudless_mask([item], cfg, gb)
    assert mask.shape[1:] == gb.shape
    with dask.config.set(scheduler="synchronous"):
        got, bands = dask.compute(mask.data, s2cloudless_reflectance([item], cfg, gb).data)
    from s2cloudless import S2PixelCloudDetector

    whole = S2PixelCloudDetector(threshold=0.08, average_over=4, dilation_size=2).get_cloud_masks(bands)
    up = whole.astype(bool).repeat(16, axis=1).repeat(16, axis=2)[:, : gb.shape[0], : gb.shape[1]]
    np.testing.assert_array_equal(got, up)


@NEEDS_S2CLOUDLESS
def test_everything_cloud_leaves_an_empty_region():
    """A threshold below every averaged probability of the scene (min about 0.002) marks all
    pixels cloud: the mask reaches the composite."""
    cube = load_cube([_item()], CubeConfig(cloud_mask="s2cloudless", s2cloudless_threshold=0.001), BBOX)
    with pytest.raises(EmptyRegion, match="every pixel"):
        with dask.config.set(scheduler="synchronous"):
            check_not_empty(cube)
    assert np.isnan(_compute(cube["reflectance"]).values).all()


def test_s2cloudless_refuses_l2a_without_b10():
    cfg = CubeConfig(cloud_mask="s2cloudless", resolution=100, chunk=128, s2cloudless_resolution=200)
    with pytest.raises(
        BandMismatch, match=r"S2A_29RKH_20200219_0_L2A_window has no asset for .*B10 \(cirrus\).*L1C"
    ):
        load_cube([_item(L2A)], cfg, _item(L2A).bbox)


def test_scl_mode_requires_scl_and_auto_falls_back():
    with pytest.raises(BandMismatch, match=r"S2_L1C_18S_virginia_window_l1c has no 'scl' asset"):
        load_cube([_item()], CubeConfig(cloud_mask="scl"), BBOX)
    assert load_cube([_item()], CubeConfig(), BBOX)["clear_count"].attrs["cloud_mask"] == "none"
    l2a = CubeConfig(cloud_mask="scl", resolution=100, chunk=128)
    assert load_cube([_item(L2A)], l2a, _item(L2A).bbox)["clear_count"].attrs["cloud_mask"] == "scl"
    assert load_bands([_item(L2A)], l2a)[-1] == "scl"
    assert "scl" not in load_bands([_item(L2A)], CubeConfig(cloud_mask="none"))


def _pipeline(tmp_path, cube_lines: str) -> Path:
    text = DEMO_YAML.read_text().replace("  composite: median\n", "  composite: median\n" + cube_lines)
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("old, new", [(True, "auto"), (False, "none"), ("s2cloudless", "s2cloudless")])
def test_cloud_mask_accepts_old_booleans(tmp_path, old, new):
    assert CubeConfig(cloud_mask=old).cloud_mask == new
    value = {True: "true", False: "false"}.get(old, old)
    assert load_config(_pipeline(tmp_path, f"  cloud_mask: {value}\n")).cube.cloud_mask == new


def test_bad_cloud_mask_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"cube\.cloud_mask.*'auto', 'scl', 's2cloudless' or 'none'"):
        load_config(_pipeline(tmp_path, "  cloud_mask: fmask\n"))
    with pytest.raises(
        ConfigError,
        match=r"s2cloudless_resolution \(150 m\) must be a whole multiple of "
        r"cube.resolution \(10 m\).*try 160 m",
    ):
        load_config(_pipeline(tmp_path, "  cloud_mask: s2cloudless\n  s2cloudless_resolution: 150\n"))
    with pytest.raises(ValidationError, match=r"divides cube.chunk \(256 px\).*try 320 m"):
        CubeConfig(cloud_mask="s2cloudless", s2cloudless_resolution=300)
    # the processing grid is only checked when s2cloudless is asked for
    assert CubeConfig(resolution=100, chunk=128).s2cloudless_resolution == 160
