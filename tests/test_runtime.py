import json

import dask.array as da
import pytest

from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.pipeline.runtime import dask_client, gpu_resources


def test_local_cluster_has_a_dashboard_and_limits_threads():
    cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    with dask_client(cfg) as client:
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        env = client.run(lambda: __import__("os").environ.get("TF_NUM_INTRAOP_THREADS"))
        assert set(env.values()) == {"1"}
        assert gpu_resources(client) is None
        assert int(da.ones((100, 100), chunks=10).sum().compute()) == 10_000


def test_unreachable_scheduler_is_a_clear_error(monkeypatch):
    """A real connection to a port where nothing listens fails with a clear error, after a
    bounded wait. The client ``dask_client`` makes keeps its real connect-and-fail path; only
    its connect timeout (20 s, which the suite would otherwise spend waiting) is shortened to
    1 s here, after checking that ``dask_client`` asked for a finite one."""
    import math

    from dask.utils import parse_timedelta
    from distributed import Client

    from agriland_scale.errors import SchedulerError
    from agriland_scale.pipeline import runtime

    asked: list[float | None] = []

    def quick_client(address, *args, timeout=None, **kw):
        asked.append(parse_timedelta(timeout) if timeout is not None else None)
        return Client(address, *args, timeout="1s", **kw)

    monkeypatch.setattr(runtime, "Client", quick_client)
    with pytest.raises(SchedulerError, match="no Dask scheduler answers at tcp://127.0.0.1:9"):
        with dask_client(RuntimeConfig(), "tcp://127.0.0.1:9"):
            pass
    assert asked and asked[0] is not None and 0 < asked[0] < math.inf, asked  # never waits forever


def test_dashboard_listens_on_loopback_only_by_default():
    assert RuntimeConfig().dashboard_address.startswith("127.0.0.1:")

    def hosts(address: str) -> set[str]:
        cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=address)
        with dask_client(cfg) as client:
            server = client.cluster.scheduler.http_server
            return {s.getsockname()[0] for s in server._sockets.values()}

    assert hosts("127.0.0.1:0") == {"127.0.0.1"}
    assert hosts(":0") - {"127.0.0.1", "::1"}  # opened to the network only when asked


def test_own_workers_exit_at_once_with_their_streams_flushed(tmp_path):
    """The run's own LocalCluster workers skip the interpreter's teardown at exit (FastExit)
    and lose nothing they wrote; the workers of an existing cluster are left alone."""
    import sys

    from distributed import LocalCluster

    def has_plugin(dask_worker) -> bool:
        return "agriland-fast-exit" in dask_worker.plugins

    def last_words() -> None:
        sys.stderr.write("last words, unflushed")  # no newline: still in the buffer at exit

    cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    log = tmp_path / "workers.log"
    with dask_client(cfg, worker_log=str(log)) as client:
        assert all(client.run(has_plugin).values())
        client.run(last_words)
    assert log.read_text().endswith("last words, unflushed")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc:
        with dask_client(cfg, lc.scheduler_address) as client:
            assert not any(client.run(has_plugin).values())


def test_inference_precision_is_one_for_the_run():
    """``auto`` gives both models bfloat16 only where every worker's CPU has it, never beside a
    GPU; the explicit settings apply to both models. A
    resumed run recomputes model blocks of another precision: it is part of the model stages'
    settings (float32 runs keep their old ones)."""
    from agriland_scale.config.schema import RunConfig
    from agriland_scale.models.worker import cpu_has_bfloat16
    from agriland_scale.pipeline.context import stage_settings
    from agriland_scale.pipeline.runtime import inference_precision

    bf, f32 = "mixed_bfloat16", "float32"
    cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    with dask_client(cfg) as client:
        native = cpu_has_bfloat16()
        assert inference_precision(client, "auto", False) == dict.fromkeys(
            ("embeddings", "segmentation"), bf if native else f32
        )
        assert inference_precision(client, "auto", True) == {"embeddings": f32, "segmentation": f32}
        assert inference_precision(client, "float32", False) == {"embeddings": f32, "segmentation": f32}
        assert inference_precision(client, "bfloat16", True) == {"embeddings": bf, "segmentation": bf}
    run = RunConfig.model_validate(
        {"name": "t", "search": {"api": "local", "catalog": ".", "collections": ["c"], "bbox": [0, 0, 1, 1]}}
    )
    record = {"precision": {"embeddings": f32, "segmentation": bf}}
    assert stage_settings(run, record, "segmentation")["precision"] == bf
    for stage in ("embeddings", "clusters"):
        assert "precision" not in stage_settings(run, record, stage)
    assert "precision" not in stage_settings(run, {}, "segmentation")


