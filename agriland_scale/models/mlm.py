"""A STAC Item (Machine Learning Model extension, MLM 1.4) describing a saved model.

Written next to the model as ``<model>.stac.json`` so catalogues and tools that read MLM
(e.g. stac-model, QGIS plugins) find the bands, the input scaling, the shapes and the
training region. The JSON sidecar (``<model>.json``) stays the file agriland-scale itself
reads; this Item repeats what an outside user needs.

The Item is STAC 1.1 and valid against the MLM 1.4.0 schema: the input bands are described
as ``eo:bands`` of the model asset (MLM requires named input bands to be described by the
Item: by ``eo:bands`` or ``raster:bands`` of the model asset, as STAC 1.1 allows no ``bands``
in Item properties), and tasks use MLM's vocabulary (an embedding model is
``similarity-search``; MLM has no ``embedding`` or ``clustering`` task).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agriland_scale.files import write_json

__all__ = ["EO_SCHEMA", "MLM_SCHEMA", "MLM_TASKS", "write_mlm_item"]

MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
EO_SCHEMA = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
# the common band names of the EO extension (v1.1.0)
_EO_COMMON_NAMES = {"coastal", "blue", "green", "red", "rededge", "yellow", "pan", "nir", "nir08", "nir09",
                    "cirrus", "swir16", "swir22", "lwir", "lwir11", "lwir12"}
# the tasks of MLM 1.4.0 (its schema allows no other)
MLM_TASKS = ("regression", "classification", "scene-classification", "detection", "object-detection",
             "segmentation", "semantic-segmentation", "instance-segmentation", "panoptic-segmentation",
             "similarity-search", "generative", "image-captioning", "super-resolution")
# agriland's names for what its models do -> the MLM task
_TASK_NAMES = {"embedding": "similarity-search", "segmentation": "semantic-segmentation"}


def _mlm_tasks(tasks: list[str]) -> list[str]:
    out = []
    for t in tasks:
        t = _TASK_NAMES.get(t, t)
        if t not in MLM_TASKS:
            raise ValueError(f"{t!r} is not an MLM 1.4 task (one of {', '.join(MLM_TASKS)})")
        if t not in out:
            out.append(t)
    return out


def _eo_bands(bands: list[str]) -> list[dict[str, str]]:
    """``eo:bands`` of the model's input: Sentinel-2 common names (``rededge1`` -> ``rededge``)."""
    out = []
    for b in bands:
        common = "rededge" if b.startswith("rededge") else b
        out.append({"name": b, **({"common_name": common} if common in _EO_COMMON_NAMES else {}),
                    "description": f"Sentinel-2 MSI band '{b}'"})
    return out


def write_mlm_item(model_path: str | Path, meta: dict[str, Any], *, bbox_lonlat: list[float],
                   n_params: int, output: dict[str, Any]) -> Path:
    """Write ``<model_path>.stac.json``; ``bbox_lonlat`` is the training cube's extent (EPSG:4326).

    ``meta`` is the model's sidecar (bands, normalisation, patch size, task, training
    settings); ``output`` is the MLM output description (name, tasks, result shape ...).
    """
    import keras

    model_path = Path(model_path)
    x0, y0, x1, y1 = bbox_lonlat
    size, bands = int(meta["patch_size"]), list(meta["bands"])
    rmax = float(meta["normalisation"]["reflectance_max"])
    task = "semantic-segmentation" if meta.get("task") == "segmentation" else "similarity-search"
    output = dict(output, tasks=_mlm_tasks(list(output.get("tasks") or [task])))
    what = "semantic segmentation" if task == "semantic-segmentation" else "patch embeddings"
    props = {
        # valid for Sentinel-2 MSI data: from the launch of Sentinel-2A to the model's making
        "datetime": None, "start_datetime": "2015-06-23T00:00:00Z",
        "end_datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "description": (f"agriland-scale {meta.get('model')} ({what}) trained on "
                        f"'{meta.get('training_region', '')}'"),
        "mlm:name": f"agriland-{meta.get('model')}",
        "mlm:architecture": "U-Net" if task == "semantic-segmentation" else "Convolutional autoencoder (ResNet-50 encoder)",
        "mlm:tasks": [task],
        "mlm:framework": "keras", "mlm:framework_version": keras.__version__,
        "mlm:total_parameters": int(n_params),
        "mlm:pretrained": meta.get("initial_weights") not in (None, "none"),
        "mlm:pretrained_source": None if meta.get("initial_weights") in (None, "none") else meta.get("initial_weights"),
        "mlm:batch_size_suggestion": int(meta.get("batch_size") or 8),
        "mlm:accelerator": "amd64", "mlm:accelerator_constrained": False,
        "mlm:input": [{
            "name": "Sentinel-2 reflectance patch",
            "bands": bands,
            "input": {"shape": [-1, size, size, len(bands)], "dim_order": ["batch", "height", "width", "bands"],
                      "data_type": "float32"},
            "value_scaling": [{"type": "clip", "minimum": 0.0, "maximum": rmax},
                              {"type": "min-max", "minimum": 0.0, "maximum": rmax}],
            "resize_type": None,
        }],
        "mlm:output": [output],
        "mlm:hyperparameters": {k: meta[k] for k in ("epochs", "steps_per_epoch", "batch_size", "learning_rate",
                                                     "seed", "augment_factor", "encoder", "head")
                                if k in meta},
        "agriland:metadata": model_path.name + ".json",
    }
    item = {
        "type": "Feature", "stac_version": "1.1.0", "stac_extensions": [MLM_SCHEMA, EO_SCHEMA],
        "id": model_path.stem,
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "bbox": [x0, y0, x1, y1], "properties": props, "links": [],
        "assets": {"model": {"href": f"./{model_path.name}", "type": "application/octet-stream; application=keras",
                             "title": "Keras 3 model (.keras)", "roles": ["mlm:model", "mlm:weights"],
                             "mlm:artifact_type": "keras.Model.save",
                             # the bands mlm:input names (MLM requires them described)
                             "eo:bands": _eo_bands(bands)}},
    }
    out = model_path.with_name(model_path.name + ".stac.json")
    write_json(item, out)
    return out
