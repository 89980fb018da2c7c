"""The U-Net's training data: labelled windows, the validation split, augmentation, metrics.

Windows are cut from the label raster (uint8 on the cube grid: 1 agricultural, 0 other,
255 ignored); a strip of the region (``segment.train.validation``) is held out for
validation, so that validation windows never overlap training windows.
"""

from __future__ import annotations

import numpy as np

from agriland_scale.config.schema import SegmentConfig
from agriland_scale.errors import LabelError
from agriland_scale.labels.classes import IGNORE
from agriland_scale.patches import window_starts

__all__ = ["THRESHOLDS", "choose_threshold", "training_windows", "unet_augment_fn", "unet_windows"]


def unet_windows(
    label: np.ndarray, window: int, stride: int, cfg: SegmentConfig
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """Training and validation window offsets from a label mask, split spatially.

    The validation part is the ``validation_fraction`` of the region on the
    ``cfg.train.validation`` side; a window lies wholly on one side of the split (windows
    that straddle it are dropped), and only windows with labelled pixels are kept. Returns (train offsets, validation offsets, split position in pixels).
    """
    h, w = label.shape
    side = cfg.train.validation
    frac = cfg.train.validation_fraction
    along = w if side in ("east", "west") else h
    split = int(round(along * (1 - frac))) if side in ("east", "south") else int(round(along * frac))
    rows = np.unique(np.clip(window_starts(h, window, stride, 0), 0, max(h - window, 0)))
    cols = np.unique(np.clip(window_starts(w, window, stride, 0), 0, max(w - window, 0)))
    train, val = [], []
    for r in rows:
        for c in cols:
            lo, hi = (c, c + window) if side in ("east", "west") else (r, r + window)
            lab = label[r : r + window, c : c + window]
            if (lab != IGNORE).mean() < 0.02:
                continue
            first_part = hi <= split
            second_part = lo >= split
            is_val = second_part if side in ("east", "south") else first_part
            is_train = first_part if side in ("east", "south") else second_part
            if is_val:
                val.append((int(r), int(c)))
            elif is_train:
                train.append((int(r), int(c)))
    return train, val, split


def _unet_augmenter(seed: int):
    import keras
    from keras import layers

    # seed x15: rotation 20 deg, shifts 0.2, zoom 0.2, flips, shear; nearest keeps labels exact
    kw = dict(fill_mode="constant", fill_value=0.0, interpolation="nearest")
    return keras.Sequential(
        [
            layers.RandomRotation(20 / 360, seed=seed, **kw),
            layers.RandomTranslation(0.2, 0.2, seed=seed + 1, **kw),
            layers.RandomZoom(0.2, seed=seed + 2, **kw),
            layers.RandomShear(0.2, 0.2, seed=seed + 3, **kw),
            layers.RandomFlip("horizontal_and_vertical", seed=seed + 4),
        ]
    )


def unet_augment_fn(n_bands: int, seed: int, *, brightness: bool = True):
    """Build the seed's U-Net augmentation as one function ``(images, labels) -> (images, labels)``.

    It works on batches ``(n, h, w, n_bands)`` float in [0, 1] and ``(n, h, w, 1)`` (0, 1,
    255 = ignore).

    Image and label are stacked and moved by the same random rotation (20 deg), shifts (0.2),
    zoom (0.2), shear (0.2) and flips, with nearest-neighbour sampling, so every label value
    stays where its pixel goes; pixels brought in from outside the window are 0 in the image
    and 255 (ignored) in the label. Then (``brightness``) a random brightness shift of up to
    0.2 on the image only.

    Parameters
    ----------
    n_bands : int
        The number of image bands (the last axis of the images).
    seed : int
        Seed of the random layers.
    brightness : bool
        Also shift the image's brightness.

    Returns
    -------
    callable
        ``augment(images, labels) -> (images, labels)`` on TensorFlow tensors, labels float.
    """
    import keras
    import tensorflow as tf

    aug = _unet_augmenter(seed)
    bright = keras.layers.RandomBrightness(0.2, value_range=(0.0, 1.0), seed=seed + 5)

    @tf.autograph.experimental.do_not_convert
    def augment(img, lab):
        # encode label as 0 = ignore, 1 = other, 2 = positive, so padding becomes 'ignore'
        code = tf.where(lab == IGNORE, 0.0, tf.cast(lab, tf.float32) + 1.0)
        stack = aug(tf.concat([img, code], -1), training=True)
        img2, code2 = stack[..., :n_bands], tf.round(stack[..., n_bands:])
        lab2 = tf.where(code2 == 0, float(IGNORE), code2 - 1.0)
        return (bright(img2, training=True) if brightness else img2), lab2

    return augment


def training_windows(
    label: np.ndarray, cfg: SegmentConfig, where: str = "the labels"
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """Return the :func:`unet_windows` of ``label`` (half-window stride), refusing useless labels.

    Labels that cannot train a U-Net are refused: no training or validation window, or no
    agricultural (1) or no other (0) pixel in the training windows. Cheap (NumPy on the label
    raster): the pipeline calls it before it starts a training task, and the task again.

    Parameters
    ----------
    label : numpy.ndarray
        ``(y, x)`` uint8 on the cube grid (1 / 0 / 255 = ignored).
    cfg : SegmentConfig
        The segmentation settings (``window`` in pixels, ``train``).
    where : str
        The label source, named in messages.

    Returns
    -------
    tuple
        (training window offsets ``(row, col)``, validation window offsets, split position
        in pixels), as :func:`unet_windows` returns them.

    Raises
    ------
    LabelError
        Naming ``where`` (the label source), the counts found and what to do.
    """
    win, tc = cfg.window, cfg.train
    tr, va, split = unet_windows(label, win, win // 2, cfg)
    if not tr or not va:
        raise LabelError(
            f"{where} give {len(tr)} training and {len(va)} validation windows of "
            f"{win} px (validation: the {tc.validation} {tc.validation_fraction:.0%} of "
            "the region): label pixels on both sides, or change "
            "segment.train.validation / validation_fraction"
        )
    seen = np.zeros(256, dtype=np.int64)
    for r, c in tr:
        seen += np.bincount(label[r : r + win, c : c + win].ravel(), minlength=256)[:256]
    pos, neg = int(seen[1]), int(seen[0])
    if pos == 0 or neg == 0:
        missing = "agricultural (positive)" if pos == 0 else "other (negative)"
        raise LabelError(
            f"{where} hold {pos:,} agricultural and {neg:,} other pixels in the training area "
            f"({len(tr)} windows of {win} px outside the {tc.validation} validation part): with no "
            f"{missing} pixel the U-Net cannot learn. Add {missing} polygons (class values in "
            f"segment.positive_classes {list(cfg.positive_classes)} count as agricultural, any other "
            "class as other)"
        )
    return tr, va, split


# the thresholds tried on the validation strip: 0.05, 0.10 ... 0.95
THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Compute validation metrics of probabilities ``p`` against labels ``y`` (labelled pixels).

    ``y``: uint8 labels (1 agricultural, 0 other, 255 ignored), ``p``: probabilities 0..1 of
    the same shape. Returns, at ``threshold``: ``iou``, ``f1``, ``pixel_accuracy``,
    ``precision``, ``recall`` (of the agricultural class); and, independent of it,
    ``mean_probability`` (the mean predicted probability over labelled pixels) against
    ``labelled_fraction`` (the fraction of labelled pixels that are agricultural), whose
    difference is the over-prediction; ``predicted_fraction``: pixels at or above the
    threshold, of the labelled ones. Fractions in 0..1; NaN when no pixel is labelled.
    """
    valid = y != IGNORE
    yt, pv = y[valid] == 1, p[valid]
    yp = pv >= threshold
    tp, fp, fn = float((yt & yp).sum()), float((~yt & yp).sum()), float((yt & ~yp).sum())
    some = bool(valid.any())
    return {
        "iou": tp / max(tp + fp + fn, 1),
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "pixel_accuracy": float((yt == yp).mean()) if some else float("nan"),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "mean_probability": float(pv.mean(dtype="float64")) if some else float("nan"),
        "labelled_fraction": float(yt.mean()) if some else float("nan"),
        "predicted_fraction": float(yp.mean()) if some else float("nan"),
    }


def choose_threshold(
    y: np.ndarray, p: np.ndarray, grid: tuple[float, ...] = THRESHOLDS
) -> tuple[float, dict[str, float]]:
    """Pick the mask threshold with the highest IoU of ``p`` against ``y`` on the validation windows.

    Parameters
    ----------
    y : numpy.ndarray
        uint8 labels (1 / 0 / 255 = ignored) of the validation windows, e.g. ``(n, h, w, 1)``.
    p : numpy.ndarray
        The U-Net's probabilities (0..1) on them, of the same shape.
    grid : tuple of float
        The thresholds tried (default 0.05, 0.10 ... 0.95).

    Returns
    -------
    tuple
        (the threshold, ``{threshold: IoU}`` for every threshold tried, keys as strings such
        as ``"0.45"``). Ties go to the threshold nearest 0.5 (no labelled agricultural pixel:
        0.5). The IoU at the chosen threshold is measured on the pixels it was chosen on, so
        it is optimistic; the IoU at 0.5 beside it is not.
    """
    valid = y != IGNORE
    yt, pv = y[valid] == 1, p[valid]
    n_pos = float(yt.sum())
    ious = {}
    for t in grid:
        yp = pv >= t
        tp = float((yt & yp).sum())
        ious[f"{t:g}"] = tp / max(n_pos + float(yp.sum()) - tp, 1)
    best = max(grid, key=lambda t: (round(ious[f"{t:g}"], 12), -abs(t - 0.5)))
    return float(best), ious
