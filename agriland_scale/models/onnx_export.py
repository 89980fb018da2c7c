"""Exporting a Keras model to its ONNX artifact: the one part of the engines that needs TensorFlow.

Run in the process that trained the model (:func:`attach_onnx`, at the end of training) or in
a child process of a worker that predicts without TensorFlow
(``python -m agriland_scale.models.onnx_export MODEL.keras OUT.onnx [PX]``, see
:func:`~agriland_scale.models.engines.ensure_onnx`). Apart from :mod:`.engines`, which loads
the artifacts, so that loading one never imports this module (nor TensorFlow).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from agriland_scale.models import worker
from agriland_scale.models.engines import artifact_path, record_onnx

__all__ = ["attach_onnx", "export_onnx"]


def export_onnx(model_path: str | Path, out: str | Path, input_size: int | None = None) -> Path:
    """Export the ``.keras`` model at ``model_path`` to ONNX at ``out`` (in this process: imports TensorFlow).

    Keras 3's ``model.export(format="onnx")`` (tf2onnx) with a free batch size; ``input_size``
    exports a copy taking windows of that side (px, see
    :func:`~agriland_scale.models.worker.at_input_size`). Written to a temporary name, then
    renamed: a reader never sees half a file.
    """
    worker.configure_tensorflow()
    import keras

    from agriland_scale.models import dec, unet  # noqa: F401  (register custom objects)

    model = keras.saving.load_model(model_path, compile=False)
    if input_size is not None and model.input_shape[1] != input_size:
        model = worker.at_input_size(model, input_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="patch")
    try:
        model.export(str(tmp), format="onnx", verbose=False, input_signature=[spec])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def attach_onnx(model_path: str | Path) -> dict[str, Any] | None:
    """Export ``MODEL.onnx`` beside the ``.keras`` file and record it (end of training, TensorFlow loaded).

    The record (:func:`record_onnx`) goes into the model's sidecar as ``artifacts.onnx`` and
    into its MLM Item as asset ``onnx``. A failed export is a warning, not a failed training:
    returns None, and an ``onnx`` engine exports the model into its cache later (or says why not).
    """
    import warnings

    from agriland_scale.models.files import read_sidecar, write_sidecar
    from agriland_scale.models.mlm import add_onnx_asset

    try:
        out = export_onnx(model_path, artifact_path(model_path))
    except Exception as e:  # noqa: BLE001 - the .keras model is the product; ONNX is a copy
        warnings.warn(f"no ONNX export of {model_path} ({type(e).__name__}: {str(e)[:200]})", stacklevel=2)
        return None
    rec = record_onnx(model_path, out)
    meta = read_sidecar(model_path)
    meta.setdefault("artifacts", {})["onnx"] = rec
    write_sidecar(model_path, meta)
    add_onnx_asset(model_path, rec)
    return rec


if __name__ == "__main__":  # python -m agriland_scale.models.onnx_export MODEL.keras OUT.onnx [PX]
    export_onnx(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
