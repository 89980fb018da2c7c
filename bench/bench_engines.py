"""Benchmark: inference engines for the encoder and the U-Nets, against TensorFlow float32.

For each model (the CAE encoder, the plain U-Net, optionally the ResNet-50 U-Net) and each
engine, a child process of its own (so that load time, first call and peak RSS are that
engine's alone) imports the engine, loads the model, predicts a first batch of 1 and predicts
49 fixed patches of the demo's scene (``agriland_scale/data/virginia``: red, green, blue,
reflectance / 0.3, 256 px at stride 128) for the comparison. Then one process holding every engine times batches of 1, 4,
16, 64 of those patches, engine after engine, ``--reps`` rounds (best kept): on a shared machine
the engines see the same load. Engines:

* ``tf32``: TensorFlow float32, the worker's own :func:`~agriland_scale.models.worker.predict`;
* ``tfbf16``: the same on the ``mixed_bfloat16`` copy ``runtime.inference_precision`` uses
  (:func:`~agriland_scale.models.worker.with_precision`);
* ``ort``: ONNX Runtime 1.x (CPUExecutionProvider) on the Keras 3 ONNX export
  (:func:`~agriland_scale.models.onnx_export.export_onnx`), float32, as the ``onnx`` engine runs it
  (:class:`~agriland_scale.models.engines.OnnxModel`: its threads do not spin between calls);
  ``ortspin``: the same with ONNX Runtime's default spinning threads;
* ``ov32`` / ``ovbf16``: OpenVINO on the same ONNX file, inference precision hint f32 / bf16
  (when ``openvino`` is installed).

Prints, per model and engine: import + load time, first call, images/s per batch size and its
ratio to ``tf32`` (measured in this run), peak RSS, max |d| of the outputs against ``tf32`` and,
for U-Nets, the share of pixels on the same side of 0.5. Speed does not depend on the weights:
without ``--models`` the models are built from the demo config with random weights (seed 42).

Run: ``python bench/bench_engines.py [--models DIR] [--resnet] [--batches 1,4,16,64] [--json FILE]``
(``--work DIR`` keeps the models and exports for a rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("tf32", "tfbf16", "ort", "ortspin", "ov32", "ovbf16")


def demo_patches(size: int = 256, stride: int = 128, rmax: float = 0.3) -> np.ndarray:
    """The demo scene's patches ``(49, 256, 256, 3)``: red, green, blue / ``rmax``, clipped to [0, 1]."""
    import rasterio

    from agriland_scale.patches import normalise

    d = ROOT / "agriland_scale" / "data" / "virginia"
    img = []
    for band in ("B04", "B03", "B02"):
        with rasterio.open(d / f"{band}.tif") as src:
            img.append(src.read(1).astype("float32") / 10000.0)
    x = normalise(np.stack(img, -1), rmax)
    starts = range(0, x.shape[0] - size + 1, stride)
    return np.stack([x[r : r + size, c : c + size] for r in starts for c in starts]).astype("float32")


def build_models(out: Path, resnet: bool) -> dict[str, Path]:
    """The demo config's encoder and U-Net(s), random weights at seed 42, saved in ``out``."""
    import keras

    from agriland_scale import load_config
    from agriland_scale.models.encoder import build_cae, encoder_from_cae
    from agriland_scale.models.unet import build_unet

    cfg = load_config(ROOT / "agriland_scale" / "data" / "demo.yaml")
    keras.utils.set_random_seed(42)
    e, s = cfg.embed, cfg.segment
    found = {}
    enc = encoder_from_cae(
        build_cae(cfg.patches.size, len(e.bands), head=e.head, weights="none", embedding_dim=e.embedding_dim)
    )
    found["encoder"] = out / "encoder.keras"
    enc.save(found["encoder"])
    variants = ["plain"] + (["resnet50"] if resnet else [])
    for v in variants:
        found[f"unet_{v}"] = out / f"unet_{v}.keras"
        build_unet(v, s.window, len(s.bands), weights="none").save(found[f"unet_{v}"])
    return found


