"""``agriland cluster``: a LocalCluster that stays between runs, its workers warm.

Its workers are those a run starts for itself (:func:`~.runtime.local_cluster`), but each
imports TensorFlow, Keras, odc-stac, scikit-learn and matplotlib at once and keeps the models
runs load; a run given its address skips what its own cluster pays each time.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from distributed import Client

from agriland_scale.config.schema import RunConfig, RuntimeConfig
from agriland_scale.errors import ConfigError, SchedulerError
from agriland_scale.files import cache_dir
from agriland_scale.pipeline.plugins import FastExit, StderrToFile
from agriland_scale.pipeline.runtime import (
    gpu_resources,
    inference_precision,
    local_cluster,
)

__all__ = ["given_models", "serve_cluster"]


def _preload() -> float:
    """Import on a worker what the stages' tasks import; return the seconds it took.

    TensorFlow, Keras, odc-stac, rasterio, scikit-learn and matplotlib.
    """
    t0 = time.perf_counter()
    from agriland_scale.models.worker import configure_tensorflow

    configure_tensorflow()
    import keras  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import odc.stac  # noqa: F401
    import rasterio  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.manifold  # noqa: F401

    from agriland_scale.models import dec, unet  # noqa: F401  (Keras custom objects)

    return time.perf_counter() - t0


_TASKS = {"embeddings": "embedding", "segmentation": "segmentation"}


def given_models(cfg: RunConfig) -> dict[str, list[tuple[str, int, int, bool]]]:
    """List the models a run of ``cfg`` is given (``embed.model``, ``segment.model``), by stage.

    As :func:`~agriland_scale.models.worker.warm_up` takes them: at their training window.
    """
    e, s = cfg.embed, cfg.segment
    return {
        **({"embeddings": [(e.model, cfg.patches.size, len(e.bands), True)]} if e.model else {}),
        **({"segmentation": [(s.model, s.window, len(s.bands), True)]} if s.model else {}),
    }


def serve_cluster(
    cfg: RuntimeConfig,
    port: int = 8786,
    *,
    models: dict[str, list] | None = None,
    report: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> None:
    """Run a LocalCluster for agriland runs until Ctrl-C, SIGTERM or ``stop`` is set.

    Its workers are those a run starts for itself (``cfg``'s workers, threads, memory limit,
    environment and dashboard), but they stay between runs: each imports TensorFlow, Keras,
    odc-stac, scikit-learn and matplotlib at once, and keeps the models that runs load (cached by path
    and modification time, :func:`~agriland_scale.models.worker.get_model`). A run given its
    address (``--scheduler``) skips the worker start, the imports and the model loads that a
    run's own cluster pays each time (about 10 s of a small run on 2 cores, bench_naive).

    The scheduler listens on 127.0.0.1:``port`` (0: any free port). ``models``: model files
    to load and trace on every worker at once, by stage (:func:`given_models`), in the
    precision that stage's predictions will use. ``report`` receives the lines to show; the
    first names the address.
    """
    import signal
    import socket

    try:
        if port:  # LocalCluster only says "Scheduler failed to start" when the port is taken
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the scheduler binds
                probe.bind(("127.0.0.1", port))
        cluster = local_cluster(cfg, host="127.0.0.1", scheduler_port=port)
    except (OSError, RuntimeError) as e:
        raise SchedulerError(
            f"cannot start a scheduler on 127.0.0.1:{port} ({e}): if an agriland cluster "
            f"already runs there, use it (--scheduler tcp://127.0.0.1:{port}); else "
            "choose another --port"
        ) from None
    stop = stop or threading.Event()
    main = threading.current_thread() is threading.main_thread()
    # both stop it, even where SIGINT came ignored (a command started with & by a script)
    previous = (
        {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        if main
        else {}
    )
    client = None
    try:
        client = Client(cluster)
        client.register_plugin(FastExit())
        # the workers' standard error (TensorFlow's C++ log lines, a worker's last words when
        # the cluster stops) goes to a log file, as a run's own workers' does
        logs = cache_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        worker_log = logs / f"cluster-workers-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        client.register_plugin(StderrToFile(str(worker_log)))
        report(
            f"agriland cluster: {cfg.n_workers} worker(s) x {cfg.threads_per_worker} threads at "
            f"{cluster.scheduler_address}, dashboard {client.dashboard_link}; workers' log {worker_log}"
        )
        workers = list(client.scheduler_info(n_workers=-1)["workers"])
        seconds = client.gather(
            [
                client.submit(_preload, workers=[w], pure=False, key=f"agriland-preload-{i}")
                for i, w in enumerate(workers)
            ]
        )
        loaded = ""
        if models:
            from agriland_scale.models.engines import resolve
            from agriland_scale.models.worker import warm_up

            gpu = bool(gpu_resources(client))
            precision = inference_precision(client, cfg.inference_precision, gpu=gpu)
            engine = {  # the engine each stage's run will take (auto: where the ONNX artifact is here)
                stage: resolve(cfg.engine, _TASKS[stage], m[0][0], precision[stage], gpu=gpu)
                for stage, m in models.items()
            }
            done = client.gather(
                [
                    client.submit(warm_up, m, precision[stage], engine[stage], workers=[w], pure=False)
                    for stage, m in models.items()
                    for w in workers
                ]
            )
            errors = {d["error"] for d in done if "error" in d}
            if errors:
                raise ConfigError(f"cannot load a model of the pipeline on the workers: {'; '.join(errors)}")
            loaded = f"; loaded {', '.join(Path(m[0]).name for ms in models.values() for m in ms)}"
        report(
            f"workers ready: TensorFlow, Keras, odc-stac, scikit-learn and matplotlib imported in "
            f"{max(seconds):.1f} s{loaded}. Run with --scheduler {cluster.scheduler_address} "
            "(or runtime.scheduler); stop with Ctrl-C"
        )
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if client is not None:
            client.close()
        cluster.close()
    report("agriland cluster: stopped")
