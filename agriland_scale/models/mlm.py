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

import pystac
from pystac.extensions.mlm import (
    AcceleratorType,
    AssetGeneralMLMExtension,
    Hyperparameters,
    InputStructure,
    MLMExtension,
    ModelInput,
    ModelOutput,
    ResultStructure,
    TaskType,
    ValueScaling,
    ValueScalingType,
)
from pystac.extensions.raster import DataType

from agriland_scale.config.bands import reflectance_scale
from agriland_scale.files import write_json

__all__ = ["EO_SCHEMA", "MLM_SCHEMA", "MLM_TASKS", "add_onnx_asset", "write_mlm_item"]

MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
EO_SCHEMA = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
# the common band names of the EO extension (v1.1.0)
_EO_COMMON_NAMES = {
    "coastal",
    "blue",
    "green",
    "red",
    "rededge",
    "yellow",
    "pan",
    "nir",
    "nir08",
    "nir09",
    "cirrus",
    "swir16",
    "swir22",
    "lwir",
    "lwir11",
    "lwir12",
}
# the tasks of MLM 1.4.0 (its schema allows no other)
MLM_TASKS = (
    "regression",
    "classification",
    "scene-classification",
    "detection",
    "object-detection",
    "segmentation",
    "semantic-segmentation",
    "instance-segmentation",
    "panoptic-segmentation",
    "similarity-search",
    "generative",
    "image-captioning",
    "super-resolution",
)
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
        out.append(
            {
                "name": b,
                **({"common_name": common} if common in _EO_COMMON_NAMES else {}),
                "description": f"Sentinel-2 MSI band '{b}'",
            }
        )
    return out


def _model_output(output: dict[str, Any]) -> ModelOutput:
    """MLM output object of ``output`` (name, tasks, result; classes and the rest as given)."""
    from pystac.extensions.classification import Classification

    result = output["result"]
    out = ModelOutput.create(
        name=str(output["name"]),
        tasks=[TaskType(t) for t in output["tasks"]],
        result=ResultStructure.create(
            shape=[int(v) for v in result["shape"]],
            dim_order=list(result["dim_order"]),
            data_type=DataType(result["data_type"]),
        ),
        description=output.get("description"),
        classes=[
            Classification.create(value=int(c["value"]), description=c.get("description"), name=c.get("name"))
            for c in output.get("classification:classes") or []
        ]
        or None,
    )
    for key, value in output.items():  # anything MLM allows beyond these (post_processing_function ...)
        if key not in ("name", "tasks", "result", "description", "classification:classes"):
            out.properties[key] = value
    return out


