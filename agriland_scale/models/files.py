"""A model file and its metadata sidecar (``MODEL.keras.json``), read without TensorFlow.

The client checks given models (task, bands, normalisation, patch size) before a run
starts; doing that with plain JSON and zip reads keeps Keras and TensorFlow out of the
``agriland`` process, which only the workers need.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from agriland_scale.errors import CorruptInput
from agriland_scale.files import is_object_url, local_copy, write_json

__all__ = [
    "DEFAULT_THRESHOLD",
    "check_keras_file",
    "model_signature",
    "model_threshold",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
]

# the mask's threshold for a U-Net whose sidecar records none (trained before thresholds were
# chosen on validation) and no segment.threshold set
DEFAULT_THRESHOLD = 0.5


def sidecar_path(model_path: str | Path) -> Path:
    """Return the path of the metadata sidecar of ``model_path`` (``MODEL.keras.json``)."""
    return Path(str(model_path) + ".json")


def write_sidecar(model_path: str | Path, meta: dict[str, Any]) -> None:
    """Write the metadata sidecar ``MODEL.keras.json`` (bands, normalisation, patch size...)."""
    write_json(meta, sidecar_path(model_path), indent=2)


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    """Read the metadata sidecar of a model file (``MODEL.keras.json``) as a dict.

    Raises
    ------
    CorruptInput
        The sidecar is missing or is not a JSON object.
    """
    p = sidecar_path(model_path)
    try:
        if is_object_url(model_path):  # a model on object storage: its sidecar, cached
            p = local_copy(str(model_path) + ".json")
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise CorruptInput(
            f"model {model_path} has no metadata sidecar {p}: it was not saved by "
            "agriland-scale; retrain it or write the sidecar"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptInput(
            f"the metadata sidecar {p} of model {model_path} is damaged "
            f"({type(e).__name__}: {str(e)[:120]}): copy it again with the model, "
            "or retrain"
        ) from None
    if not isinstance(meta, dict):
        raise CorruptInput(
            f"the metadata sidecar {p} of model {model_path} is not a JSON object: "
            "copy it again with the model, or retrain"
        )
    return meta


def model_threshold(meta: dict[str, Any]) -> float:
    """Return the mask threshold a U-Net's sidecar records (chosen on validation), else 0.5.

    ``meta`` is the sidecar (:func:`read_sidecar`); its ``threshold`` is a probability in
    (0, 1). A sidecar of a model trained before thresholds were chosen has none:
    :data:`DEFAULT_THRESHOLD` then.
    """
    t = meta.get("threshold")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1:
        return float(t)
    return DEFAULT_THRESHOLD


def check_keras_file(model_path: str | Path, where: str | None = None) -> None:
    """Refuse a model path that is missing or is not a complete Keras 3 ``.keras`` archive.

    A complete archive is a zip holding ``config.json`` and the weights; TensorFlow is not
    loaded.

    Raises
    ------
    CorruptInput
        Naming ``where`` (default: the path) and what is wrong.
    """
    where = where or f"model {model_path}"
    try:
        p = local_copy(model_path)  # a model on object storage is checked in this machine's cache
    except FileNotFoundError:
        p = Path("/nonexistent/" + Path(str(model_path)).name)
    if not p.is_file():
        raise CorruptInput(
            f"{where}: no such file"
            + (" (it is a folder)" if p.is_dir() else "")
            + ": give the path of a .keras file saved by agriland-scale"
        )
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CorruptInput(
            f"{where} is not a Keras model file ({type(e).__name__}: {str(e)[:120]}): "
            "the file is damaged or of another kind; copy it again or retrain"
        ) from None
    if bad is not None or "config.json" not in names:
        what = f"its member {bad} is damaged" if bad else "it holds no config.json"
        raise CorruptInput(f"{where} is not a complete Keras model file ({what}): copy it again or retrain")


def model_signature(model_path: str | Path) -> dict[str, Any]:
    """Read what a ``.keras`` file's model takes and gives from its ``config.json``, without TensorFlow.

    Returns
    -------
    dict
        ``input``: the input's batch shape (``[None, size, size, bands]``, ``None`` where
        unknown); ``output``: the output layer's ``class`` (``Conv2D``, ``Dense``...),
        ``name``, ``channels`` (filters or units) and ``activation``. Empty when the
        archive's config is not a functional model's (nothing to check).
    """
    p = local_copy(model_path)
    try:
        with zipfile.ZipFile(p) as z:
            config = json.loads(z.read("config.json"))
    except (KeyError, OSError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    inner = config.get("config") if isinstance(config, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("layers"), list):
        return {}

    def first_name(entry: Any) -> str | None:  # ["name", 0, 0] or [["name", 0, 0], ...]
        while isinstance(entry, list) and entry:
            if isinstance(entry[0], str):
                return entry[0]
            entry = entry[0]
        return None

    layers = {lay.get("name"): lay for lay in inner["layers"] if isinstance(lay, dict)}
    found: dict[str, Any] = {}
    inp = layers.get(first_name(inner.get("input_layers")))
    if inp is not None:
        found["input"] = (inp.get("config") or {}).get("batch_shape")
    out = layers.get(first_name(inner.get("output_layers")))
    if out is not None:
        c = out.get("config") or {}
        act = c.get("activation")
        found["output"] = {
            "class": out.get("class_name"),
            "name": out.get("name"),
            "channels": c.get("filters", c.get("units")),
            "activation": act if isinstance(act, str) else None,
        }
    return found
