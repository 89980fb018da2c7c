"""Runtime: the dask.distributed client a run uses.

A LocalCluster (worker processes) by default, or an existing scheduler when an address is
given: only the address changes between a laptop and a multi-machine cluster. Worker
processes get TensorFlow/BLAS thread counts equal to their Dask threads, so workers do not
oversubscribe cores. Model stages ask for a ``GPU`` resource when the cluster offers one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import Protocol

from distributed import Client, LocalCluster

from agriland_scale.config.checks import check_scheduler_address
from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.errors import ConfigError, SchedulerError
from agriland_scale.pipeline.plugins import FastExit, StderrToFile

__all__ = [
    "MAIN_WORKER",
    "EarlyCluster",
    "dask_client",
    "gpu_resources",
    "inference_precision",
    "local_cluster",
    "main_process_worker",
    "scheduler_address",
    "worker_env",
]

log = logging.getLogger(__name__)


class EarlyCluster(Protocol):
    """A LocalCluster started ahead of a run, which :func:`dask_client` takes over.

    :class:`~agriland_scale.pipeline.launch.ClusterLaunch` is one (launch builds on this
    module, never the other way round).
    """

    stderr_path: str

    def take(self) -> tuple[LocalCluster, Client]:
        """Hand the cluster and its client over; the caller closes them from then on."""
        ...


# distributed samples every worker thread's stack each 10 ms by default: about a tenth of the
# CPU of a small run on 2 cores (bench_naive). Every 100 ms still fills the performance report.
PROFILE_INTERVAL = "100ms"


def worker_env(threads: int) -> dict[str, str]:
    """Environment for worker processes: thread limits, quiet TensorFlow, a lighter profiler.

    The statistical profiler's interval becomes :data:`PROFILE_INTERVAL` unless the user's
    Dask configuration sets one.
    """
    import dask

    t = str(threads)
    env = {
        "OMP_NUM_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "TF_NUM_INTRAOP_THREADS": t,
        "TF_NUM_INTEROP_THREADS": "1",
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if dask.config.get("distributed.worker.profile.interval") == "10ms":  # distributed's default
        env["DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL"] = PROFILE_INTERVAL
    return env


def _not_an_interrupted_gather(record: logging.LogRecord) -> bool:
    """Drop asyncio's report of a gather stopped by an interrupt (distributed's ``AllExit``).

    When Ctrl-C or SIGTERM stops a run while the client fetches a result, the gather ends with
    distributed's internal ``AllExit`` sentinel as the client closes; asyncio logs it as "Task
    exception was never retrieved", a traceback that says nothing to the user (the interrupt
    itself is reported in one line).
    """
    exc = record.exc_info[1] if record.exc_info else None
    return type(exc).__name__ != "AllExit"


def local_cluster(cfg: RuntimeConfig, **kwargs) -> LocalCluster:
    """Start the LocalCluster of ``cfg``, as a run starts it.

    Worker processes, threads, memory limit, dashboard and :func:`worker_env` from ``cfg``;
    ``kwargs`` go to ``LocalCluster`` too.
    """
    with warnings.catch_warnings():
        # a dashboard port in use moves the dashboard to a free port, which the run's
        # "Dask dashboard:" line names: distributed's three-line warning says nothing more
        warnings.filterwarnings("ignore", message=r"(?s)Port \d+ is already in use", category=UserWarning)
        return LocalCluster(
            n_workers=cfg.n_workers,
            threads_per_worker=cfg.threads_per_worker,
            memory_limit=cfg.memory_limit,
            dashboard_address=cfg.dashboard_address,
            processes=True,
            env=worker_env(cfg.threads_per_worker),
            **kwargs,
        )


def scheduler_address(cfg: RuntimeConfig, scheduler: str | None = None) -> str | None:
    """Return the address of the Dask scheduler a run uses; None for its own LocalCluster.

    In order: ``scheduler`` (``--scheduler``), ``cfg.scheduler`` (``runtime.scheduler``), then
    Dask's own configuration, ``scheduler-address`` (the ``DASK_SCHEDULER_ADDRESS``
    environment variable or a Dask config file), as ``distributed.Client()`` reads it.

    Parameters
    ----------
    cfg : RuntimeConfig
        The run's runtime settings.
    scheduler : str or None
        An address given on the command line, checked there already.

    Returns
    -------
    str or None
        The scheduler's address, or None when none is named anywhere.

    Raises
    ------
    ConfigError
        Dask's configuration names something that is not a scheduler address.
    """
    if scheduler or cfg.scheduler:
        return scheduler or cfg.scheduler
    import dask.config

    value = dask.config.get("scheduler-address", None)
    if value is None or not str(value).strip():
        return None
    try:
        return check_scheduler_address(str(value))
    except ValueError as e:
        raise ConfigError(
            f"DASK_SCHEDULER_ADDRESS (Dask's configuration 'scheduler-address', from the "
            f"environment or a Dask config file): {e}; or unset it to start a LocalCluster"
        ) from None


@contextlib.contextmanager
def dask_client(
    cfg: RuntimeConfig,
    scheduler: str | None = None,
    *,
    worker_log: str | None = None,
    closing: list[threading.Thread] | None = None,
    launch: EarlyCluster | None = None,
) -> Iterator[Client]:
    """Connect to ``scheduler`` (or ``cfg.scheduler``, or Dask's ``scheduler-address``), else start a LocalCluster.

    The LocalCluster is closed when the block ends; an external cluster is left running.
    ``worker_log``: a file that receives the standard error of the LocalCluster's worker
    processes (see :class:`StderrToFile`). ``closing``: when the block ends without an
    error, the LocalCluster closes in a thread appended to this list (a worker holding
    TensorFlow takes seconds to stop) and the caller joins it when its own work is done.
    ``launch``: the LocalCluster the CLI started early (:class:`~.launch.ClusterLaunch`),
    taken over instead of starting one (with no scheduler address only).
    """
    asyncio_log = logging.getLogger("asyncio")
    if _not_an_interrupted_gather not in asyncio_log.filters:
        asyncio_log.addFilter(_not_an_interrupted_gather)
    address = scheduler_address(cfg, scheduler)  # --scheduler > runtime.scheduler > Dask's config
    if address:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise SchedulerError(
                f"no Dask scheduler answers at {address} ({e}): start one "
                "(`dask scheduler`) or fix runtime.scheduler / --scheduler / "
                "DASK_SCHEDULER_ADDRESS"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    if launch is not None:
        cluster, client = launch.take()
    else:
        cluster = local_cluster(cfg)
        try:
            client = Client(cluster)
        except BaseException:
            cluster.close()
            raise

    def close() -> None:
        client.close()
        cluster.close()

    try:
        if launch is None:
            client.register_plugin(FastExit())
        if worker_log:  # a launch's temporary files move into the log
            client.register_plugin(StderrToFile(worker_log, earlier=launch.stderr_path if launch else None))
        yield client
    except BaseException:
        close()
        raise
    if closing is None:
        close()
    else:
        closing.append(threading.Thread(target=close, name="agriland-close-cluster"))
        closing[-1].start()


# the name of the worker main_process_worker runs (on the dashboard, and left out of warm-ups)
MAIN_WORKER = "agriland-main-process"


class _FromThreads(logging.Filter):
    """Pass the log records of threads whose name starts with ``prefix`` (or, with ``keep=False``, all others)."""

    def __init__(self, prefix: str, keep: bool = True):
        super().__init__()
        self.prefix, self.keep = prefix, keep

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.threadName or "").startswith(self.prefix) is self.keep


@contextlib.contextmanager
def _task_logs_to(path: str | None, prefix: str) -> Iterator[None]:
    """Send what threads named ``prefix…`` log to ``path``, not the terminal, for the block.

    Warnings and errors go to the file ``path`` (appended) and not to the root logger's
    handlers (the terminal): where a worker process's tasks log (:class:`StderrToFile`).
    """
    root = logging.getLogger()
    away = _FromThreads(prefix, keep=False)
    handlers = list(root.handlers)
    for h in handlers:
        h.addFilter(away)
    to_file = None
    if path:
        to_file = logging.FileHandler(path)
        to_file.setLevel(logging.WARNING)
        to_file.addFilter(_FromThreads(prefix))
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(to_file)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(away)
        if to_file is not None:
            root.removeHandler(to_file)
            to_file.close()


@contextlib.contextmanager
def main_process_worker(client: Client, cfg: RuntimeConfig, log_file: str | None = None) -> Iterator[str]:
    """Run a Dask worker in this process, on ``client``'s scheduler, for the block; yield its address.

    For the cube stage of a run on its own LocalCluster while its worker processes still
    import TensorFlow and load the models: that work holds a worker's interpreter lock (GIL)
    for seconds at a time, and the cube's tasks in the same process waited for it. On the
    Virginia scene on 2 cores (one date) the cube took 5.8-6.1 s there and 1.05 s in this
    process, and the encoder's warm-up 12.5-12.8 s against 10.4 s. The worker has
    ``cfg``'s threads, no memory limit, and shows on the dashboard as :data:`MAIN_WORKER`;
    send it tasks by address (``workers=[address]``). It is closed when the block ends, its
    running tasks finished or cancelled first. The plugins of the run's own cluster
    (:class:`FastExit`, :class:`StderrToFile`) leave this process alone; what its tasks log
    (warnings, a reader's errors) goes to ``log_file`` (the run's worker log), not to the
    terminal, as from a worker process.
    """
    from distributed import Worker
    from distributed.comm import get_address_host

    # no memory limit: its monitor would measure the whole agriland process (scheduler,
    # client, the run's state) and pause the worker for good once that passed the limit
    async def start() -> Worker:
        return await Worker(
            client.scheduler.address,
            nthreads=cfg.threads_per_worker,
            name=MAIN_WORKER,
            memory_limit=0,
            host=host,
            dashboard=False,
        )

    # it listens where the scheduler does (loopback for the run's own LocalCluster), never on
    # every interface, and opens no dashboard of its own
    host = get_address_host(client.scheduler.address)

    with _task_logs_to(log_file, f"{MAIN_WORKER}-"):
        worker = client.sync(start)
        try:
            yield worker.address
        finally:
            client.sync(worker.close, reason="agriland: main-process worker no longer needed")


def gpu_resources(client: Client) -> dict[str, float] | None:
    """``{"GPU": 1}`` when any worker advertises a GPU resource, else ``None`` (CPU)."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    if any(w.get("resources", {}).get("GPU") for w in info.values()):
        return {"GPU": 1}
    return None


def inference_precision(client: Client, setting: str, gpu: bool) -> dict[str, str]:
    """Choose the Keras dtype policy of each model stage's predictions (``float32``, ``mixed_bfloat16``).

    ``setting`` is ``runtime.inference_precision``: ``float32`` for both stages, ``bfloat16``
    for both, or ``auto``: both in bfloat16 when every worker's CPU computes it natively
    (:func:`~agriland_scale.models.worker.cpu_has_bfloat16`) and the cluster has no GPU
    (``gpu``), else float32. One answer for the whole run, so that its products do not depend
    on which worker computed which block.

    Measured on a 2-core AMX CPU (``bench/results/embed_precision.txt``): a full tile's
    embeddings 3.98x faster (OpenVINO bfloat16 against ONNX Runtime float32), and their
    clusters as close to float32's (adjusted Rand index 0.74, same seed) as two float32 seeds'
    are (0.72); the demo U-Net's probabilities moved by mean |dp| 0.0007 (99.94 % of mask
    pixels equal). ``float32`` gives products equal across machines.

    Returns
    -------
    dict
        ``{"embeddings": policy, "segmentation": policy}``.
    """
    both = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
    if setting in both:
        return dict.fromkeys(("embeddings", "segmentation"), both[setting])
    native = False
    if not gpu:
        from agriland_scale.models.worker import cpu_has_bfloat16

        answers = client.run(cpu_has_bfloat16)
        native = bool(answers) and all(answers.values())
    return dict.fromkeys(("embeddings", "segmentation"), "mixed_bfloat16" if native else "float32")
