"""A STAC Item (Machine Learning Model extension, MLM 1.4) describing a saved model.

Written next to the model as ``<model>.stac.json`` so catalogues and tools that read MLM
(e.g. stac-model, QGIS plugins) find the bands, the input scaling, the shapes and the
training region. The JSON sidecar (``<model>.json``) stays the file agriland-scale itself
reads; this Item repeats what an outside user needs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["MLM_SCHEMA", "write_mlm_item"]

MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"


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
    task = "semantic-segmentation" if meta.get("task") == "segmentation" else "embedding"
    props = {
        # valid for Sentinel-2 MSI data: from the launch of Sentinel-2A to the model's making
        "datetime": None, "start_datetime": "2015-06-23T00:00:00Z",
        "end_datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "description": f"agriland-scale {meta.get('model')} ({task}) trained on '{meta.get('training_region', '')}'",
        "mlm:name": f"agriland-{meta.get('model')}",
        "mlm:architecture": "U-Net" if task == "semantic-segmentation" else "Convolutional autoencoder (ResNet-50 encoder)",
        "mlm:tasks": [task] if task == "semantic-segmentation" else ["embedding", "clustering"],
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
        "type": "Feature", "stac_version": "1.0.0", "stac_extensions": [MLM_SCHEMA],
        "id": model_path.stem,
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "bbox": [x0, y0, x1, y1], "properties": props, "links": [],
        "assets": {"model": {"href": f"./{model_path.name}", "type": "application/octet-stream; application=keras",
                             "title": "Keras 3 model (.keras)", "roles": ["mlm:model", "mlm:weights"],
                             "mlm:artifact_type": "keras.Model.save"}},
    }
    out = model_path.with_name(model_path.name + ".stac.json")
    out.write_text(json.dumps(item, indent=1))
    return out
