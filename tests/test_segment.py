"""Blended window inference on the real cube with a real (small, untrained) Keras U-Net."""

import numpy as np
import pytest

from agriland_scale.models.unet import build_unet
from agriland_scale.segment import predict_block


@pytest.fixture(scope="module")
def small_unet():
    import keras

    keras.utils.set_random_seed(1)
    return build_unet("plain", 64, 3, weights="none", filters=(4, 8, 16))


@pytest.fixture(scope="module")
def region(cube):
    sub = cube.isel(y=slice(0, 200), x=slice(0, 160))
    return (sub["reflectance"].sel(band=["red", "green", "blue"]).values, sub["clear_count"].values)


def test_tiled_equals_whole_image(small_unet, region):
    refl, clear = region
    kw = dict(window=64, overlap=16, reflectance_max=0.3, batch_size=32)
    whole = predict_block(small_unet, refl, clear, 0, 0, 200, 160, **kw)
    tiled = np.zeros_like(whole)
    for gy in range(0, 200, 48):
        for gx in range(0, 160, 48):
            h, w = min(48, 200 - gy), min(48, 160 - gx)
            tiled[gy:gy + h, gx:gx + w] = predict_block(small_unet, refl, clear, gy, gx, h, w, **kw)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert np.isfinite(whole).all() and 0 <= whole.min() and whole.max() <= 1


def test_nodata_stays_nodata(small_unet, region):
    refl, clear = region
    clear = clear.copy()
    clear[10:20, 30:40] = 0
    p = predict_block(small_unet, refl, clear, 0, 0, 200, 160, window=64, overlap=16,
                      reflectance_max=0.3, batch_size=32)
    assert np.isnan(p[10:20, 30:40]).all() and np.isfinite(p[30:, :]).all()
