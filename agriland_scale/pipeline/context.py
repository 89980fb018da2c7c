"""What every stage of a run is given: :class:`RunContext`, small and frozen."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agriland_scale.config.schema import RunConfig
from agriland_scale.errors import AgrilandError
from agriland_scale.files import is_object_url, join_url, object_version
from agriland_scale.layout import MODELS_DIR, STAGE_SETTINGS
from agriland_scale.models.files import read_sidecar
from agriland_scale.pipeline.folder import InFolder, RunFolder
from agriland_scale.pipeline.launch import warm_up_workers
from agriland_scale.pipeline.runtime import main_process_worker
from agriland_scale.store.resume import Products

__all__ = ["Progress", "Report", "RunContext"]

Report = Callable[[str], None]
# progress(label, done, total, info, milestone): blocks of a stage, or steps of a training ("info":
# epoch, loss and metrics, or the phase before the first step; "milestone", passed only when
# true: a phase or a finished epoch); block stages pass the first three arguments only
Progress = Callable[..., None]


@dataclass(frozen=True)
class RunContext(InFolder):
    """One run as its stages see it.

    Attributes
    ----------
    cfg : RunConfig
        The run's configuration.
    folder : RunFolder
        Where the run lives and its record (:class:`~.folder.RunFolder`; ``out``,
        ``record``, ``location`` and ``mirror`` are its parts).
    products : Products
        Writes product groups into the store, resumably.
    client : distributed.Client
        The run's Dask client.
    res : dict or None
        Worker resources for model tasks (``{"GPU": 1}`` when the cluster has GPUs).
    tag : str
        Names this run's progress events (training relays epochs through the scheduler).
    say : callable
        ``say(message)``: a line for the user and the run log.
    progress : callable
        ``progress(label, done, total[, info, milestone])``: blocks or training steps.
    wanted : tuple of str
        The stages this invocation runs or keeps, in order.
    warming : list
        The model warm-ups started for later stages: ``(future, the model files it loads
        (none: TensorFlow only), the worker it is pinned to)``; the runner cancels what is
        left of them when the run ends.
    report_figures : dict
        ``{zone prefix: HTML figures}``: the report's maps of the products, drawn by the
        publish stage while the workers draw the cluster pictures (the first three also make
        the quicklook); ``report.html`` embeds them instead of drawing them again.
    own_cluster : bool
        Whether the run started its LocalCluster itself (no ``--scheduler`` /
        ``runtime.scheduler``): this machine's, closed with the run.
    worker_log : str
        The file that receives its worker processes' standard error (empty: none).
    """

    cfg: RunConfig
    folder: RunFolder
    products: Products
    client: Any
    res: dict[str, float] | None
    tag: str
    say: Report
    progress: Progress
    wanted: tuple[str, ...]
    warming: list[tuple[Any, tuple[str, ...], str]] = field(default_factory=list)
    report_figures: dict[str, list[str]] = field(default_factory=dict)
    own_cluster: bool = False
    worker_log: str = ""

    @property
    def store(self) -> Any:
        """A read-only store of the run's complete products (``main``'s tip; it pickles to tasks)."""
        return self.products.reader()

    def precision(self, stage: str) -> str:
        """Return the Keras dtype policy of model stage ``stage``'s predictions (``run.json``'s ``precision``)."""
        return (self.record.get("precision") or {}).get(stage, "float32")

    @property
    def models(self) -> Path:
        """Where trained models go in the run folder (or its working copy), ``OUT/models``."""
        return self.folder.models

    def where(self, rel: str) -> str:
        """Where the run's file ``rel`` (relative to OUT) lives: a path, or a URL on object storage."""
        return self.folder.where(rel)

    def model_location(self, name: str) -> str:
        """Where the training task saves model ``name``: ``OUT/models/NAME``, a path or a URL.

        For a run on object storage the task puts it there itself (a worker may share no
        folder with this process); :meth:`fetched_models` then copies the files here.
        """
        if is_object_url(self.location):
            return join_url(self.location, f"{MODELS_DIR}/{name}")
        return str(self.models / name)

    def fetched_models(self) -> None:
        """Copy the models a training task put on the object store into the working copy."""
        if self.mirror is not None:
            self.mirror.pull(MODELS_DIR + "/")

    def warm_up(
        self,
        models: list[tuple[str, int, int, bool]],
        stage: str = "embeddings",
        *,
        only_tensorflow: bool = False,
    ) -> None:
        """Start :func:`~agriland_scale.models.worker.warm_up` on every worker, without waiting.

        ``models``: ``(path, window px, bands, trace)``, for model stage ``stage`` (its
        precision); with none, workers only import TensorFlow (when ``only_tensorflow``). Not
        on a worker in this process (:func:`~.runtime.main_process_worker`).
        """
        if not models and not only_tensorflow:
            return
        from agriland_scale.models.engines import resolve

        precision = self.precision(stage)
        task = "embedding" if stage == "embeddings" else "segmentation"
        groups: dict[str, list[tuple[str, int, int, bool]]] = {}
        for m in models:  # each model in the engine its stage will take (``auto``: if its artifact is here)
            try:
                trained = (read_sidecar(m[0]).get("patch_size") if task == "segmentation" else None) or m[1]
                size = None if m[1] == trained else m[1]
                engine = resolve(self.cfg.runtime.engine, task, m[0], precision, size, gpu=bool(self.res))
            except AgrilandError:  # a warm-up never fails: the stage that needs the model says why
                engine = "tensorflow"
            groups.setdefault(engine, []).append(m)
        for engine, group in groups.items() if models else [("tensorflow", [])]:
            for future, w in warm_up_workers(self.client, group, precision, engine=engine):
                self.warming.append((future, tuple(m[0] for m in group), w))

    def wait_for_warm_up(self, model: str, timeout: float = 600.0) -> float:
        """Wait for the warm-ups that load ``model`` or import TensorFlow; return the seconds waited.

        A model stage calls this first, so that its own time is its work, and the time the
        workers still needed to import TensorFlow and load the model is recorded apart
        (``timings_s["warm_up_wait"]``). A warm-up never fails (see
        :func:`~agriland_scale.models.worker.warm_up`). A warm-up is pinned to its worker:
        once that worker has left the cluster (killed, restarted by its nanny with a new
        address) it can never finish, and it is no longer waited for. After ``timeout``
        seconds the stage starts anyway.
        """
        from distributed import wait

        pending = [(f, w) for f, paths, w in self.warming if not paths or model in paths]
        t0 = time.perf_counter()
        while pending and time.perf_counter() - t0 < timeout:
            alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
            pending = [(f, w) for f, w in pending if not f.done() and w in alive]
            if pending:
                try:
                    wait([f for f, _ in pending], timeout=0.5)
                except TimeoutError:
                    pass
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def data_workers(self) -> Iterator[list[str] | None]:
        """Give the workers a data stage's tasks go to (``workers=``) for the block; None: any.

        While the workers of the run's own single-process LocalCluster still import
        TensorFlow and load models (a warm-up is pending), a worker in this process
        (:func:`~.runtime.main_process_worker`), closed when the block ends: tasks sharing a
        process with that work wait for its interpreter lock. Otherwise (an existing cluster,
        several worker processes, warm-ups done) None.
        """
        warming = any(not f.done() for f, _, _ in self.warming)
        if not (self.own_cluster and self.cfg.runtime.n_workers == 1 and warming):
            yield None
            return
        with main_process_worker(self.client, self.cfg.runtime, self.worker_log or None) as address:
            yield [address]

    def zones(self) -> dict[str, dict[str, Any]]:
        """Return the run's UTM zones that hold clear pixels: ``{name: {prefix, epsg, shape, ...}}``."""
        return zones_with_data(self.record)

    def settings(self, stage: str) -> dict[str, Any]:
        """Return the settings ``stage``'s outputs depend on (see :func:`stage_settings`)."""
        return stage_settings(self.cfg, self.record, stage)