def write_mlm_item(
    model_path: str | Path,
    meta: dict[str, Any],
    *,
    bbox_lonlat: list[float],
    n_params: int,
    output: dict[str, Any],
) -> Path:
    """Write ``<model_path>.stac.json``; ``bbox_lonlat`` is the training cube's extent (EPSG:4326).

    ``meta`` is the model's sidecar (bands, normalisation, patch size, task, training
    settings); ``output`` is the MLM output description (name, tasks, result shape ...).
    The Item is built with pystac's MLM extension (:mod:`pystac.extensions.mlm`).
    """
    import keras

    model_path = Path(model_path)
    x0, y0, x1, y1 = (float(v) for v in bbox_lonlat)
    size, bands = int(meta["patch_size"]), list(meta["bands"])
    # one reflectance for every band, or one a band (a mapping band -> reflectance)
    scale = reflectance_scale(meta["normalisation"]["reflectance_max"], bands)
    task = "semantic-segmentation" if meta.get("task") == "segmentation" else "similarity-search"
    output = dict(output, tasks=_mlm_tasks(list(output.get("tasks") or [task])))
    what = "semantic segmentation" if task == "semantic-segmentation" else "patch embeddings"
    pretrained = meta.get("initial_weights") not in (None, "none")
    item = pystac.Item(
        id=model_path.stem,
        geometry={"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        bbox=[x0, y0, x1, y1],
        datetime=None,
        # valid for Sentinel-2 MSI data: from the launch of Sentinel-2A to the model's making
        start_datetime=pystac.utils.str_to_datetime("2015-06-23T00:00:00Z"),
        end_datetime=pystac.utils.str_to_datetime(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        properties={
            "description": (
                f"agriland-scale {meta.get('model')} ({what}) trained on '{meta.get('training_region', '')}'"
            )
        },
    )
    model_input = ModelInput.create(
        name="Sentinel-2 reflectance patch",
        bands=bands,
        input=InputStructure.create(
            shape=[-1, size, size, len(bands)],
            dim_order=["batch", "height", "width", "bands"],
            data_type=DataType.FLOAT32,
        ),
        value_scaling=None,
    )
    # two steps (clip, then min-max): MLM 1.4 allows a list; pystac's create takes one
    if len(set(scale)) == 1:
        rmax = scale[0]
        model_input.properties["value_scaling"] = [
            ValueScaling.create(ValueScalingType.CLIP, minimum=0.0, maximum=rmax).to_dict(),
            ValueScaling.create(ValueScalingType.MIN_MAX, minimum=0.0, maximum=rmax).to_dict(),
        ]
    else:  # MLM: one value_scaling object a band, in the order of the input's bands
        model_input.properties["value_scaling"] = [
            ValueScaling.create(ValueScalingType.MIN_MAX, minimum=0.0, maximum=v).to_dict() for v in scale
        ]
    model_input.properties["resize_type"] = None
    MLMExtension.ext(item, add_if_missing=True).apply(
        name=f"agriland-{meta.get('model')}",
        architecture="U-Net"
        if task == "semantic-segmentation"
        else "Convolutional autoencoder (ResNet-50 encoder)",
        tasks=[TaskType(task)],
        input=[model_input],
        output=[_model_output(output)],
        framework="keras",
        framework_version=keras.__version__,
        total_parameters=int(n_params),
        pretrained=pretrained,
        pretrained_source=meta.get("initial_weights") if pretrained else None,
        batch_size_suggestion=int(meta.get("batch_size") or 8),
        accelerator=AcceleratorType.AMD64,
        accelerator_constrained=False,
        hyperparameters=Hyperparameters.create(
            **{
                k: meta[k]
                for k in (
                    "epochs",
                    "steps_per_epoch",
                    "batch_size",
                    "learning_rate",
                    "seed",
                    "augment_factor",
                    "encoder",
                    "head",
                )
                if k in meta
            }
        ),
    )
    item.properties["agriland:metadata"] = model_path.name + ".json"
    asset = pystac.Asset(
        href=f"./{model_path.name}",
        media_type="application/octet-stream; application=keras",
        title="Keras 3 model (.keras)",
        roles=["mlm:model", "mlm:weights"],
        # the bands mlm:input names (MLM requires them described)
        extra_fields={"eo:bands": _eo_bands(bands)},
    )
    item.add_asset("model", asset)
    AssetGeneralMLMExtension.ext(asset, add_if_missing=True).apply(artifact_type="keras.Model.save")
    if EO_SCHEMA not in item.stac_extensions:
        item.stac_extensions.append(EO_SCHEMA)
    out = model_path.with_name(model_path.name + ".stac.json")
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    d["links"] = []
    write_json(d, out)
    return out


def add_onnx_asset(model_path: str | Path, record: dict[str, Any]) -> Path | None:
    """Add the ONNX export ``record`` (see :func:`~.engines.record_onnx`) to ``<model_path>.stac.json``.

    An asset ``onnx`` with MLM ``artifact_type`` ``onnx``, the sha256 of the file and of the
    ``.keras`` file it was exported from (``agriland:source_sha256``). None when the model
    has no Item.
    """
    import json

    item_path = Path(str(model_path) + ".stac.json")
    if not item_path.is_file():
        return None
    d = json.loads(item_path.read_text())
    d.setdefault("assets", {})["onnx"] = {
        "href": f"./{record['file']}",
        "type": "application/octet-stream; application=onnx",
        "title": "ONNX export (runtime.engine: onnx)",
        "roles": ["mlm:model"],
        "mlm:artifact_type": "onnx",
        "agriland:sha256": record["sha256"],
        "agriland:source_sha256": record["source_sha256"],
        # the bands mlm:input names, described on every mlm:model asset (as for the .keras one)
        **{k: v for k, v in (d["assets"].get("model") or {}).items() if k == "eo:bands"},
    }
    write_json(d, item_path)
    return item_path
