"""The U-Net augmentation moves image and label together (the seed's rotation, shifts, zoom,
shear, flips), on real windows of the demo cube labelled with a rule of their own pixels."""

from __future__ import annotations

import numpy as np

from agriland_scale.models.windows import unet_augment_fn
from agriland_scale.patches import read_patches


def test_image_and_label_move_together(cube):
    x = read_patches(
        cube["reflectance"],
        np.array([0, 256, 512, 768]),
        np.array([0, 512, 256, 768]),
        128,
        ["red", "green", "blue"],
        0.3,
    )
    # a label that is a function of each pixel: bright red = 1, else 0; a corner unlabelled
    lab = (x[..., :1] > np.median(x[..., 0])).astype("float32")
    lab[:, :16, :16] = 255
    img2, lab2 = (np.asarray(a) for a in unet_augment_fn(3, seed=7, brightness=False)(x, lab))
    assert img2.shape == x.shape and lab2.shape == lab.shape
    assert set(np.unique(lab2)) <= {0.0, 1.0, 255.0}
    assert not np.allclose(img2, x)  # something moved
    known = lab2[..., 0] != 255
    rule = (img2[..., 0] > np.median(x[..., 0])).astype("float32")
    assert known.mean() > 0.3
    np.testing.assert_array_equal(lab2[..., 0][known], rule[known])  # the label followed its pixel
    # pixels from outside the window: zero image, ignored label (not a made-up class)
    outside = (img2 == 0).all(-1) & (x.min() > 0)
    assert outside.sum() > 100 and (lab2[..., 0][outside] == 255).all()
    # brightness changes the image only: same seeds, same geometry, same labels
    img3, lab3 = (np.asarray(a) for a in unet_augment_fn(3, seed=7)(x, lab))
    np.testing.assert_array_equal(lab3, lab2)
    assert not np.allclose(img3, img2)
