"""Benchmark: region inference (``segment_region``) against a plain ``model.predict``.

Prints, from one run on this machine:

- throughput (pixels/s) of ``segment_region`` computed on a dask.distributed LocalCluster
  (1 worker process x 2 threads, the runtime default) and written to a Zarr store
  (probability as uint8 with scale, and mask), against ``model.predict`` on the same windows
  (window 256, overlap 64, the same global grid, batch size 8) already stacked in memory in
  this process with the same number of TensorFlow threads (ratio; goal >= 0.9);
- peak RSS of the worker process for a region and a region 4x larger, each on a fresh
  cluster (ratio).

Data: the demo cube (1024 x 1024 px of the embedded real Sentinel-2 window, built from the
demo config through the local STAC API, as ``tests/conftest.py`` does). The 4x region
(2048 x 2048 px) is that cube mirrored 2 x 2 (the same real pixels, reflected, on an extended
grid). Model: the real plain U-Net architecture (32-64-128-256-512) at 256 px, 3 bands, with
seeded random weights: inference cost does not depend on the weights' values. Run:

    nice -n 5 python bench/bench_segment.py [--repeat 2] [--json bench/results/segment.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
THREADS = 2


def build_cubes(tmp: Path) -> tuple[str, str]:
    """The demo cube (1x) and its 2 x 2 mirror (4x), each as group ``cube`` of a Zarr store."""
    import dask
    import numpy as np
    import xarray as xr

    from agriland_scale import load_config
    from agriland_scale.cube.load import load_cube
    from agriland_scale.search.stac import local_stac_api, search_items
    from agriland_scale.store import open_cube, write_georef, write_group

    cfg = load_config(REPO / "agriland_scale" / "data" / "demo.yaml")
    with local_stac_api(cfg.search.catalog) as url:
        items = search_items(cfg.search, url)
    small, large = str(tmp / "region.zarr"), str(tmp / "region_4x.zarr")
    with dask.config.set(scheduler="synchronous"):
        write_group(load_cube(items, cfg.cube, cfg.search.bbox), small, "cube")
    cube = open_cube(small).load()
    t = cube.rio.transform()

    def mirror(a: np.ndarray) -> np.ndarray:
        top = np.concatenate([a, a[..., ::-1]], axis=-1)
        return np.concatenate([top, top[..., ::-1, :]], axis=-2)

    h, w = cube.sizes["y"], cube.sizes["x"]
    ys = t.f + t.e * (np.arange(2 * h) + 0.5)
    xs = t.c + t.a * (np.arange(2 * w) + 0.5)
    big = xr.Dataset(
        {
            "reflectance": (("band", "y", "x"), mirror(cube["reflectance"].values)),
            "clear_count": (("y", "x"), mirror(cube["clear_count"].values)),
        },
        coords={"band": [str(b) for b in cube.band.values], "y": ys, "x": xs},
        attrs=cube.attrs,
    )
    big = write_georef(big, cube.rio.crs).chunk({"band": -1, "y": cfg.cube.chunk, "x": cfg.cube.chunk})
    write_group(big, large, "cube")
    return small, large


def save_model(path: Path, bands: list[str], window: int, reflectance_max: float) -> None:
    import keras

    from agriland_scale.models.files import write_sidecar
    from agriland_scale.models.unet import build_unet

    keras.utils.set_random_seed(0)
    build_unet("plain", window, len(bands), weights="none").save(path)
    write_sidecar(
        path,
        {
            "model": "unet_plain",
            "task": "segmentation",
            "encoder": "plain",
            "bands": bands,
            "patch_size": window,
            "initial_weights": "none (random, seed 0)",
            "normalisation": {
                "type": "reflectance / reflectance_max, clipped to [0, 1]",
                "reflectance_max": reflectance_max,
            },
        },
    )


def stacked_windows(store: str, bands: list[str], window: int, overlap: int, rmax: float):
    """Every window of the global grid ``segment_region`` uses, as one in-memory batch."""
    import numpy as np

    from agriland_scale.patches import window_starts
    from agriland_scale.store import open_cube

    cube = open_cube(store)
    refl = np.nan_to_num(cube["reflectance"].sel(band=bands).values)
    _, h, w = refl.shape
    stride, off = window - overlap, overlap // 2
    rs, cs = window_starts(h, window, stride, off), window_starts(w, window, stride, off)
    pad = np.zeros((len(bands), h + 2 * window, w + 2 * window), "float32")
    pad[:, window : window + h, window : window + w] = refl
    x = np.stack([pad[:, r + window : r + 2 * window, c + window : c + 2 * window] for r in rs for c in cs])
    return np.clip(np.moveaxis(x, 1, -1) / rmax, 0, 1).astype("float32"), h * w


def plain_predict(model_path: str, x, batch_size: int, repeat: int) -> float:
    """Best wall time of ``model.predict`` on windows already in memory (after a warm-up)."""
    from agriland_scale.models import worker as _worker

    model, _ = _worker.get_model(model_path)
    model.predict(x, batch_size=batch_size, verbose=0)  # warm-up: tracing
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        model.predict(x, batch_size=batch_size, verbose=0)
        best = min(best, time.perf_counter() - t)
    return best


def _peak_rss_mib() -> float:
    """This process's peak resident memory (MiB): ``VmHWM`` of its own address space.

    Not ``getrusage().ru_maxrss``: on Linux that survives ``exec`` and so includes the RSS of
    the parent at the time it forked the worker (this benchmark's process, holding the stacked
    windows of the baseline), which made the 4x worker look 400 MiB bigger before any work.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage(
    model_path: str,
    store: str,
    out: str,
    bands: list[str],
    window: int,
    overlap: int,
    rmax: float,
    batch_size: int,
    repeat: int,
) -> dict:
    """Best wall time of segment_region + Zarr write on a fresh LocalCluster; worker peak RSS."""
    from agriland_scale.config.schema import RuntimeConfig
    from agriland_scale.models.segment import segment_region
    from agriland_scale.pipeline.runtime import dask_client
    from agriland_scale.store import open_cube, write_group

    cube = open_cube(store)
    rt = RuntimeConfig(n_workers=1, threads_per_worker=THREADS, memory_limit="12GiB", dashboard_address=":0")
    times = []
    with dask_client(rt) as client:
        rss0 = next(iter(client.run(_peak_rss_mib).values()))
        for _ in range(repeat + 1):  # the first run loads the model on the worker and traces it
            seg = segment_region(
                model_path,
                store,
                cube,
                bands,
                window=window,
                overlap=overlap,
                reflectance_max=rmax,
                threshold=0.5,
                batch_size=batch_size,
            )
            t = time.perf_counter()
            write_group(seg, out, "segmentation")
            times.append(time.perf_counter() - t)
        rss = next(iter(client.run(_peak_rss_mib).values()))
    return {
        "seconds": min(times[1:]),
        "warm_up_seconds": times[0],
        "worker_peak_rss_mib": rss,
        "worker_rss_before_mib": rss0,
        "pixels": cube.sizes["y"] * cube.sizes["x"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="take the best of N timings")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(THREADS)  # the baseline: as many threads as a worker
    from agriland_scale.models import worker as _worker

    _worker.configure_tensorflow()  # before anything starts TensorFlow in this process
    bands, window, overlap, rmax, batch = ["red", "green", "blue"], 256, 64, 0.3, 8
    import dask
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = build_cubes(tmp)
        model_path = str(tmp / "unet.keras")
        save_model(Path(model_path), bands, window, rmax)
        runs = {}
        for label, store in (("region", small), ("region_4x", large)):
            x, px = stacked_windows(store, bands, window, overlap, rmax)
            t_plain = plain_predict(model_path, x, batch, a.repeat)
            st = stage(
                model_path,
                store,
                str(tmp / f"{label}-seg.zarr"),
                bands,
                window,
                overlap,
                rmax,
                batch,
                a.repeat,
            )
            runs[label] = {
                "pixels": px,
                "windows": len(x),
                "plain_seconds": t_plain,
                "plain_px_per_s": px / t_plain,
                "stage_px_per_s": px / st["seconds"],
                "ratio": t_plain / st["seconds"],
                **st,
            }
            del x
        shape = {k: int(np.sqrt(v["pixels"])) for k, v in runs.items()}
    r1, r4 = runs["region"], runs["region_4x"]
    rss_ratio = r4["worker_peak_rss_mib"] / r1["worker_peak_rss_mib"]
    result = {
        "source": "demo cube, embedded real Sentinel-2 L1C window (1024 x 1024 px, 10 m); 4x region = "
        "the same cube mirrored 2 x 2 (2048 x 2048 px)",
        "model": "plain U-Net 32-64-128-256-512, 256 px, 3 bands (red, green, blue), random weights (seed 0)",
        "window": window,
        "overlap": overlap,
        "batch_size": batch,
        "cluster": f"LocalCluster 1 worker process x {THREADS} threads; baseline {THREADS} TF threads",
        "dask": dask.__version__,
        "runs": runs,
        "throughput_px_per_s": {
            "segment_region": r1["stage_px_per_s"],
            "plain_predict": r1["plain_px_per_s"],
        },
        "throughput_ratio": r1["ratio"],
        "throughput_ratio_4x": r4["ratio"],
        "worker_peak_rss_mib": {"region": r1["worker_peak_rss_mib"], "region_4x": r4["worker_peak_rss_mib"]},
        "peak_rss_ratio_4x": rss_ratio,
    }
    print(f"source: {result['source']}")
    print(
        f"model: {result['model']}; window {window}, overlap {overlap}, batch {batch}; "
        f"{result['cluster']}; dask {dask.__version__}"
    )
    for k, v in runs.items():
        print(
            f"  {k:<10} {shape[k]} px square, {v['windows']:>3} windows: plain predict "
            f"{v['plain_px_per_s']:>9,.0f} px/s ({v['plain_seconds']:.2f} s), segment_region -> Zarr "
            f"{v['stage_px_per_s']:>9,.0f} px/s ({v['seconds']:.2f} s) -> ratio {v['ratio']:.2f}; "
            f"worker peak RSS {v['worker_peak_rss_mib']:.0f} MiB"
        )
    print(
        f"throughput (region): segment_region {r1['stage_px_per_s']:,.0f} px/s, plain model.predict "
        f"{r1['plain_px_per_s']:,.0f} px/s -> ratio {r1['ratio']:.2f} (goal >= 0.9); 4x region: "
        f"ratio {r4['ratio']:.2f}"
    )
    print(
        f"peak RSS of the worker: region {r1['worker_peak_rss_mib']:.0f} MiB, 4x region "
        f"{r4['worker_peak_rss_mib']:.0f} MiB -> ratio {rss_ratio:.2f}"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
