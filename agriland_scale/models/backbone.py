"""Keras-applications backbones with the three weight choices: imagenet | file | none."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from agriland_scale.errors import BandMismatch, CorruptInput

__all__ = ["adapt_first_conv", "build_backbone", "load_weights_file", "transfer_weights"]

BN_MOMENTUM_FROM_SCRATCH = 0.9
_RGB = ("red", "green", "blue")
# the colour of each input channel of the ImageNet first convolution: keras.applications'
# ResNet50 was trained on BGR ("caffe" preprocessing), InceptionV3 on RGB
_KERNEL_ORDER = {"resnet50": ("blue", "green", "red"), "inceptionv3": _RGB}

_APPS = {
    "resnet50": keras.applications.ResNet50,
    "inceptionv3": keras.applications.InceptionV3,
}


def build_backbone(
    name: str, size: int, n_bands: int, weights: str, bands: Sequence[str] | None = None
) -> keras.Model:
    """Build a headless backbone for ``(size, size, n_bands)`` inputs.

    ``weights="imagenet"`` loads Keras' ImageNet weights (from ``~/.keras/models`` or the
    network); randomly initialised backbones get BatchNormalization momentum 0.9 (see below).
    For other than 3 bands the ImageNet model is built for RGB and its weights are
    copied into an ``n_bands`` model, the first convolution adapted by
    :func:`adapt_first_conv` (``bands``: the input's canonical band names, to put the red,
    green and blue kernels where those bands are). Any other ``weights`` value builds the
    backbone randomly initialised (a file is loaded later, onto the whole model).

    Parameters
    ----------
    name : str
        The Keras application (a key of ``_APPS``, e.g. ``resnet50``, ``inceptionv3``).
    size : int
        The patch side in pixels.
    n_bands : int
        The number of input bands.
    weights : str
        ``imagenet``, or anything else for a random initialisation.
    bands : sequence of str, optional
        The input's canonical band names, to place the ImageNet colour kernels.

    Returns
    -------
    keras.Model
        The backbone without its classification head.

    Raises
    ------
    CorruptInput
        When the ImageNet weights cannot be had (e.g. offline).
    """
    app = _APPS[name]
    if weights == "imagenet":
        try:
            rgb = app(include_top=False, weights="imagenet", input_shape=(size, size, 3))
        except Exception as e:  # network errors come in many types (URLError, OSError, ...)
            raise CorruptInput(
                f"cannot get ImageNet weights for {name} ({type(e).__name__}: {e}). Offline, put "
                f"the Keras weights file in ~/.keras/models/, or set weights to a local file or "
                "'none'"
            ) from None
        order = _KERNEL_ORDER[name]
        if bands is None:
            bands = list(_RGB[:n_bands]) + [f"band{i}" for i in range(3, n_bands)]
        if tuple(bands) == order:
            return rgb
        model = app(include_top=False, weights=None, input_shape=(size, size, n_bands))
        transfer_weights(rgb, model, bands, order)
        return model
    model = app(include_top=False, weights=None, input_shape=(size, size, n_bands))
    # trained from scratch: Keras' BatchNormalization momentum of 0.99 leaves the moving
    # statistics near their initial values (mean 0, variance 1) for hundreds of steps, so a
    # short training predicts garbage in inference mode (measured: InceptionV3 U-Net, 48 steps,
    # validation IoU 0.03 at 0.99); 0.9, as in the plain U-Net, tracks them within ~20 steps
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM_FROM_SCRATCH
    return model


def adapt_first_conv(kernel: np.ndarray, bands: Sequence[str], order: Sequence[str] = _RGB) -> np.ndarray:
    """Adapt a colour convolution kernel ``(kh, kw, 3, filters)`` to the input ``bands``.

    The kernel's input channels are in ``order`` (e.g. red, green, blue); the result is
    ``(kh, kw, len(bands), filters)``.

    Each band takes the kernel slice of its colour when it is ``red``, ``green`` or ``blue``
    (canonical names) and the mean of the three slices otherwise (e.g. NIR, SWIR); the result
    is scaled by ``3 / len(bands)`` so that a uniform input gives the activations it gave the
    colour model. The usual way to start a multispectral model from ImageNet weights (as
    timm's ``adapt_input_conv``); the model is then fine-tuned on the region's patches.

    Parameters
    ----------
    kernel : numpy.ndarray
        The colour kernel ``(kh, kw, 3, filters)``.
    bands : sequence of str
        The canonical names of the input bands, in input order.
    order : sequence of str
        The colours of the kernel's input channels.

    Returns
    -------
    numpy.ndarray
        ``(kh, kw, len(bands), filters)``, of the kernel's dtype.

    Raises
    ------
    BandMismatch
        When ``kernel`` is not ``(kh, kw, 3, filters)``.
    """
    n_bands = len(bands)
    kernel = np.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise BandMismatch(f"expected an RGB kernel (kh, kw, 3, filters), got shape {kernel.shape}")
    mean = kernel.mean(axis=2)
    slices = [kernel[:, :, list(order).index(b)] if b in order else mean for b in bands]
    return (np.stack(slices, axis=2) * (3.0 / n_bands)).astype(kernel.dtype)


def transfer_weights(
    src: keras.Model, dst: keras.Model, bands: Sequence[str], order: Sequence[str] = _RGB
) -> None:
    """Copy ``src``'s weights into ``dst``, of the same architecture but other input bands.

    Layer by layer; a kernel whose input-channel axis differs (the first convolution) goes
    through :func:`adapt_first_conv`.
    """
    src_layers = [layer for layer in src.layers if layer.weights]
    dst_layers = [layer for layer in dst.layers if layer.weights]
    if len(src_layers) != len(dst_layers):
        raise BandMismatch(
            f"cannot transfer weights from {src.name} ({len(src_layers)} layers with "
            f"weights) to {dst.name} ({len(dst_layers)})"
        )
    n_bands = dst.input_shape[-1]
    first = True  # the first convolution is adapted even when the band count stays 3
    for a, b in zip(src_layers, dst_layers):
        new = []
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            if (
                first
                and wa.ndim == 4
                and wa.shape[2] == 3
                and wb.shape[2] == n_bands
                and wa.shape[3] == wb.shape[3]
            ):
                new.append(adapt_first_conv(wa, bands, order))
                first = False
            elif wa.shape == wb.shape:
                new.append(wa)
            else:
                raise BandMismatch(f"layer {b.name}: weights {wa.shape} do not fit {wb.shape}")
        b.set_weights(new)


def load_weights_file(model: keras.Model, path: str, bands: Sequence[str] | None = None) -> None:
    """Load weights from a ``.keras`` model file or a ``.weights.h5`` file into ``model``.

    ``path`` may be an object-storage URL (``s3://...``): the file is fetched into this
    machine's cache first (the worker that trains may share no folder with the client).

    A ``.keras`` file of a 3-band model (RGB, the same architecture) meets a model of another
    band count as ImageNet weights do (:func:`transfer_weights`): its first convolution's
    kernel is adapted to ``bands`` (canonical names; default red, green, blue, then other
    bands) by :func:`adapt_first_conv`, the colours of the file's kernel taken from its sidecar
    (``MODEL.keras.json``, ``bands``) when it has one, else red, green, blue.
    """
    from agriland_scale.files import local_copy

    try:
        p = local_copy(path)
    except FileNotFoundError:
        p = Path("/nonexistent") / Path(str(path)).name
    if not p.exists():
        raise CorruptInput(f"weights file {path} does not exist: give an existing file, 'imagenet' or 'none'")
    n_bands = model.input_shape[-1]
    try:
        if p.suffix == ".keras":
            other = keras.saving.load_model(p, compile=False)
            if other.input_shape[-1] == 3 and n_bands != 3:
                transfer_weights(other, model, _file_bands(bands, n_bands), _file_order(p))
            else:
                model.set_weights(other.get_weights())
        else:
            model.load_weights(p)
    except (ValueError, OSError) as e:
        raise CorruptInput(
            f"cannot load weights from {p} into {model.name}: {e}. The file may be "
            "damaged or made for another architecture/bands"
            + (
                " (a weights-only file must fit the model exactly; the weights of an RGB model "
                "are adapted to more bands from its .keras file)"
                if p.suffix != ".keras"
                else ""
            )
        ) from None


def _file_bands(bands: Sequence[str] | None, n_bands: int) -> list[str]:
    if bands is not None:
        return list(bands)
    return list(_RGB[:n_bands]) + [f"band{i}" for i in range(3, n_bands)]


def _file_order(path: Path) -> tuple[str, ...]:
    """Return the colours of a weights file's 3 input channels: its sidecar's bands, else RGB."""
    import json

    try:
        found = json.loads(Path(str(path) + ".json").read_text()).get("bands")
    except (OSError, ValueError, AttributeError):
        return _RGB
    if isinstance(found, list) and sorted(map(str, found)) == sorted(_RGB):
        return tuple(map(str, found))
    return _RGB