def model_version(path: str) -> int | str | None:
    """Return a model file's version: mtime (ns), or its e-tag on object storage; None if missing."""
    if is_object_url(path):
        return object_version(path)
    p = Path(path)
    return p.stat().st_mtime_ns if p.exists() else None


def zones_with_data(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the zones of a run record that are not empty (no clear pixel)."""
    return {n: z for n, z in (record.get("zones") or {}).items() if not z.get("empty")}


def stage_settings(cfg: RunConfig, record: dict[str, Any], stage: str) -> dict[str, Any]:
    """Return the config values ``stage``'s outputs depend on, plus the models it applies.

    A resumed stage reuses blocks only of the same settings (see :mod:`.resume`).

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration; ``runtime`` never counts.
    record : dict
        The run record (model paths of the ``cae`` and ``unet`` stages).
    stage : str
        One of :data:`~agriland_scale.layout.STAGES`.

    Returns
    -------
    dict
        ``{dotted key: value}``, plus ``cae_model``/``unet_model`` ``[path, mtime_ns]`` and
        the run's ``precision`` (model stages, unless float32).
    """
    values = json.loads(cfg.model_dump_json())
    out: dict[str, Any] = {}
    for key in STAGE_SETTINGS[stage]:
        node: Any = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    for name, attr in (("cae", "encoder_path"), ("unet", "model_path")):
        path = (record.get(name) or {}).get(attr)
        if path and stage in ("embeddings", "segmentation"):
            version = model_version(path)
            if version is not None:
                out[f"{name}_model"] = [path, version]
    precision = (record.get("precision") or {}).get(stage, "float32")
    if precision != "float32":  # the blocks of float32 runs keep their settings
        out["precision"] = precision
    return out
