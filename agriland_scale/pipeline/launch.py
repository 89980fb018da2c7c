"""Launch: a run's LocalCluster, started before the run's own modules are imported, and warm-ups.

A cold ``agriland run`` of a small region waits on one chain: the worker process starts,
imports TensorFlow (5-7 s on 2 cores), loads and traces the encoder. The CLI therefore starts
the LocalCluster as soon as it has read the config (:class:`ClusterLaunch`), and its workers
start importing TensorFlow at once, while the ``agriland`` process imports the pipeline's
modules and checks the output folder and inputs (1.2-2 s). The run then takes the cluster
over (:func:`~.runtime.dask_client` given ``launch=``), or the launch is closed when the run
never gets that far (a locked output folder, a failed check).

Measured on the Virginia scene with given models (3 alternated cold runs, 2 cores): the
workers' import started at 1.7-2.0 s instead of 3.4-3.5 s and ended 1.0-3.0 s sooner; the
embeddings stage ended 2.4 s sooner (median). A cluster started in a thread beside those
imports gained nothing: the two shared this process's interpreter lock.

The workers' standard error goes to a temporary file of each worker process until the run's
worker log exists (TensorFlow's import writes to it); :class:`~.plugins.StderrToFile` moves
what it holds into the log and removes it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agriland_scale.config.schema import RunConfig, RuntimeConfig
from agriland_scale.layout import MODEL_STAGES, RECORD, stages_needed
from agriland_scale.pipeline.plugins import FastExit, StderrToFile
from agriland_scale.pipeline.runtime import MAIN_WORKER, local_cluster, scheduler_address

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster

__all__ = ["ClusterLaunch", "launch_for_run", "models_to_run", "tensorflow_needed", "warm_up_workers"]


def warm_up_workers(
    client: Client,
    models: list[tuple[str, int, int, bool]],
    precision: str = "float32",
    name: str = "warm-up",
    engine: str = "tensorflow",
) -> list[tuple[Future, str]]:
    """Start :func:`~agriland_scale.models.worker.warm_up` of ``models`` on each worker process.

    One task a worker, pinned to it, never on a worker in this process (:data:`MAIN_WORKER`:
    this process would import TensorFlow). With no model, the workers only import
    TensorFlow. Returns ``(future, worker address)`` for each; the task keys start with ``name``.
    """
    from agriland_scale.models.worker import warm_up

    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [
        (
            client.submit(
                warm_up,
                models,
                precision,
                engine,
                key=f"{name}-{i}-{uuid.uuid4().hex[:8]}",
                workers=[w],
                allow_other_workers=False,
                pure=False,
            ),
            w,
        )
        for i, w in enumerate(w for w, info in workers.items() if info.get("name") != MAIN_WORKER)
    ]


def launch_for_run(
    cfg: RunConfig, out: Path | str, until: str | None, *, scheduler: str | None, force: bool, overwrite: bool
) -> ClusterLaunch | None:
    """Start the LocalCluster of a run of ``cfg`` into ``out`` now; None for an existing cluster.

    Its workers import TensorFlow at once when the run may need it (:func:`models_to_run`).
    ``scheduler`` (or ``cfg.runtime.scheduler``, or Dask's ``scheduler-address``, e.g.
    ``DASK_SCHEDULER_ADDRESS``): the address of an existing cluster.
    """
    if scheduler_address(cfg.runtime, scheduler):
        return None
    return ClusterLaunch(
        cfg.runtime,
        import_tensorflow=models_to_run(out, until, force=force, overwrite=overwrite)
        and tensorflow_needed(cfg, stages_needed(until)),
    )


def tensorflow_needed(cfg: RunConfig, todo: Iterable[str]) -> bool:
    """Whether the workers will need TensorFlow for the stages of ``todo``.

    Training a model (the ``cae`` or ``unet`` stage without ``embed.model`` /
    ``segment.model``) does; applying one does when ``runtime.engine`` resolves to
    ``tensorflow`` for it (:func:`~agriland_scale.models.engines.resolve`; ``auto`` takes ONNX
    Runtime or OpenVINO for a model whose ONNX artifact is at hand). The precision is this
    process's guess: both models in bfloat16 unless ``inference_precision`` is ``float32``.
    A wrong guess costs only time: a warm-up or the stage imports TensorFlow later.
    """
    from agriland_scale.models.engines import resolve

    todo = set(todo)
    if not MODEL_STAGES & todo:
        return False
    rt = cfg.runtime
    if rt.engine == "tensorflow":
        return True
    bf16 = "mixed_bfloat16"
    for train, apply, model, task, precision in (
        (
            "cae",
            "embeddings",
            cfg.embed.model,
            "embedding",
            "float32" if rt.inference_precision == "float32" else bf16,
        ),
        (
            "unet",
            "segmentation",
            cfg.segment.model,
            "segmentation",
            "float32" if rt.inference_precision == "float32" else bf16,
        ),
    ):
        if not {train, apply} & todo:
            continue
        if not model:  # trained in this run (or earlier: a cheap wrong guess)
            return True
        if apply in todo and resolve(rt.engine, task, model, precision) == "tensorflow":
            return True
    return False


def models_to_run(out: Path | str, until: str | None, *, force: bool, overwrite: bool) -> bool:
    """Whether a run into ``out`` may train or apply a model; False when its record says those are done.

    A first guess for :class:`ClusterLaunch` only (the runner checks the folder itself): a
    finished or resumed local run whose model stages are done has its workers skip
    TensorFlow's import, which would also hold up the cluster's close by seconds. ``out``
    is a folder (``str``: an object-storage URL, not read here).
    """
    models = MODEL_STAGES & set(stages_needed(until))
    if not models or force or overwrite or not isinstance(out, Path):
        return bool(models)
    try:
        stages = json.loads((out / RECORD).read_text()).get("stages") or {}
    except (OSError, ValueError, AttributeError):  # none yet, or damaged: the runner says so
        return True
    return any(stages.get(s) != "done" for s in models)


class ClusterLaunch:
    """Start the LocalCluster of ``cfg`` now; :meth:`take` it, or :meth:`close` it.

    With ``import_tensorflow``, each worker process starts importing TensorFlow as soon as
    it is up (:func:`~agriland_scale.models.worker.warm_up` of no model), so that the import
    overlaps what this process does before the model stages.

    Attributes
    ----------
    imports : list of (distributed.Future, str)
        The workers' TensorFlow imports and the address of each worker (none without
        ``import_tensorflow``).
    stderr_path : str
        A temporary file; ``STDERR_PATH.PID`` receives a worker process's standard error
        until the run's worker log takes over (moved into the log then, or removed by
        :meth:`close`).
    """

    def __init__(self, cfg: RuntimeConfig, *, import_tensorflow: bool):
        from distributed import Client

        fd, self.stderr_path = tempfile.mkstemp(prefix="agriland-workers-", suffix=".log")
        os.close(fd)
        self._taken = False
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None
        self.imports: list[tuple[Future, str]] = []
        try:
            self.cluster = local_cluster(cfg)
            self.client = Client(self.cluster)
            self.client.register_plugin(FastExit())
            self.client.register_plugin(StderrToFile(self.stderr_path, per_process=True))
            if import_tensorflow:
                self.imports = warm_up_workers(self.client, [], name="import-tensorflow")
        except BaseException:
            self.close()
            raise

    def take(self) -> tuple[LocalCluster, Client]:
        """Return the cluster and its client: the caller closes them from now on.

        :attr:`imports` are the workers' TensorFlow imports, ``(future, worker address)``.
        """
        assert self.cluster is not None and self.client is not None
        self._taken = True
        return self.cluster, self.client

    def close(self) -> None:
        """Close the cluster unless it was taken; remove the temporary stderr files."""
        if not self._taken:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        for path in [self.stderr_path, *glob.glob(glob.escape(self.stderr_path) + ".*")]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> ClusterLaunch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
