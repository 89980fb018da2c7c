"""Keras-applications backbones with the three weight choices: imagenet | file | none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras

from ..errors import BandMismatch, CorruptInput

__all__ = ["build_backbone", "load_weights_file", "read_sidecar", "write_sidecar"]

_APPS = {
    "resnet50": keras.applications.ResNet50,
    "inceptionv3": keras.applications.InceptionV3,
}


def build_backbone(name: str, size: int, n_bands: int, weights: str) -> keras.Model:
    """A headless backbone for ``(size, size, n_bands)`` inputs.

    ``weights="imagenet"`` loads Keras' ImageNet weights (from ``~/.keras/models`` or the
    network) and needs 3 bands; any other value builds it randomly initialised (a file is
    loaded later, onto the whole model).
    """
    app = _APPS[name]
    if weights == "imagenet":
        if n_bands != 3:
            raise BandMismatch(
                f"ImageNet weights for {name} expect 3 bands, the config gives {n_bands}: use 3 "
                "bands (red, green, blue) or weights 'none' / a local weights file")
        try:
            return app(include_top=False, weights="imagenet", input_shape=(size, size, 3))
        except Exception as e:  # network errors come in many types (URLError, OSError, ...)
            raise CorruptInput(
                f"cannot get ImageNet weights for {name} ({type(e).__name__}: {e}). Offline, put "
                f"the Keras weights file in ~/.keras/models/, or set weights to a local file or "
                "'none'") from None
    return app(include_top=False, weights=None, input_shape=(size, size, n_bands))


def load_weights_file(model: keras.Model, path: str) -> None:
    """Load weights from a ``.keras`` model file or a ``.weights.h5`` file into ``model``."""
    p = Path(path)
    if not p.exists():
        raise CorruptInput(f"weights file {p} does not exist: give an existing file, 'imagenet' or 'none'")
    try:
        if p.suffix == ".keras":
            other = keras.saving.load_model(p, compile=False)
            model.set_weights(other.get_weights())
        else:
            model.load_weights(p)
    except (ValueError, OSError) as e:
        raise CorruptInput(f"cannot load weights from {p} into {model.name}: {e}. The file may be "
                           "damaged or made for another architecture/bands") from None


def sidecar_path(model_path: str | Path) -> Path:
    return Path(str(model_path) + ".json")


def write_sidecar(model_path: str | Path, meta: dict[str, Any]) -> None:
    """Write the metadata sidecar ``MODEL.keras.json`` (bands, normalisation, patch size...)."""
    sidecar_path(model_path).write_text(json.dumps(meta, indent=2, default=str))


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    p = sidecar_path(model_path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise CorruptInput(f"model {model_path} has no metadata sidecar {p}: it was not saved by "
                           "agriland-scale; retrain it or write the sidecar") from None
