"""Small runs against the script a user would otherwise write (issue 16, goal 1).

On the whole real Sentinel-2 L1C Virginia sample (1933 x 1947 px at 10 m, one date), with the
same trained models (the demo's CAE encoder and U-Net, trained once here with a short
schedule, or given with ``--models DIR``), the two are run alternately as separate processes
(each pays its own Python, TensorFlow and data start-up):

- **the naive script** (:func:`naive`, run as ``python bench/bench_naive.py --naive ...``):
  rasterio window reads of each 256 px patch from the band COGs, reflectance as the item
  says, one ``encoder.predict`` call per patch, k-means (scikit-learn) on the embeddings, one
  ``unet.predict`` call per 256 px window (a tiling: no overlap, the edges that do not fill a
  window left out, seams at window borders), a GeoTIFF of the probability;
- **agriland run** with ``embed.model``/``segment.model`` set (no training),
  ``patches.stride: 256`` and the default ``segment.overlap`` (64 px: a seamless mosaic of the
  whole scene), once more with ``segment.overlap: 0``, and once with
  ``runtime.inference_precision: float32`` (the default ``auto`` computes the predictions in
  bfloat16 on CPUs that have it natively, as this machine's does), and once with
  ``runtime.engine: tensorflow`` (the default ``auto`` predicts in ONNX Runtime / OpenVINO
  where the models' ONNX artifacts are at hand: they are exported once before the rounds, as
  a training-only run leaves them, and that export is reported apart as a fixed cost);
- the same run at overlap 64 given ``--scheduler`` of an ``agriland cluster`` started once
  before the rounds (its workers keep TensorFlow and the loaded models between runs, as
  when a user maps several small regions in a row). The cluster's start-up is reported
  apart, as a fixed cost; it idles (heartbeats only) while the other runs go.

Prints wall times (median of the rounds), the ratio naive / agriland (goal >= 1.5 at the
default overlap), agriland's stage breakdown from ``run.json`` and the time not spent in
model compute. Needs ``../shared/data/s2-l1c-virginia``. Run:

    nice -n 5 python bench/bench_naive.py [--rounds 2] [--models DIR] [--json bench/results/naive.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_run import SHARED, catalog, pipeline, region_bbox  # noqa: E402

BANDS = ["red", "green", "blue"]  # the demo models' bands
FILES = {"red": "B04.tif", "green": "B03.tif", "blue": "B02.tif"}
ON_CLUSTER = "agriland (overlap 64, on `agriland cluster`)"


def naive(models: Path, out: Path, k: int, seed: int) -> dict:
    """The script: read, embed, cluster, segment, write; returns its own timings (s)."""
    t_start = time.perf_counter()
    import keras
    import numpy as np
    import rasterio
    from rasterio.windows import Window
    from sklearn.cluster import KMeans

    t = {"imports": time.perf_counter() - t_start}
    item = json.loads((SHARED / "item.json").read_text())
    # L1C DN -> reflectance: (DN + offset) / 10000, offset -1000 from processing baseline 04.00 on
    offset = -1000 if float(item["properties"].get("s2:processing_baseline") or 0) >= 4 else 0
    t0 = time.perf_counter()
    encoder = keras.saving.load_model(models / "encoder.keras", compile=False)
    unet = keras.saving.load_model(models / "unet.keras", compile=False)

    def rmax(sidecar: str) -> np.ndarray:  # one number, or one a band (per-band normalisation)
        v = json.loads((models / sidecar).read_text())["normalisation"]["reflectance_max"]
        return np.asarray([v[b] for b in BANDS] if isinstance(v, dict) else v, dtype="float32")

    rmax_e, rmax_u = rmax("encoder.keras.json"), rmax("unet.keras.json")
    t["load_models"] = time.perf_counter() - t0
    srcs = [rasterio.open(SHARED / FILES[b]) for b in BANDS]
    h, w = srcs[0].height, srcs[0].width
    size = 256

    def read(r: int, c: int) -> np.ndarray:
        win = Window(c, r, size, size)
        x = np.stack([s.read(1, window=win).astype("float32") for s in srcs], -1)
        return (x + offset) / 10000.0

    t0 = time.perf_counter()
    t_read = 0.0
    embs, cells = [], []
    for r in range(0, h - size + 1, size):
        for c in range(0, w - size + 1, size):
            tr = time.perf_counter()
            x = read(r, c)
            t_read += time.perf_counter() - tr
            x = np.clip(x / rmax_e, 0, 1)[None]
            embs.append(encoder.predict(x, verbose=0)[0])
            cells.append((r, c))
    t["embeddings"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.stack(embs))
    t["kmeans"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prob = np.full((h, w), np.nan, dtype="float32")
    for r, c in cells:
        tr = time.perf_counter()
        x = read(r, c)
        t_read += time.perf_counter() - tr
        x = np.clip(x / rmax_u, 0, 1)[None]
        prob[r : r + size, c : c + size] = unet.predict(x, verbose=0)[0, ..., 0]
    t["segmentation"] = time.perf_counter() - t0
    t["reads"] = t_read
    t0 = time.perf_counter()
    profile = dict(
        driver="GTiff",
        height=h,
        width=w,
        count=1,
        dtype="float32",
        crs=srcs[0].crs,
        transform=srcs[0].transform,
        nodata=float("nan"),
        compress="deflate",
        tiled=True,
    )
    with rasterio.open(out / "probability.tif", "w", **profile) as dst:
        dst.write(prob, 1)
    t["write"] = time.perf_counter() - t0
    t["patches"] = len(cells)
    t["clusters"] = int(len(set(labels.tolist())))
    t["total_in_process"] = time.perf_counter() - t_start
    return t


def batched_predict(models: Path) -> dict:
    """Plain batched ``predict`` of the scene's 256 px patches with both models, warm (s).

    What the embeddings stage is compared with: the same patches, already in memory, in one
    ``predict`` call of batch 16 (the second of two calls: no model load, no first trace);
    also in bfloat16 (``*_bf16_s``, the copy agriland predicts with) where the CPU has it.
    """
    import keras
    import numpy as np
    import rasterio

    srcs = [rasterio.open(SHARED / FILES[b]) for b in BANDS]
    img = np.stack([s.read(1).astype("float32") for s in srcs], -1) / 10000.0
    h, w = img.shape[:2]
    x = np.stack(
        [img[r : r + 256, c : c + 256] for r in range(0, h - 255, 256) for c in range(0, w - 255, 256)]
    )
    from agriland_scale.models.worker import cpu_has_bfloat16, with_precision

    out = {"patches": len(x)}
    for name, batch in (("encoder", 16), ("unet", 8)):
        model = keras.saving.load_model(models / f"{name}.keras", compile=False)
        variants = [("", model)] + (
            [("_bf16", with_precision(model, "mixed_bfloat16"))] if cpu_has_bfloat16() else []
        )
        for sfx, m in variants:
            m.predict(x[:batch], batch_size=batch, verbose=0)
            t0 = time.perf_counter()
            m.predict(x, batch_size=batch, verbose=0)
            out[f"{name}{sfx}_s"] = round(time.perf_counter() - t0, 2)
    return out


def _predicted(rec: dict) -> int:
    """Pixels the U-Net predicted in a run (its inference window and grid on the cube)."""
    from agriland_scale.models.files import read_sidecar
    from agriland_scale.models.segment import _predicted_pixels, choose_inference_window

    s, (h, w) = rec["config"]["segment"], (rec["cube"]["shape"]["y"], rec["cube"]["shape"]["x"])
    size = choose_inference_window(
        s["inference_window"], s["window"], s["overlap"], h, w, read_sidecar(s["model"]).get("encoder")
    )
    return _predicted_pixels(size, s["overlap"], h, w)


def _wall(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return wall, p.stdout


def _start_cluster(agri: str, pipe: Path) -> tuple[subprocess.Popen, str, float]:
    """Start ``agriland cluster PIPE`` on a free port; return it, its address and the seconds
    until its workers were ready (TensorFlow imported, the pipeline's models loaded)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [agri, "cluster", str(pipe), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    atexit.register(lambda: proc.poll() is None and (proc.send_signal(signal.SIGTERM), proc.wait(120)))
    first, ready = proc.stdout.readline(), proc.stdout.readline()
    if "workers ready" not in ready:
        proc.kill()
        raise RuntimeError(f"agriland cluster did not start: {first!r} {ready!r}")
    return proc, first.split(" at ")[1].split(",")[0], time.perf_counter() - t0


def train_models(tmp: Path, cat: Path) -> Path:
    """The demo's models, trained once with the bench_run schedule on the demo window."""
    pipe = pipeline(tmp, cat, region_bbox(1024), "naive-train")
    out = tmp / "train"
    _wall([str(Path(sys.executable).parent / "agriland"), "run", str(pipe), "--out", str(out), "--quiet"])
    return out / "models"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", type=Path, help="folder with encoder.keras and unet.keras (+ .json)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--naive", type=Path, help=argparse.SUPPRESS)  # internal: run the script into DIR
    ap.add_argument("--batched", action="store_true", help=argparse.SUPPRESS)  # internal: batched predict
    args = ap.parse_args()
    if args.naive:
        print(json.dumps(naive(args.models, args.naive, k=6, seed=42)))
        return
    if args.batched:
        print(json.dumps(batched_predict(args.models)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-naive-"))
    cat = catalog(tmp)
    models = args.models or train_models(tmp, cat)
    bbox = region_bbox(None)
    given = {
        "embed.model": str(models / "encoder.keras"),
        "segment.model": str(models / "unet.keras"),
        "patches.stride": 256,
    }
    pipes = {
        "agriland (overlap 64)": pipeline(tmp, cat, bbox, "naive-a64", **given),
        "agriland (overlap 0)": pipeline(tmp, cat, bbox, "naive-a0", **given, **{"segment.overlap": 0}),
        "agriland (overlap 64, float32)": pipeline(
            tmp, cat, bbox, "naive-a64-f32", **given, **{"runtime.inference_precision": "float32"}
        ),
        # before runtime.engine: auto, every run predicted in TensorFlow
        "agriland (overlap 64, TensorFlow)": pipeline(
            tmp, cat, bbox, "naive-a64-tf", **given, **{"runtime.engine": "tensorflow"}
        ),
    }
    # the models' ONNX artifacts, as a training-only run (train-cae / train-unet) leaves them
    # beside the models: exported once here into the machine's cache, a fixed cost reported apart
    t0 = time.perf_counter()
    # (the U-Net also at the 1024 px windows segment.inference_window: auto takes on this scene)
    for name, size in (("encoder.keras", None), ("unet.keras", None), ("unet.keras", 1024)):
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from agriland_scale.models.engines import ensure_onnx; ensure_onnx({str(models / name)!r}, {size})",
            ],
            check=True,
        )
    export_s = time.perf_counter() - t0
    agri = str(Path(sys.executable).parent / "agriland")
    # the same run as "agriland (overlap 64)", given the address of an `agriland cluster`
    # started once before the rounds (its start-up is reported apart, as a fixed cost)
    pipes[ON_CLUSTER] = pipes["agriland (overlap 64)"]
    cluster, address, cluster_start_s = _start_cluster(agri, pipes[ON_CLUSTER])
    walls: dict[str, list[float]] = {"naive script": [], **{k: [] for k in pipes}}
    inner: list[dict] = []
    breakdown: dict[str, list[dict]] = {k: [] for k in pipes}
    predicted: dict[str, int] = {}  # pixels the U-Net predicts in each agriland run
    precision: dict[str, dict[str, str]] = {}  # each agriland run's precision, by model stage
    engines_used: dict[str, dict[str, str]] = {}  # and its engine (runtime.engine: auto by default)
    for r in range(args.rounds):
        out = tmp / f"naive-{r}"
        out.mkdir()
        wall, stdout = _wall([sys.executable, __file__, "--naive", str(out), "--models", str(models)])
        walls["naive script"].append(wall)
        inner.append(json.loads(stdout.strip().splitlines()[-1]))
        for name, pipe in pipes.items():
            run_out = tmp / f"{pipe.stem}{'-cluster' if name == ON_CLUSTER else ''}-{r}"
            wall, _ = _wall(
                [
                    agri,
                    "run",
                    str(pipe),
                    "--out",
                    str(run_out),
                    "--quiet",
                    *(["--scheduler", address] if name == ON_CLUSTER else []),
                ]
            )
            walls[name].append(wall)
            rec = json.loads((run_out / "run.json").read_text())
            breakdown[name].append({k: round(v, 2) for k, v in rec["timings_s"].items()})
            predicted[name] = _predicted(rec)
            precision[name] = rec.get("precision") or {}
            engines_used[name] = {k: v.get("engine") for k, v in (rec.get("engines") or {}).items()}
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)
    cluster.send_signal(signal.SIGTERM)
    cluster.communicate(timeout=120)
    _, stdout = _wall([sys.executable, __file__, "--batched", "--models", str(models)])
    batched = json.loads(stdout.strip().splitlines()[-1])
    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "wall_s": walls,
        "median_wall_s": med,
        "ratio_naive_over_agriland": {k: round(med["naive script"] / med[k], 2) for k in pipes},
        "naive_inner_s": inner,
        "agriland_stage_s": breakdown,
        "batched_predict_s": batched,
    }
    result["precision"] = precision
    result["agriland_cluster_start_s"] = round(cluster_start_s, 1)
    result["onnx_export_once_s"] = round(export_s, 1)
    result["engines"] = engines_used
    # the embeddings stage against a batched predict in the same precision
    emb = statistics.median(r["embeddings"] for r in breakdown["agriland (overlap 64, float32)"])
    result["embeddings_stage_vs_batched_predict"] = round(batched["encoder_s"] / emb, 2)
    # model compute = what a warm, batched predict of the same work costs in the run's
    # precision; the rest of the wall time is fixed cost (start-up, imports, model loads, cube,
    # publish, report, ...)
    sfx = {"float32": "", "mixed_bfloat16": "_bf16"}

    def measured(model: str, k: str, stage: str) -> float:
        return batched[f"{model}{sfx[precision[k].get(stage, 'float32')]}_s"]

    compute = {
        "naive script": batched["encoder_s"] + batched["unet_s"],
        **{
            k: measured("encoder", k, "embeddings")
            + measured("unet", k, "segmentation") * predicted[k] / (batched["patches"] * 256 * 256)
            for k in pipes
        },
    }
    result["model_compute_s"] = {k: round(v, 1) for k, v in compute.items()}
    result["not_model_compute_s"] = {k: round(med[k] - compute[k], 1) for k in compute}
    result["unet_predicted_px"] = predicted
    print("\nwhole process, median wall (s):")
    for k, v in med.items():
        print(f"  {k:<24} {v:7.1f}")
    for k, v in result["ratio_naive_over_agriland"].items():
        print(f"ratio naive / {k}: {v:.2f}  (goal >= 1.5 at the default overlap)")
    print(
        f"starting `agriland cluster` (once, before the rounds; workers with TensorFlow and both "
        f"models loaded): {cluster_start_s:.1f} s"
    )
    print(
        f"exporting both models to ONNX (once, before the rounds; what train-cae/train-unet do): {export_s:.1f} s"
    )
    print("engines of the agriland runs:", engines_used)
    print("\nnaive script, in-process (s):", {k: round(v, 2) for k, v in inner[-1].items()})
    print(
        f"batched predict of the {batched['patches']} patches: encoder {batched['encoder_s']} s, U-Net "
        f"{batched['unet_s']} s (bfloat16: {batched.get('encoder_bf16_s')} s, {batched.get('unet_bf16_s')} s); "
        f"embeddings stage (float32) / batched predict (float32): "
        f"{result['embeddings_stage_vs_batched_predict']} (goal >= 0.7)"
    )
    print("prediction precision of the agriland runs:", precision)
    for k, rows in breakdown.items():
        print(f"{k}, stages (s, last round):", rows[-1])
    print("\nmodel compute (a warm batched predict of the same patches and U-Net pixels) and the rest:")
    for k in compute:
        print(
            f"  {k:<24} model compute {compute[k]:5.1f} s, everything else {med[k] - compute[k]:5.1f} s "
            f"(budget for agriland: <= 10 s)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
