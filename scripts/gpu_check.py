"""Check the GPU path on a machine with an NVIDIA GPU (``pip install -e ".[gpu,test]"``).

What it checks, printing one line each and exiting 1 at the first failure:

1. TensorFlow sees a GPU (``tf.config.list_physical_devices("GPU")``);
2. ``runtime.engine: auto`` chooses TensorFlow for GPU workers, whatever the precision
   (:func:`agriland_scale.models.engines.choose_engine` with ``gpu=True``);
3. a plain U-Net and a CAE encoder (random weights, seed 0) predict the same on the GPU as on
   the CPU (max |d| <= 1e-3 in float32; the mask at 0.5 equal on >= 99.9 % of pixels), and
   the GPU's images/s against the CPU's, batch 16;
4. with ``--run``: the demo pipeline (short schedules) on a LocalCluster whose worker
   advertises ``GPU=1`` (``dask worker --resources GPU=1`` on a real cluster): the model
   stages ask for the GPU, and ``run.json`` records ``gpu: true`` and the engines used.

Run: ``python scripts/gpu_check.py [--run] [--out DIR]`` (a few minutes with ``--run``).
No network is needed (weights: none).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", flush=True)
    raise SystemExit(1)


def ok(msg: str) -> None:
    print(f"ok: {msg}", flush=True)


def rate(fn, x: np.ndarray, reps: int = 3) -> float:
    """Images a second of ``fn`` on batch ``x`` (best of ``reps`` after one warm-up call)."""
    fn(x)
    best = min(_timed(fn, x) for _ in range(reps))
    return len(x) / best


def _timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="also run the demo pipeline on a GPU worker")
    ap.add_argument("--out", type=Path, help="where the demo run goes (default: a temporary folder)")
    a = ap.parse_args()

    from agriland_scale.models.worker import configure_tensorflow

    configure_tensorflow()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        fail("TensorFlow sees no GPU: install the [gpu] extra (tensorflow[and-cuda]) and check nvidia-smi")
    ok(f"TensorFlow {tf.__version__} sees {len(gpus)} GPU(s): {[g.name for g in gpus]}")

    from agriland_scale.models.engines import choose_engine

    for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
        for task in ("embedding", "segmentation"):
            got = choose_engine("auto", task, precision, gpu=True)
            if got != "tensorflow":
                fail(f"auto chose {got} for {task} in {precision} on GPU workers")
    ok("runtime.engine auto -> tensorflow on GPU workers (every precision)")

    import keras

    from agriland_scale.models.encoder import build_cae, encoder_from_cae
    from agriland_scale.models.unet import build_unet

    keras.utils.set_random_seed(0)
    size = 256
    x = np.random.default_rng(0).random((16, size, size, 3), dtype="float32")
    models = {
        "unet_plain": build_unet("plain", size, 3, weights="none"),
        "encoder": encoder_from_cae(build_cae(size, 3, head="gap", weights="none")),
    }
    for name, model in models.items():
        with tf.device("/CPU:0"):
            ref = np.asarray(model(x, training=False))
            cpu = rate(lambda b: model(b, training=False), x)
        with tf.device("/GPU:0"):
            got = np.asarray(model(x, training=False))
            gpu = rate(lambda b: model(b, training=False), x)
        d = float(np.abs(got - ref).max())
        if d > 1e-3:
            fail(f"{name}: GPU output differs from CPU by {d:.2e} (> 1e-3)")
        if name.startswith("unet") and ((got >= 0.5) == (ref >= 0.5)).mean() < 0.999:
            fail(f"{name}: masks differ on more than 0.1 % of pixels")
        ok(
            f"{name}: GPU equals CPU (max |d| {d:.1e}); batch 16: GPU {gpu:.1f} img/s, CPU {cpu:.1f} img/s ({gpu / cpu:.1f}x)"
        )

    if a.run:
        from agriland_scale import load_config
        from agriland_scale.pipeline.runner import run

        sys.path.insert(0, str(REPO))
        from distributed import Client, LocalCluster

        from tests.conftest import FAST

        out = a.out or Path(tempfile.mkdtemp(prefix="gpu-check-")) / "run"
        cfg = load_config(REPO / "pipelines" / "demo.yaml").with_overrides(**FAST)
        with LocalCluster(
            n_workers=1, threads_per_worker=2, resources={"GPU": 1}, dashboard_address=":0"
        ) as cl:
            with Client(cl):
                t0 = time.perf_counter()
                run(cfg, out, scheduler=cl.scheduler_address, report=lambda *m: None)
                wall = time.perf_counter() - t0
        rec = json.loads((out / "run.json").read_text())
        if not rec.get("gpu"):
            fail(f"the run did not use the GPU resource (run.json gpu: {rec.get('gpu')})")
        ok(
            f"demo run on a GPU worker in {wall:.0f} s: gpu {rec['gpu']}, engines {rec.get('engines')}, "
            f"precision {rec.get('precision')}; products in {out}"
        )
    print("GPU path: all checks passed", flush=True)


if __name__ == "__main__":
    main()