def test_a_taken_port_is_a_clear_error_for_agriland_cluster():
    import socket

    from agriland_scale.errors import SchedulerError
    from agriland_scale.pipeline.serve import serve_cluster

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(
            SchedulerError, match=f"127.0.0.1:{port}.*--scheduler tcp://127.0.0.1:{port}.*--port"
        ):
            serve_cluster(RuntimeConfig(dashboard_address=":0"), port)


@pytest.mark.slow
def test_agriland_cluster_keeps_warm_workers_for_runs_until_stopped(tmp_path, demo_run):
    """``agriland cluster PIPELINE``: a scheduler on 127.0.0.1 whose workers have imported
    TensorFlow and loaded the pipeline's given models before the first run; a run given its
    address reuses them (no model load, no warm-up wait); Ctrl-C stops it and its workers."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from distributed import Client

    cfg, demo_out, _ = demo_run
    pipe = tmp_path / "given.yaml"
    pipe.write_text(
        yaml.safe_dump(
            cfg.with_overrides(
                **{
                    "embed.model": str(demo_out / "models" / "encoder.keras"),
                    "segment.model": str(demo_out / "models" / "unet.keras"),
                    "runtime.dashboard_address": ":0",
                }
            ).model_dump(mode="json")
        )
    )
    agriland = str(Path(sys.executable).parent / "agriland")
    # started as `agriland cluster ... &` from a script: SIGINT comes ignored, yet stops it
    proc = subprocess.Popen(
        [agriland, "cluster", str(pipe), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        first, ready = proc.stdout.readline(), proc.stdout.readline()
        address = first.split(" at ")[1].split(",")[0]
        assert address.startswith("tcp://127.0.0.1:") and "loaded encoder.keras, unet.keras" in ready
        with Client(address) as c:
            state = c.run(
                lambda: (
                    os.getpid(),
                    "tensorflow" in sys.modules,
                    "matplotlib.pyplot" in sys.modules,
                    sorted(Path(k[0]).name for k in sys.modules["agriland_scale.models.worker"]._models),
                )
            )
        ((pid, tf, mpl, loaded),) = state.values()
        assert tf and mpl and loaded == ["encoder.keras", "unet.keras"]
        out = tmp_path / "run"
        res = subprocess.run(
            [agriland, "run", str(pipe), "--out", str(out), "--quiet", "--scheduler", address],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr
        rec = json.loads((out / "run.json").read_text())
        assert rec["timings_s"].get("warm_up_wait", 0) < 1.0 and rec["scheduler"] == address
        assert rec["cube_computed_by"] == "the cluster"  # never a worker in the client's process here
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the other way to stop it
            proc.communicate(timeout=60)
            raise
    assert proc.returncode == 0 and rest.strip().endswith("agriland cluster: stopped")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_worker_in_this_process_takes_the_tasks_sent_to_it_and_leaves_at_the_end(tmp_path):
    """``main_process_worker``: a worker of the run's own cluster inside this process, for the
    cube while the worker processes import TensorFlow. Tasks sent to it run here; the run's
    worker plugins (stderr to the log file, fast exit) leave this process alone; it is gone
    from the scheduler when the block ends, and the worker processes are untouched."""
    import os

    from agriland_scale.pipeline.runtime import MAIN_WORKER, main_process_worker

    cfg = RuntimeConfig(n_workers=1, threads_per_worker=2, memory_limit="2GiB", dashboard_address=":0")
    stderr_before = os.fstat(2)
    with dask_client(cfg, worker_log=str(tmp_path / "workers.log")) as client:
        (process,) = client.scheduler_info(n_workers=-1)["workers"]
        with main_process_worker(client, cfg) as address:
            info = client.scheduler_info(n_workers=-1)["workers"]
            assert set(info) == {process, address} and info[address]["name"] == MAIN_WORKER
            assert info[address]["nthreads"] == 2
            assert client.submit(os.getpid, workers=[address], pure=False).result() == os.getpid()
            assert client.submit(os.getpid, workers=[process], pure=False).result() != os.getpid()
            here = client.run(lambda dask_worker: sorted(dask_worker.plugins), workers=[address])[address]
            assert {"agriland-fast-exit", "agriland-stderr-to-file"} <= set(
                here
            )  # registered, set up as no-ops
        assert set(client.scheduler_info(n_workers=-1)["workers"]) == {process}
        assert client.submit(os.getpid, pure=False).result() != os.getpid()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (stderr_before.st_dev, stderr_before.st_ino)  # not the log file


def test_warm_ups_never_go_to_a_worker_in_this_process(tmp_path):
    """Models are loaded on the worker processes only: a worker in this process (the cube's,
    while they import TensorFlow) gets no warm-up (this process would import TensorFlow)."""
    from agriland_scale.config.schema import RunConfig
    from agriland_scale.pipeline.context import RunContext
    from agriland_scale.pipeline.folder import RunFolder
    from agriland_scale.pipeline.runtime import main_process_worker

    cfg = RunConfig.model_validate(
        {
            "name": "t",
            "search": {"api": "local", "catalog": ".", "collections": ["c"], "bbox": [0, 0, 1, 1]},
            "runtime": {
                "n_workers": 1,
                "threads_per_worker": 2,
                "memory_limit": "2GiB",
                "dashboard_address": ":0",
            },
        }
    )
    with dask_client(cfg.runtime) as client:
        ctx = RunContext(
            cfg=cfg,
            folder=RunFolder(tmp_path),
            products=None,
            client=client,
            res=None,
            tag="t",
            say=print,
            progress=print,
            wanted=(),
            own_cluster=True,
        )
        (process,) = client.scheduler_info(n_workers=-1)["workers"]
        with main_process_worker(client, cfg.runtime) as here:
            ctx.warm_up([("missing-model.keras", 64, 3, True)], "segmentation")
            ((future, paths, on),) = ctx.warming
            assert on == process != here and paths == ("missing-model.keras",)
            assert "error" in future.result(timeout=120)  # a warm-up reports, never raises


def _wait_for(name: str) -> bool:
    from distributed import Event

    return Event(name).wait(60)


def test_the_cube_is_computed_in_this_process_only_while_the_run_s_workers_warm_up(tmp_path):
    """``RunContext.data_workers``: a worker in this process while a warm-up is pending on the
    run's own single-process cluster; the cluster itself otherwise (warm-ups done, several
    worker processes, or an existing cluster)."""
    import os

    from distributed import Event

    from agriland_scale.config.schema import RunConfig
    from agriland_scale.pipeline.context import RunContext
    from agriland_scale.pipeline.folder import RunFolder

    base = {
        "name": "t",
        "search": {"api": "local", "catalog": ".", "collections": ["c"], "bbox": [0, 0, 1, 1]},
    }
    rt = {"threads_per_worker": 2, "memory_limit": "2GiB", "dashboard_address": ":0"}
    for n_workers, own, warming, here in (
        (1, True, True, True),
        (1, True, False, False),
        (2, True, True, False),
        (1, False, True, False),
    ):
        cfg = RunConfig.model_validate(base | {"runtime": rt | {"n_workers": n_workers}})
        with dask_client(cfg.runtime) as client:
            ctx = RunContext(
                cfg=cfg,
                folder=RunFolder(tmp_path),
                products=None,
                client=client,
                res=None,
                tag="t",
                say=print,
                progress=print,
                wanted=(),
                own_cluster=own,
            )
            hold = Event(f"hold-{n_workers}-{own}-{warming}", client=client)
            if warming:  # a warm-up that holds its worker's thread until the check is done
                ctx.warming.append((client.submit(_wait_for, hold.name, pure=False), (), "w"))
            with ctx.data_workers() as workers:
                pids = {client.submit(os.getpid, workers=workers, pure=False).result() for _ in range(3)}
                assert (pids == {os.getpid()}) is here, (n_workers, own, warming)
                assert (workers is not None) is here
            hold.set()


def test_a_launched_cluster_imports_tensorflow_and_the_run_takes_it_over_with_its_stderr(tmp_path):
    """``ClusterLaunch`` (what ``agriland run`` starts before importing the pipeline): its
    workers import TensorFlow at once, writing their standard error to a temporary file of
    their own; ``dask_client(launch=)`` adopts that cluster instead of starting one and moves
    what each worker wrote so far into the run's worker log, in order, before what follows;
    no temporary file is left."""
    import glob
    import multiprocessing
    import sys

    from agriland_scale.pipeline.launch import ClusterLaunch

    def say(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    cfg = RuntimeConfig(n_workers=1, threads_per_worker=2, memory_limit="2GiB", dashboard_address=":0")
    log = tmp_path / "workers.log"
    launch = ClusterLaunch(cfg, import_tensorflow=True)
    cluster, client = launch.take()
    imports = launch.imports
    assert len(imports) == 1 and imports[0][1] in client.scheduler_info()["workers"]
    assert imports[0][0].result(timeout=120).get("error") is None
    assert all(client.run(lambda: "tensorflow" in sys.modules).values())
    client.run(say, "before the run's log existed")
    (early,) = glob.glob(glob.escape(launch.stderr_path) + ".*")  # one file per worker process
    assert "before the run's log existed" in open(early).read()
    with dask_client(cfg, worker_log=str(log), launch=launch) as adopted:
        assert adopted is client and adopted.scheduler.address == cluster.scheduler_address
        adopted.run(say, "after")
        plugins = adopted.run(lambda dask_worker: sorted(dask_worker.plugins)).popitem()[1]
        assert {"agriland-fast-exit", "agriland-stderr-to-file"} <= set(plugins)
    text = log.read_text()
    assert text.index("before the run's log existed") < text.index("after")
    launch.close()
    assert glob.glob(glob.escape(launch.stderr_path) + "*") == []
    assert not multiprocessing.active_children()


def test_a_launch_the_run_never_took_is_closed_with_its_workers_and_files():
    """A run that stops before it takes the launched cluster (a locked output folder, a failed
    check): closing the launch stops its worker processes, also while they import
    TensorFlow, and removes its temporary files."""
    import glob
    import multiprocessing

    from agriland_scale.pipeline.launch import ClusterLaunch

    cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    with ClusterLaunch(cfg, import_tensorflow=True) as launch:
        assert multiprocessing.active_children()  # the worker process
    assert not multiprocessing.active_children()
    assert glob.glob(glob.escape(launch.stderr_path) + "*") == []


def test_the_launch_skips_tensorflow_for_a_run_whose_model_stages_are_done(tmp_path):
    """``models_to_run``: a rerun of a finished local run (or one stopped after its model
    stages) does not have the launched workers import TensorFlow; a new, unfinished,
    forced, overwritten, damaged or object-storage run does; ``--until cube`` never does."""
    from agriland_scale.layout import STAGES
    from agriland_scale.pipeline.launch import models_to_run

    def guess(out=tmp_path, until=None, force=False, overwrite=False) -> bool:
        return models_to_run(out, until, force=force, overwrite=overwrite)

    assert guess() and not guess(until="cube")
    (tmp_path / "run.json").write_text(json.dumps({"stages": dict.fromkeys(STAGES, "done")}))
    assert not guess() and not guess(until="cae")
    assert guess(force=True) and guess(overwrite=True) and guess("s3://bucket/run")
    (tmp_path / "run.json").write_text(
        json.dumps({"stages": {**dict.fromkeys(STAGES, "done"), "segmentation": "interrupted"}})
    )
    assert guess() and not guess(until="embeddings")
    (tmp_path / "run.json").write_text("{damaged")
    assert guess()
