"""Where a trained model goes and what its metadata says of it: paths, object storage, extent.

Helpers of :mod:`~agriland_scale.models.train`: a model saved for an object-storage URL is
saved locally on the worker, then uploaded with every file beside it; the sidecar's
normalisation and the training cube's lon/lat extent; the training's precision (Keras dtype
policy) and the float32 copy of a model trained in mixed precision, which is what is saved.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agriland_scale.config.bands import reflectance_record

__all__ = [
    "as_float32",
    "dtype_policy",
    "lonlat_bounds",
    "normalisation",
    "relocated",
    "saved_to",
    "training_policy",
]

# ``runtime.train_precision`` -> the Keras dtype policy the models are built and trained under
TRAIN_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# the models ``auto`` trains in bfloat16 where the CPU computes it natively: both kept the
# demo's validation IoU / clusters within the goal (bench/results/train_precision.txt)
AUTO_BFLOAT16 = ("cae", "unet")


def training_policy(
    setting: str, model: str, *, gpu: bool | None = None, cpuinfo: str = "/proc/cpuinfo"
) -> str:
    """Return the Keras dtype policy that trains ``model`` (``cae``, ``unet``) for ``setting``.

    ``setting`` is ``runtime.train_precision``: ``float32``, ``bfloat16`` (``mixed_bfloat16``:
    bfloat16 compute, float32 master weights) or ``auto``: ``mixed_bfloat16`` for a model of
    :data:`AUTO_BFLOAT16` when this machine's CPU computes bfloat16 natively
    (:func:`~agriland_scale.models.worker.cpu_has_bfloat16`, read from ``cpuinfo``) and it has
    no GPU (``gpu``; None: asks TensorFlow), else ``float32``; the rule of
    ``runtime.inference_precision``, resolved where the training runs. The same machine
    always gives the same answer, which the model's sidecar records (``train_precision``).
    """
    if setting in TRAIN_POLICIES:
        return TRAIN_POLICIES[setting]
    if setting != "auto":
        raise ValueError(f"train precision {setting!r}: give auto, float32 or bfloat16")
    from agriland_scale.models.worker import cpu_has_bfloat16

    if model not in AUTO_BFLOAT16 or not cpu_has_bfloat16(cpuinfo):
        return "float32"
    if gpu is None:
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    return "float32" if gpu else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """Build Keras layers under the global dtype ``policy``; the previous policy is back after, also on errors."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def as_float32(model: Any) -> Any:
    """Return ``model`` itself when every layer is float32, else a float32 copy with its weights.

    A functional model trained in mixed precision (its layers' dtype policy ``mixed_bfloat16``:
    float32 variables, bfloat16 compute) is rebuilt from its config with every policy float32
    (nested models included) and given its weights (float32 already): the copy is the model a
    float32 training builds, so saving, inference, ONNX export and checksums do not depend on
    the training's precision.
    """
    config = model.get_config()

    def swap(o: Any) -> Any:
        if isinstance(o, dict):
            if o.get("class_name") == "DTypePolicy" and isinstance(o.get("config"), dict):
                return dict(o, config=dict(o["config"], name="float32"))
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        return o

    if swap(config) == config:
        return model
    copy = model.__class__.from_config(swap(config))
    copy.set_weights(model.get_weights())
    return copy


def normalisation(reflectance_max, bands: list[str]) -> dict[str, Any]:
    """Return the sidecar's ``normalisation``: one reflectance_max (as before), or one a band."""
    return {
        "type": "reflectance / reflectance_max, clipped to [0, 1]",
        "reflectance_max": reflectance_record(reflectance_max, bands),
    }


def lonlat_bounds(cube) -> list[float]:
    """Return the cube's extent in lon/lat (EPSG:4326) degrees, rounded to 6 decimals."""
    from rasterio.warp import transform_bounds

    return [round(v, 6) for v in transform_bounds(cube.rio.crs, "EPSG:4326", *cube.rio.bounds())]


@contextlib.contextmanager
def saved_to(out_path: str) -> Iterator[str]:
    """Give the local path a model is saved to; for an object-storage ``out_path``, upload after.

    A model for ``s3://.../models/unet.keras`` is saved in a temporary folder of the worker,
    then every file saved beside it (the model, its encoder, sidecars, MLM items) is put next
    to ``out_path``, one object each, when training succeeded.
    """
    from agriland_scale.files import is_object_url, join_url, upload_file

    if not is_object_url(out_path):
        yield out_path
        return
    with tempfile.TemporaryDirectory(prefix="agriland-model-") as d:
        local = str(Path(d) / out_path.rstrip("/").rpartition("/")[2])
        yield local
        parent = out_path.rstrip("/").rpartition("/")[0]
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                upload_file(f, join_url(parent, f.name))


def relocated(meta: dict[str, Any], local: str, out_path: str) -> dict[str, Any]:
    """Replace the local save paths in a model's metadata by where the model was put."""
    if local == out_path:
        return meta
    parent, here = out_path.rstrip("/").rpartition("/")[0], str(Path(local).parent)
    return json.loads(json.dumps(meta, default=str).replace(here, parent))
