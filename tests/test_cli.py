"""The command line behaves like rio, stac-client and dask: versions, results on stdout and
messages on stderr, a closed pipe, SIGPIPE-quiet, TensorFlow's noise kept off the terminal."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from agriland_scale import __version__

from .conftest import DEMO_YAML

AGRILAND = str(Path(sys.executable).parent / "agriland")
TF_NOISE = (
    "I0000",
    "E0000",
    "W0000",
    "oneDNN",
    "cpu_feature_guard",
    "NodeDef mentions",
    "absl::InitializeLog",
    "remapper failed",
)


def _agriland(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AGRILAND, *args], capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw
    )


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    done = _agriland(flag)
    assert done.returncode == 0 and done.stdout.strip() == f"agriland-scale {__version__}"


def test_results_on_stdout_messages_on_stderr_and_quiet():
    done = _agriland("validate", str(DEMO_YAML))
    assert done.returncode == 0 and "valid ('demo-virginia')" in done.stdout and done.stderr == ""
    bad = _agriland("validate", "/nonexistent.yaml", "-q")
    assert bad.returncode == 2 and bad.stdout == "" and "does not exist" in bad.stderr


def test_search_json_pipes_into_a_json_reader():
    done = _agriland("search", str(DEMO_YAML), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)  # nothing but JSON on stdout
    assert [i["id"] for i in info["items"]] == ["S2_L1C_18S_virginia_demo_window"]


def test_closed_pipe_exits_quietly():
    """`agriland search P --json | head -c0`: the reader is gone before the result is written."""
    proc = subprocess.Popen(
        [AGRILAND, "search", str(DEMO_YAML), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(120)
    assert proc.returncode == 141, err  # 128 + SIGPIPE, what a shell reports
    assert err == "", err


def test_missing_tensorflow_is_named_with_the_extra_to_install():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "from agriland_scale.models import worker as _worker\n"
        "try:\n    _worker.configure_tensorflow()\nexcept Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "MissingDependency" in done.stdout and "agriland-scale[cpu]" in done.stdout, (
        done.stdout + done.stderr
    )


@pytest.mark.slow
def test_short_run_keeps_tensorflow_noise_off_the_terminal(demo_run, tmp_path):
    """A LocalCluster run that loads and applies the U-Net (segmentation + publish): stdout is
    one JSON result, stderr has the run's lines and none of TensorFlow's C++ log lines, which
    go to the run's worker log."""
    cfg, out, _ = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("logs"))
    import yaml

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    done = _agriland(
        "run",
        str(pipeline),
        "--out",
        str(copy),
        "--force",
        "segmentation",
        "--set",
        "runtime.dashboard_address=127.0.0.1:0",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["stages"]["segmentation"] == "done" and result["out"] == str(copy)
    assert "[segmentation]" in done.stderr and "Dask dashboard" in done.stderr
    noise = [line for line in done.stderr.splitlines() if any(n in line for n in TF_NOISE)]
    assert not noise, noise
    rec = json.loads((copy / "run.json").read_text())
    assert (copy / rec["performance_report"]).stat().st_size > 10_000
    assert any(p.name.startswith("workers-") for p in (copy / "logs").iterdir())


@pytest.mark.slow
def test_training_progress_reaches_the_run_log(demo_run):
    """Epoch, step, loss and metric of both trainings, relayed from the worker that trained."""
    cfg, out, _ = demo_run
    log = "\n".join(p.read_text() for p in (out / "logs").glob("run-*.log"))
    epochs = cfg.embed.train.epochs
    steps = cfg.embed.train.steps_per_epoch
    assert f"CAE training: step {epochs * steps}/{epochs * steps}, epoch {epochs}/{epochs}, loss" in log
    assert "U-Net training: step" in log and "masked_iou" in log and "val_loss" in log
    assert not (out / "models" / "cae.checkpoint.keras").exists()  # checkpoints go after training
    assert not (out / "models" / "unet.best.keras").exists()


def test_failing_task_on_a_local_cluster_is_one_paragraph(tmp_path):
    """A task that fails on a worker of the run's own LocalCluster (a tile damaged in the
    middle of a COG, found while the cube is computed by the worker inside the agriland
    process): one paragraph naming the asset on stderr, exit 2, no worker "Compute Failed"
    log or traceback."""
    import yaml

    cat = tmp_path / "catalog"
    shutil.copytree(DEMO_YAML.parent / "virginia", cat)
    data = bytearray((cat / "B04.tif").read_bytes())
    mid = len(data) // 3
    data[mid : mid + 20000] = b"\xff" * 20000
    (cat / "B04.tif").write_bytes(bytes(data))
    doc = yaml.safe_load(DEMO_YAML.read_text())
    doc["search"]["catalog"] = str(cat)
    doc["runtime"] = {
        "n_workers": 1,
        "threads_per_worker": 2,
        "memory_limit": "4GiB",
        "dashboard_address": "127.0.0.1:0",
    }
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(doc))
    done = _agriland("run", str(pipeline), "--out", str(tmp_path / "out"), "-q", timeout=600)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert err.startswith("agriland: error: cube utm18n: block") and "asset 'red'" in err and "B04.tif" in err
    assert "Traceback" not in err and "Compute Failed" not in err and len(err.splitlines()) == 1, err
    # the run's own cluster was importing TensorFlow: a worker in this process read the cube
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["cube_computed_by"].startswith("agriland-main-process") and rec["stages"]["cube"] == "failed"
    # what its tasks logged (odc-stac's read error) went to the worker log, as from a worker process
    logged = "".join(p.read_text() for p in (tmp_path / "out" / "logs").glob("workers-*.log"))
    assert "ERROR odc.loader" in logged and "B04.tif" in logged


