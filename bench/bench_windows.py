"""Larger inference windows (issue 16, goal 2): output pixels/s and worker peak RSS by window size.

``segment_region`` on the 4x region of ``bench_segment.py`` (the demo cube mirrored 2 x 2:
2048 x 2048 px of real pixels), written to Zarr, on a fresh LocalCluster (1 worker x 2
threads) per setting, overlap 64, with the plain U-Net trained at 256 px (random weights:
inference cost does not depend on them):

- ``inference_window`` 256 (the training window), ``auto`` (the default: the window in
  256..1024 px that predicts the fewest pixels with the same overlap, 768 px here) and 1024
  (on 2048 px a 1024 px window with 64 px overlap needs a 3 x 3 grid: more pixels predicted);
- output pixels/s (best of ``--repeat`` after a warm-up run) and the ratio to 256 px;
- the worker's peak RSS (``VmHWM``), which the larger windows must keep bounded;
- on a CPU with native bfloat16 (AVX512-BF16, AMX), ``auto`` once more with the U-Net in
  bfloat16, what ``runtime.inference_precision: auto`` gives a run there.

Run: ``nice -n 5 python bench/bench_windows.py [--repeat 2] [--json bench/results/windows.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench_segment import THREADS, _peak_rss_mib, build_cubes, save_model  # noqa: E402


def run(
    model_path: str, store: str, out: str, inference_window, repeat: int, precision: str = "float32"
) -> dict:
    from agriland_scale.config.schema import RuntimeConfig
    from agriland_scale.models.segment import _predicted_pixels, choose_inference_window, segment_region
    from agriland_scale.pipeline.runtime import dask_client
    from agriland_scale.store import open_cube, write_group

    cube = open_cube(store)
    h, w = cube.sizes["y"], cube.sizes["x"]
    rt = RuntimeConfig(n_workers=1, threads_per_worker=THREADS, memory_limit="12GiB", dashboard_address=":0")
    times = []
    with dask_client(rt) as client:
        for _ in range(repeat + 1):  # the first run loads and traces the model at this window
            seg = segment_region(
                model_path,
                store,
                cube,
                ["red", "green", "blue"],
                window=256,
                overlap=64,
                reflectance_max=0.3,
                threshold=0.5,
                batch_size=8,
                inference_window=inference_window,
                precision=precision,
            )
            t = time.perf_counter()
            write_group(seg, out, "segmentation")
            times.append(time.perf_counter() - t)
        rss = next(iter(client.run(_peak_rss_mib).values()))
    from agriland_scale.models.files import read_sidecar

    size = choose_inference_window(inference_window, 256, 64, h, w, read_sidecar(model_path).get("encoder"))
    predicted = _predicted_pixels(size, 64, h, w) / (h * w)
    return {
        "inference_window": inference_window,
        "precision": precision,
        "window_px": size,
        "predicted_px_per_output_px": predicted,
        "seconds": min(times[1:]),
        "warm_up_seconds": times[0],
        "px_per_s": h * w / min(times[1:]),
        "worker_peak_rss_mib": rss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(THREADS)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _, large = build_cubes(tmp_path)
        model = str(tmp_path / "unet.keras")
        save_model(Path(model), ["red", "green", "blue"], 256, 0.3)
        from agriland_scale.models.worker import cpu_has_bfloat16

        settings = [(None, "float32"), ("auto", "float32"), (1024, "float32")]
        if cpu_has_bfloat16():  # what a run computes here by default (runtime.inference_precision)
            settings.append(("auto", "mixed_bfloat16"))
        for i, (iw, precision) in enumerate(settings):
            results.append(run(model, large, str(tmp_path / f"seg-{i}.zarr"), iw, a.repeat, precision))
            r = results[-1]
            print(
                f"inference_window {str(iw):>5} ({r['window_px']} px, {precision}): "
                f"{r['px_per_s'] / 1e3:.0f} kpx/s, "
                f"{r['seconds']:.1f} s, worker peak RSS {r['worker_peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    base = results[0]
    for r in results:
        r["ratio_to_256"] = r["px_per_s"] / base["px_per_s"]
        r["rss_ratio_to_256"] = r["worker_peak_rss_mib"] / base["worker_peak_rss_mib"]
    print("\n| inference window | precision | px/s | vs 256 px | worker peak RSS | vs 256 px |")
    for r in results:
        print(
            f"| {r['window_px']} ({r['inference_window']}) | {r['precision']} | {r['px_per_s']:.0f} | "
            f"{r['ratio_to_256']:.2f} | "
            f"{r['worker_peak_rss_mib']:.0f} MiB | {r['rss_ratio_to_256']:.2f} |"
        )
    if a.json:
        a.json.write_text(
            json.dumps(
                {"date": time.strftime("%Y-%m-%d"), "region_px": [2048, 2048], "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
