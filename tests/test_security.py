"""Pins of what already held against an adversary: safe YAML, Keras safe mode, no shell."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from agriland_scale import load_config
from agriland_scale.errors import ConfigError, CorruptInput

PACKAGE = Path(__file__).resolve().parents[1] / "agriland_scale"


def test_yaml_tags_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nsearch: {{collections: [x]}}\n")
    with pytest.raises(ConfigError, match="evil.yaml is not valid YAML"):
        load_config(p)
    assert not marker.exists()


def test_keras_models_load_in_safe_mode(tmp_path):
    """A .keras file with a Lambda layer (arbitrary Python) is refused, not run."""
    import keras

    from agriland_scale.models.worker import get_model

    marker = tmp_path / "pwned"
    inp = keras.Input((4,))
    out = keras.layers.Lambda(lambda x: x * 2)(inp)
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(CorruptInput, match=r"lambda\.keras.*(safe_mode|Lambda|lambda)"):
        get_model(path)
    assert not marker.exists()


def test_no_shell_strings_in_the_package():
    """No subprocess with shell=True, no os.system / os.popen, no eval / exec anywhere."""
    bad = []
    for f in PACKAGE.rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in ("system", "popen", "eval", "exec"):
                    bad.append(f"{f.name}:{node.lineno} {name}()")
                for kw in node.keywords:
                    if kw.arg == "shell" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is False
                    ):
                        bad.append(f"{f.name}:{node.lineno} shell=")
    assert not bad, bad


def _listening(proc) -> set[tuple[str, int]]:
    """The (address, port) pairs that ``proc`` and its descendants listen on (TCP)."""
    import psutil

    found = set()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            found |= {
                (c.laddr.ip, c.laddr.port)
                for c in p.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            }
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_local_run_listens_on_loopback_only(tmp_path):
    """Every socket a local run's process tree listens on (scheduler, dashboard, worker
    processes, the worker inside the agriland process that computes the cube) is bound to
    loopback, sampled every 0.2 s through a real run's search and cube stages."""
    import ipaddress
    import subprocess
    import sys
    import time

    import psutil

    from .conftest import DEMO_YAML

    # what `agriland run` does up to the cube: its LocalCluster, launched importing TensorFlow,
    # taken over by the run, whose cube a worker inside the process computes meanwhile
    script = (
        "import sys\n"
        "from agriland_scale import load_config\n"
        "from agriland_scale.pipeline.launch import ClusterLaunch\n"
        "from agriland_scale.pipeline.runner import run\n"
        "cfg = load_config(sys.argv[1], **{'runtime.dashboard_address': '127.0.0.1:0'})\n"
        "launch = ClusterLaunch(cfg.runtime, import_tensorflow=True)  # as for a run with models\n"
        "try:\n"
        "    rec = run(cfg, sys.argv[2], until='cube', launch=launch)\n"
        "finally:\n"
        "    launch.close()\n"
        "assert rec['cube_computed_by'].startswith('agriland-main-process'), rec['cube_computed_by']\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(DEMO_YAML), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[tuple[str, int]] = set()
    watched = psutil.Process(proc.pid)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _listening(watched)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len({port for _, port in seen}) >= 3, seen  # the scheduler, its dashboard, workers
    exposed = sorted((ip, port) for ip, port in seen if not ipaddress.ip_address(ip).is_loopback)
    assert not exposed, f"listening beyond loopback: {exposed}"