def test_the_console_script_exits_without_teardown_with_the_status_and_everything_flushed():
    """``agriland`` (``agriland_scale.__main__.entry``) ends the process once every other exit handler has run,
    without the interpreter's teardown of modules (about a second after a run): the status is
    ``main``'s (or argparse's), buffered stdout and the log reach their files, an exit handler
    registered during the command still runs, an object's teardown (``__del__``) does not."""
    code = textwrap.dedent("""
        import atexit, logging, sys
        import agriland_scale.__main__ as cli

        class Teardown:
            def __del__(self):
                print("teardown ran", file=sys.stderr)

        cli.kept = Teardown()

        def command():
            atexit.register(print, "handler ran", file=sys.stderr)
            logging.basicConfig(filename=sys.argv[2], level=logging.INFO)
            logging.getLogger("t").info("logged line")
            sys.stdout.write("buffered result")  # no newline, stdout is a pipe: still in the buffer
            return int(sys.argv[1])

        cli.main = command
        sys.exit(cli.entry())
        """)
    for status in (0, 3):
        log = Path(tempfile.mkdtemp()) / "t.log"
        done = subprocess.run(
            [sys.executable, "-c", code, str(status), str(log)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == status and done.stdout == "buffered result", done
        assert "handler ran" in done.stderr and "teardown ran" not in done.stderr, done.stderr
        assert "logged line" in log.read_text()
    assert _agriland("run").returncode == 2  # a usage error: argparse's status
    assert _agriland("--version").stdout.startswith("agriland-scale ")


def test_a_run_refused_before_it_starts_closes_the_cluster_launched_for_it(tmp_path):
    """``agriland run`` starts its LocalCluster, whose workers import TensorFlow, before it
    checks the output folder (:class:`~agriland_scale.pipeline.launch.ClusterLaunch`). A run
    refused there (a folder of someone else's files) is one paragraph, exit 2, none of the
    workers' TensorFlow lines on the terminal, the folder untouched, and no worker process or
    temporary file left behind."""
    import psutil

    mine = tmp_path / "mine"
    (mine / "models").mkdir(parents=True)
    (mine / "models" / "notes.txt").write_text("mine")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        [
            AGRILAND,
            "run",
            str(DEMO_YAML),
            "--out",
            str(mine),
            "-q",
            "--set",
            "runtime.dashboard_address=127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    launched: set[int] = set()
    while proc.poll() is None:  # the worker processes the run starts, seen while it runs
        with contextlib.suppress(psutil.Error):
            launched |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert (
        err.startswith("agriland: error: ") and "no agriland run wrote" in err and len(err.splitlines()) == 1
    ), err
    assert not any(n in err for n in TF_NOISE), err
    assert [p.name for p in mine.rglob("*")] == ["models", "notes.txt"]
    assert launched, "the run started no worker process"

    def alive() -> list[int]:
        live = []
        for pid in launched:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != "zombie":
                    live.append(pid)
        return live

    deadline = time.monotonic() + 1  # gone within a second (looked at until then, not slept)
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()
    assert [
        p.name for p in tmp.iterdir() if p.name.startswith("agriland")
    ] == []  # dask's scratch space stays


def test_the_agriland_process_does_not_import_tensorflow():
    """Models run on the workers: the client (``agriland run``, the runner and every stage
    module) checks given models from their sidecars and never pays TensorFlow's import."""
    code = (
        "import sys, agriland_scale.cli, agriland_scale.pipeline.runner, agriland_scale.pipeline.stages; "
        "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_agriland_cluster_keeps_dask_and_tensorflow_noise_off_the_terminal(tmp_path):
    """`agriland cluster` whose dashboard port is taken: the dashboard moves to a free port
    (named in its first line), without distributed's "Port ... is already in use" warning;
    TensorFlow's C++ lines and the workers' last words at Ctrl-C go to the workers' log."""
    import signal
    import socket

    import yaml

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        doc = yaml.safe_load(DEMO_YAML.read_text())
        doc["runtime"] = {"dashboard_address": f"127.0.0.1:{port}", "memory_limit": "4GiB"}
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump(doc))
        proc = subprocess.Popen(
            [AGRILAND, "cluster", str(pipeline), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"AGRILAND_CACHE": str(tmp_path / "cache")},
        )
        try:
            first, ready = proc.stdout.readline(), proc.stdout.readline()
            assert "workers ready" in ready, first + ready + proc.stderr.read()
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "dashboard http://127.0.0.1:" in first and f":{port}/" not in first, first
    assert err == "", err  # no UserWarning, no oneDNN / absl line, no traceback
    logs = list((tmp_path / "cache" / "logs").glob("cluster-workers-*.log"))
    assert len(logs) == 1 and str(logs[0]) in first
    assert "agriland cluster: stopped" in out
