"""The seed's convolutional autoencoder (CAE) with a ResNet-50 encoder.

Encoder: ResNet-50 (no top) on ``(size, size, n_bands)`` in [0, 1] -> conv map
``(size/32, size/32, 2048)`` -> head -> Dense ``embedding_dim`` named ``embedding``.
Head ``flatten`` (seed): Flatten -> Dense 4096 ReLU (Glorot). Head ``gap``: global average
pooling -> Dense 4096 ReLU (far lighter). Decoder (training only), from the conv map: five
[Conv2DTranspose stride 2 + Conv2D] pairs with 512, 256, 128, 64, 64 filters, LeakyReLU(0.1)
and BatchNorm, then a ``n_bands`` sigmoid conv back to the input size. The two output layers
compute in float32 under any dtype policy (a ``mixed_bfloat16`` training builds the rest in it).

As in the seed, the reconstruction loss trains the backbone and decoder; the Dense head
that produces the embedding hangs off the conv map and is not on the reconstruction path.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from agriland_scale.models.backbone import build_backbone, load_weights_file

__all__ = ["build_cae", "cae_augmenter", "encoder_from_cae"]


def build_cae(
    size: int = 256,
    n_bands: int = 3,
    *,
    head: str = "flatten",
    weights: str = "imagenet",
    embedding_dim: int = 100,
    dense_units: int = 4096,
    seed: int = 0,
    bands: Sequence[str] | None = None,
) -> keras.Model:
    """Build the CAE: one model with outputs ``[reconstruction, embedding]``.

    ``weights``: ``imagenet`` (backbone), a ``.keras``/``.weights.h5`` file (whole CAE) or
    ``none``. Reconstruction ``(n, size, size, n_bands)``, embedding ``(n, embedding_dim)``.
    ``bands`` (canonical names) place the ImageNet colour kernels for inputs other than
    red, green, blue (see :func:`~.backbone.adapt_first_conv`).
    """
    inp = keras.Input((size, size, n_bands), name="patch")
    backbone = build_backbone(
        "resnet50", size, n_bands, "imagenet" if weights == "imagenet" else "none", bands
    )
    fmap = backbone(inp)
    init = keras.initializers.GlorotUniform(seed=seed)
    h = layers.Flatten()(fmap) if head == "flatten" else layers.GlobalAveragePooling2D()(fmap)
    h = layers.Dense(dense_units, activation="relu", kernel_initializer=init, name="dense_head")(h)
    # the outputs compute in float32 whatever the dtype policy (mixed precision's advice)
    emb = layers.Dense(
        embedding_dim,
        kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
        name="embedding",
        dtype="float32",
    )(h)
    x = fmap
    for f in (512, 256, 128, 64, 64):
        x = layers.Conv2DTranspose(f, 3, strides=2, padding="same")(x)
        x = layers.LeakyReLU(0.1)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Conv2D(f, 3, padding="same")(x)
        x = layers.LeakyReLU(0.1)(x)
        x = layers.BatchNormalization()(x)
    recon = layers.Conv2D(
        n_bands, 3, padding="same", activation="sigmoid", name="reconstruction", dtype="float32"
    )(x)
    model = keras.Model(inp, [recon, emb], name=f"cae_resnet50_{head}")
    if weights not in ("imagenet", "none"):
        load_weights_file(model, weights, bands)
    return model


def cae_augmenter(seed: int) -> keras.Sequential:
    """Build the seed's CAE augmentation: rotation 90 deg, shifts 0.3, zoom 0.5-1.5, flips (seeded)."""
    return keras.Sequential(
        [
            layers.RandomRotation(0.25, fill_mode="reflect", seed=seed),
            layers.RandomTranslation(0.3, 0.3, fill_mode="reflect", seed=seed + 1),
            layers.RandomZoom((-0.5, 0.5), fill_mode="reflect", seed=seed + 2),
            layers.RandomFlip("horizontal_and_vertical", seed=seed + 3),
        ]
    )


def encoder_from_cae(cae: keras.Model) -> keras.Model:
    """Return the encoder part of a CAE: patch -> embedding ``(n, embedding_dim)``."""
    return keras.Model(cae.input, cae.get_layer("embedding").output, name="cae_encoder")