def _runner(engine: str, model: str, onnx: str):
    """Import ``engine``, load ``model`` in it; return its predict function, import and load seconds."""
    t0 = time.perf_counter()
    if engine.startswith("tf"):
        from agriland_scale.models import worker

        worker.configure_tensorflow()
        t_import = time.perf_counter() - t0
        m, _ = worker.get_model(model, "mixed_bfloat16" if engine == "tfbf16" else "float32")

        def run(b):
            return worker.predict(m, b)
    elif engine in ("ort", "ortspin"):
        from agriland_scale.models.engines import OnnxModel

        t_import = time.perf_counter() - t0
        run = OnnxModel(onnx, spinning=engine == "ortspin").predict
    else:
        import openvino as ov

        t_import = time.perf_counter() - t0
        hint = "bf16" if engine == "ovbf16" else "f32"
        cm = ov.Core().compile_model(
            onnx,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": os.cpu_count(),
            },
        )
        req = cm.create_infer_request()

        def run(b):
            return req.infer({0: b})[cm.output(0)].copy()

    return run, t_import, time.perf_counter() - t0 - t_import


def child(engine: str, model: str, onnx: str, batches: list[int], reps: int, out: str) -> None:
    """Measure one engine on one model in this (fresh) process; write the results to ``out``.

    ``engine`` ``all`` (a comma-separated list after it): images/s of each of them, loaded side
    by side in this process, alternating engines call by call (``reps`` rounds, best kept), so
    that a busy machine slows them alike.
    """
    x = np.load(os.environ["BENCH_PATCHES"])
    if engine.startswith("all:"):
        runs = {e: _runner(e, model, onnx)[0] for e in engine[4:].split(",")}
        speed: dict = {e: {} for e in runs}
        for n in batches:
            b = x[np.arange(n) % len(x)]
            for run in runs.values():
                run(b)  # a first call at this size (shape-specialised engines compile here)
            for _ in range(reps):
                for e, run in runs.items():
                    speed[e][n] = max(speed[e].get(n, 0.0), n / _timed(run, b))
        Path(out).write_text(json.dumps(speed))
        return
    run, t_import, t_load = _runner(engine, model, onnx)
    t1 = time.perf_counter()
    run(x[:1])
    first = time.perf_counter() - t1
    outputs = np.concatenate([run(x[s : s + 16]) for s in range(0, len(x), 16)]).astype("float32")
    np.save(out + ".npy", outputs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(
        json.dumps({"import_s": t_import, "load_s": t_load, "first_s": first, "rss_mb": rss})
    )


def _timed(run, b) -> float:
    t = time.perf_counter()
    run(b)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, help="a run's models/ folder (encoder.keras, unet.keras)")
    ap.add_argument("--resnet", action="store_true", help="also the ResNet-50 U-Net (random weights)")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=3, help="alternating rounds per batch size (best kept)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--work", type=Path, help="working folder; an earlier run's models and exports are reused"
    )
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        engine, model, onnx, out, reps = args.child
        child(engine, model, onnx, batches, int(reps), out)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "patches.npy", demo_patches())
    # models, and their ONNX exports, in a child: this process stays free of TensorFlow
    code = (
        "import sys, json; sys.path.insert(0, %r); from bench_engines import build_models, Path; "
        "print(json.dumps({k: str(v) for k, v in build_models(Path(%r), %r).items()}))"
    ) % (str(Path(__file__).parent), str(work), args.resnet)
    if args.work and (work / "encoder.keras").is_file():  # models (and exports) of an earlier run
        built = {p.stem: str(p) for p in sorted(work.glob("*.keras"))}
        built = {k: v for k, v in built.items() if k == "encoder" or k == "unet_plain" or args.resnet}
    else:
        built = json.loads(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        )
    trained = set()
    if args.models:
        for name, file in (("encoder", "encoder.keras"), ("unet_plain", "unet.keras")):
            if (args.models / file).is_file():
                built[name] = str(args.models / file)
                trained.add(name)
    engines = [e for e in args.engines.split(",") if e in ENGINES]
    try:
        import openvino  # noqa: F401
    except ImportError:
        engines = [e for e in engines if not e.startswith("ov")]
    env = dict(os.environ, BENCH_PATCHES=str(work / "patches.npy"), TF_CPP_MIN_LOG_LEVEL="3")
    results: dict = {"machine": _machine(), "batches": batches, "models": {}}
    for name, path in built.items():
        onnx = work / f"{name}.onnx"
        t, export_s = time.perf_counter(), None
        if not (args.work and onnx.is_file() and onnx.stat().st_mtime > Path(path).stat().st_mtime):
            subprocess.run(
                [sys.executable, "-m", "agriland_scale.models.engines", path, str(onnx)],
                env=env,
                check=True,
                capture_output=True,
            )
            export_s = time.perf_counter() - t
        rows = {}
        for engine in engines:
            out = str(work / f"{name}-{engine}")
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    engine,
                    path,
                    str(onnx),
                    out,
                    str(args.reps),
                    "--batches",
                    args.batches,
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                rows[engine] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
                continue
            rows[engine] = json.loads(Path(out).read_text())
            rows[engine]["outputs"] = out + ".npy"
        ok = [e for e in engines if "error" not in rows[e]]
        out = str(work / f"{name}-alternating")
        r = subprocess.run(
            [sys.executable, __file__, "--child", "all:" + ",".join(ok), path, str(onnx), out, str(args.reps)]
            + ["--batches", args.batches],
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            print(r.stderr[-2000:])
        speed = json.loads(Path(out).read_text()) if r.returncode == 0 else {}
        for e in ok:
            rows[e]["ips"] = speed.get(e, {})
        ref = np.load(rows["tf32"]["outputs"]) if "outputs" in rows.get("tf32", {}) else None
        for engine, row in rows.items():
            if ref is None or "outputs" not in row:
                continue
            y = np.load(row.pop("outputs"))
            row["max_abs_diff"] = float(np.abs(y - ref).max())
            if name.startswith("unet"):
                row["mask_agreement"] = float(((y >= 0.5) == (ref >= 0.5)).mean())
        results["models"][name] = {
            "file": path,
            "weights": "trained" if name in trained else "random (seed 42)",
            "onnx_export_s": export_s,
            "onnx_mb": onnx.stat().st_size / 2**20,
            "engines": rows,
        }
        _print(name, results["models"][name], batches)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _machine() -> dict:
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    vers = {}
    for mod in ("tensorflow", "keras", "onnxruntime", "openvino", "tf2onnx"):
        try:
            from importlib.metadata import version

            vers[mod] = version(mod if mod != "tensorflow" else "tensorflow-cpu")
        except Exception:  # noqa: BLE001
            vers[mod] = None
    return {
        "cpus": os.cpu_count(),
        "bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "loadavg_start": os.getloadavg()[0],
        "versions": vers,
    }


def _print(name: str, m: dict, batches: list[int]) -> None:
    print(
        f"\n{name} ({m['weights']}; ONNX export {m['onnx_export_s'] or float('nan'):.0f} s, "
        f"{m['onnx_mb']:.0f} MB)  "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    head = f"{'engine':8} {'import':>6} {'load':>6} {'first':>6} " + " ".join(
        f"{'b' + str(b) + ' img/s':>14}" for b in batches
    )
    print(head + f" {'RSS MB':>7} {'max|d|':>8} {'mask=':>8}")
    ref = m["engines"].get("tf32", {}).get("ips", {})
    for engine, r in m["engines"].items():
        if "error" in r:
            print(f"{engine:8} failed: {r['error']}")
            continue
        cells = []
        for b in batches:
            v = r["ips"].get(str(b), r["ips"].get(b))
            base = ref.get(str(b), ref.get(b)) if ref else None
            cells.append("-" if v is None else f"{v:7.2f} ({v / base:4.2f}x)" if base else f"{v:14.2f}")
        agree = f"{100 * r['mask_agreement']:7.3f}%" if "mask_agreement" in r else f"{'':>8}"
        print(
            f"{engine:8} {r['import_s']:6.2f} {r['load_s']:6.2f} {r['first_s']:6.2f} "
            + " ".join(f"{c:>14}" for c in cells)
            + f" {r['rss_mb']:7.0f} {r.get('max_abs_diff', float('nan')):8.1e} {agree}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
