"""The run configuration's execution sections: ``runtime`` (Dask, blocks, precisions, engines) and ``output``.

Part of the typed configuration (:mod:`.schema`, which also exports them): how a run
executes, not what it computes; a change here never asks to redo a finished stage.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from agriland_scale.config.base import StrictModel as _Model
from agriland_scale.config.checks import check_scheduler_address

__all__ = ["OutputConfig", "RuntimeConfig"]


class RuntimeConfig(_Model):
    """Dask runtime: a LocalCluster by default, or an existing scheduler's address.

    ``dashboard_address``: where the LocalCluster's dashboard listens, on the loopback
    interface by default (reach a remote one with ``ssh -L 8787:127.0.0.1:8787 HOST``);
    ``":8787"`` opens it to the network on purpose. ``commit_every_s``: seconds between
    commits of finished blocks to the product store (what a kill can lose at most; 0 commits
    every block, which costs a commit each). ``block_px``: the side of the square blocks
    raster products are written in (px; the unit a resumed run redoes, a few tens of MB of
    cube at 2048, whatever the region's width); ``wave_tasks``: the most tasks handed to the
    scheduler at a time beyond the blocks running (about 10 KB of scheduler memory each).
    ``inference_precision``: the compute dtype of
    the model stages' predictions (weights and outputs stay float32; training: see
    ``train_precision``). ``auto``: both models in bfloat16 when every worker's CPU has
    bfloat16 instructions (AVX512-BF16 or AMX) and no worker has a GPU, else float32. Measured
    on a 2-core Xeon with AMX: the U-Net 1.7x the float32 speed in TensorFlow, its
    probabilities moved by mean 0.0007 on the demo (99.94 % of mask pixels equal); a full
    tile's embeddings 4.0x (OpenVINO bfloat16 against ONNX Runtime float32), their clusters
    as close to float32's (adjusted Rand index 0.74, same seed) as two float32 seeds' are to
    each other (0.72); ``bfloat16``: both models; ``float32``: neither, results equal on
    every machine. The precision used is recorded in
    ``run.json`` and in the products' attributes; a resumed run recomputes the blocks of
    another precision (see :func:`~agriland_scale.pipeline.runtime.inference_precision`).
    ``train_precision``: the compute dtype of the CAE's and the U-Net's training. ``bfloat16``:
    Keras mixed precision ``mixed_bfloat16`` (bfloat16 compute, float32 master weights, output
    layers in float32; on a 2-core Xeon with AMX a training step 1.6x (CAE) and 1.9x (U-Net)
    faster, see ``bench/results/train_precision.txt``); ``float32``: as before; ``auto``:
    bfloat16 on a training worker whose CPU computes it natively (AVX512-BF16 or AMX) and has
    no GPU, else float32 (the same per machine). The saved models are float32 either way; the
    precision used is recorded as ``train_precision`` in the model's sidecar and ``run.json``.
    ``engine``: what predicts. ``tensorflow``: the ``.keras`` models in Keras;
    ``onnx``: their ONNX export (``MODEL.onnx`` beside the model, written at the end of
    training, or exported once into the machine's cache) in ONNX Runtime, float32, with no
    TensorFlow imported by the predicting worker (the ``[infer]`` extra); ``openvino``: that
    export in OpenVINO, in bfloat16 where ``inference_precision`` chose it; ``auto``: per
    model from ``bench/bench_engines.py`` (on a 2-core Xeon with AMX: the float32 encoder in
    ONNX Runtime, 1.25-1.64x TensorFlow, else OpenVINO; the bfloat16 U-Net in OpenVINO,
    3.9-6.7x TensorFlow float32 against TensorFlow bfloat16's 2.0-3.5x, equal masks;
    TensorFlow for the float32 U-Net, where no engine was clearly faster, on GPU workers, and
    where neither runtime is installed; see :func:`~agriland_scale.models.engines.choose_engine`),
    and only for a model whose ONNX artifact is at hand or a stage of at least
    :data:`~agriland_scale.models.engines.EXPORT_PAYS_FROM` images, where a one-time export
    pays back; a small run of a model trained in it keeps TensorFlow (the default, ``auto``).
    """

    scheduler: str | None = None
    n_workers: int = Field(default=1, ge=1)
    threads_per_worker: int = Field(default=2, ge=1)
    memory_limit: str = "12GiB"
    dashboard_address: str = "127.0.0.1:8787"
    commit_every_s: float = Field(default=5.0, ge=0)
    block_px: int = Field(default=2048, ge=64)
    wave_tasks: int = Field(default=20_000, ge=100)
    inference_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    train_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    engine: Literal["tensorflow", "onnx", "openvino", "auto"] = "auto"

    @field_validator("scheduler")
    @classmethod
    def _scheduler_address(cls, v: str | None) -> str | None:
        return None if v is None else check_scheduler_address(v)


class OutputConfig(_Model):
    """Where the run's outputs go, when ``--out`` is object storage (``s3://``, ``gs://``, ``az://``).

    ``storage_options``: credentials and endpoint for the store, when the usual variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``;
    the GCS and Azure equivalents) are not what to use. For S3: ``endpoint_url``, ``region``,
    ``access_key_id``, ``secret_access_key``, ``session_token``, ``allow_http``, ``anonymous``.
    They are never written to ``run.json``. Workers take credentials from their own
    environment (a cluster's nodes usually have a role or variables of their own).
    """

    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True)
