"""U-Nets for per-pixel agricultural-land probability, built from keras.applications.

Variants: ``plain`` (the seed's 32-64-128-256-512, two conv3x3-BN-ReLU per level),
``resnet50`` and ``inceptionv3`` encoders. InceptionV3 uses 'valid' convolutions, so its
feature maps at 256 px are 127, 62, 29, 14, 6 px; decoder maps are resized to each skip's
size before concatenation, which makes every encoder work at any input size.
Input ``(size, size, n_bands)`` in [0, 1]; output ``(size, size, 1)`` sigmoid probability.
The plain U-Net is fully convolutional: built with ``size=None`` it takes any height and
width divisible by ``2 ** (len(filters) - 1)`` (32 by default), and the weights of a model
built at the window size load into it unchanged (``set_weights``), e.g. to predict a whole
image in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from agriland_scale.labels.classes import IGNORE
from agriland_scale.models.backbone import build_backbone, load_weights_file

__all__ = ["build_unet", "masked_bce", "masked_bce_dice", "masked_dice", "masked_iou", "unet_loss"]


def _conv_block(x, f: int):
    for _ in range(2):
        x = layers.Conv2D(f, 3, padding="same", use_bias=False)(x)
        # momentum 0.9 (Keras default 0.99): the moving statistics used at inference settle
        # within tens of steps, which short CPU schedules need (measured: with 0.99 and 42
        # steps, training IoU 0.93 but inference predicted ~0 everywhere)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("relu")(x)
    return x


def _up(x, skip, f: int):
    x = layers.Conv2DTranspose(f, 2, strides=2, padding="same")(x)
    h, w = skip.shape[1], skip.shape[2]
    if (x.shape[1], x.shape[2]) != (h, w):
        x = layers.Resizing(h, w, interpolation="bilinear")(x)
    return _conv_block(layers.Concatenate()([x, skip]), f)


def _pick_skips(backbone: keras.Model, size: int) -> list:
    """Last layer output at each scale closest to size/2, /4, /8, /16 (largest first)."""
    last_at: dict[int, object] = {}
    for layer in backbone.layers[1:]:
        shape = layer.output.shape
        if len(shape) == 4 and shape[1] is not None and shape[1] <= size:
            last_at[shape[1]] = layer.output
    skips = []
    for t in (size // 2, size // 4, size // 8, size // 16):
        best = min(last_at, key=lambda s: (abs(s - t), -s))
        skips.append(last_at[best])
    return skips


def build_unet(
    encoder: str = "plain",
    size: int | None = 256,
    n_bands: int = 3,
    *,
    weights: str = "none",
    filters: tuple[int, ...] = (32, 64, 128, 256, 512),
    bands: Sequence[str] | None = None,
) -> keras.Model:
    """Build a U-Net giving a probability ``(n, size, size, 1)`` for ``(n, size, size, n_bands)`` inputs.

    Parameters
    ----------
    encoder : str
        ``plain`` or a Keras backbone name (see :func:`~.backbone.build_backbone`).
    size : int or None
        The input height and width in pixels; ``None`` (plain encoder only) builds a model for
        any height and width divisible by ``2 ** (len(filters) - 1)``.
    n_bands : int
        The number of input bands.
    weights : str
        ``imagenet`` (encoder), a file (whole model; an RGB model's file meets more bands as
        ImageNet weights do, see :func:`~.backbone.load_weights_file`) or ``none``.
    filters : tuple of int
        Filters of the plain encoder's levels.
    bands : sequence of str, optional
        Canonical band names, placing the ImageNet colour kernels
        (:func:`~.backbone.adapt_first_conv`).

    Returns
    -------
    keras.Model
        The U-Net.

    Raises
    ------
    ValueError
        For ``size=None`` with another encoder than ``plain``.
    """
    if size is None and encoder != "plain":
        raise ValueError(
            f"a U-Net of any input size (size=None) needs the plain encoder, not "
            f"{encoder!r} (its skips are picked by feature-map size): give the size in px"
        )
    inp = keras.Input((size, size, n_bands), name="image")
    if encoder == "plain":
        skips, x = [], inp
        for f in filters[:-1]:
            x = _conv_block(x, f)
            skips.append(x)
            x = layers.MaxPooling2D()(x)
        x = _conv_block(x, filters[-1])
        for f, skip in zip(reversed(filters[:-1]), reversed(skips)):
            x = _up(x, skip, f)
    else:
        assert size is not None  # refused above: only the plain encoder takes any size
        bb = build_backbone(encoder, size, n_bands, "imagenet" if weights == "imagenet" else "none", bands)
        feats = keras.Model(bb.input, _pick_skips(bb, size) + [bb.output], name=f"{encoder}_encoder")
        *skips, x = feats(inp)
        for f, skip in zip((256, 128, 64, 32), reversed(skips)):
            x = _up(x, skip, f)
        x = _up(x, inp, 16)
    out = layers.Conv2D(1, 1, activation="sigmoid", name="probability", dtype="float32")(x)
    model = keras.Model(inp, out, name=f"unet_{encoder}")
    if weights not in ("imagenet", "none"):
        load_weights_file(model, weights, bands)
    return model


@keras.saving.register_keras_serializable(package="agriland")
def masked_bce(y_true, y_pred):
    """Binary cross-entropy over labelled pixels only (label 255 = unlabelled, ignored)."""
    from keras import ops

    valid = ops.cast(ops.not_equal(y_true, IGNORE), "float32")
    y = ops.cast(ops.equal(y_true, 1), "float32")
    p = ops.clip(y_pred, 1e-7, 1 - 1e-7)
    bce = -(y * ops.log(p) + (1 - y) * ops.log(1 - p))
    return ops.sum(bce * valid) / ops.maximum(ops.sum(valid), 1.0)


@keras.saving.register_keras_serializable(package="agriland")
def masked_dice(y_true, y_pred):
    """Compute the soft Dice loss ``1 - (2 sum(y p) + 1) / (sum(y) + sum(p) + 1)`` of the positive class.

    Over labelled pixels (label 255 ignored); the +1 smoothing keeps a batch without
    positives finite.
    """
    from keras import ops

    valid = ops.cast(ops.not_equal(y_true, IGNORE), "float32")
    y = ops.cast(ops.equal(y_true, 1), "float32") * valid
    p = ops.cast(y_pred, "float32") * valid
    return 1.0 - (2.0 * ops.sum(y * p) + 1.0) / (ops.sum(y) + ops.sum(p) + 1.0)


@keras.saving.register_keras_serializable(package="agriland")
def masked_bce_dice(y_true, y_pred):
    """``masked_bce + masked_dice``."""
    return masked_bce(y_true, y_pred) + masked_dice(y_true, y_pred)


def unet_loss(name: str):
    """Return the training loss for ``segment.train.loss``: ``bce`` (seed), ``dice`` or ``bce+dice``."""
    return {"bce": masked_bce, "dice": masked_dice, "bce+dice": masked_bce_dice}[name]


@keras.saving.register_keras_serializable(package="agriland")
def masked_iou(y_true, y_pred):
    """IoU of the positive class at threshold 0.5 over labelled pixels."""
    from keras import ops

    valid = ops.cast(ops.not_equal(y_true, IGNORE), "float32")
    y = ops.cast(ops.equal(y_true, 1), "float32") * valid
    p = ops.cast(y_pred > 0.5, "float32") * valid
    inter = ops.sum(y * p)
    union = ops.sum(ops.maximum(y, p))
    return inter / ops.maximum(union, 1.0)
