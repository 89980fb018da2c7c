"""Benchmark: the distributed embedding stage against a plain ``model.predict``.

Uses a finished run folder (``agriland demo --out DIR``), or without one trains the demo's
models with bench_run's short schedule into a temporary folder. Both sides embed the same
patches with the same encoder file: the stage reads patches from the Zarr cube inside Dask
tasks on a LocalCluster (model loaded once per worker); the baseline calls ``predict`` on the
patches already in memory, in this process. Prints patches/s of both and their ratio
(goal >= 0.9). Run: ``python bench/bench_embed.py [DIR] [--repeat N]`` (``--repeat 8``: 392
patches of a demo run's 49; the run it trains itself has 36 patches, so run_all asks
``--repeat 11``: 396).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path, nargs="?", help="a finished run (default: train one)")
    ap.add_argument("--repeat", type=int, default=4, help="tile the patch list N times (more work)")
    ap.add_argument("--task-batches", type=int, default=4, help="batches of patches per Dask task")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timings of each side (best kept)")
    ap.add_argument(
        "--engines",
        type=lambda v: v.split(","),
        default=["tensorflow"],
        help="runtime.engine of the stage, comma-separated (e.g. tensorflow,onnx,openvino): each timed in every "
        "round; ENGINE:PRECISION computes in that precision (e.g. auto:mixed_bfloat16, as inference_precision "
        "auto on a CPU with native bfloat16), else float32",
    )
    args = ap.parse_args()
    import dask

    from agriland_scale.config.schema import RunConfig, RuntimeConfig
    from agriland_scale.models import worker as _worker
    from agriland_scale.models.embed import embed_patches
    from agriland_scale.patches import read_patches
    from agriland_scale.pipeline.runtime import dask_client
    from agriland_scale.store import open_cube, open_product, reader

    if args.run_dir is None:
        import sys
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_naive import train_models
        from bench_run import catalog

        tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
        args.run_dir = train_models(tmp, catalog(tmp)).parent
    run = json.loads((args.run_dir / "run.json").read_text())
    cfg = RunConfig.model_validate(run["config"])
    store = reader(args.run_dir)
    encoder = str(args.run_dir / "models" / "encoder.keras")
    index = open_product(store, "patches").load()
    index = index.isel(patch=np.tile(np.arange(index.sizes["patch"]), args.repeat))
    index = index.assign_coords(patch=np.arange(index.sizes["patch"]))
    n = index.sizes["patch"]
    e = cfg.embed
    threads = cfg.runtime.threads_per_worker

    # baseline: plain predict on patches in memory (same threads as one worker)
    import os

    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    cube = open_cube(store)
    x = read_patches(
        cube["reflectance"], index.y0.values, index.x0.values, cfg.patches.size, e.bands, e.reflectance_max
    )
    model, _ = _worker.get_model(encoder)
    model.predict(x[: e.batch_size], batch_size=e.batch_size, verbose=0)  # warm-up

    rt = RuntimeConfig(n_workers=1, threads_per_worker=threads, memory_limit="8GiB", dashboard_address=":0")
    plain_times: list[float] = []
    times: dict[str, list[float]] = {eng: [] for eng in args.engines}
    embs: dict[str, np.ndarray] = {}
    with dask_client(rt):
        for eng in args.engines:  # each engine's model loaded on the worker, as in a run
            embed_patches(
                encoder,
                store,
                index.isel(patch=slice(0, e.batch_size)),
                e.bands,
                e.reflectance_max,
                batch_size=e.batch_size,
                min_valid_fraction=0.0,
                engine=eng.split(":")[0],
                precision=(eng.split(":") + ["float32"])[1],
            )["embedding"].compute()
        for _ in range(args.rounds):  # alternate, keep the best of each: this machine is noisy
            t = time.perf_counter()
            ref = model.predict(x, batch_size=e.batch_size, verbose=0)
            plain_times.append(time.perf_counter() - t)
            for eng in args.engines:
                t = time.perf_counter()
                embs[eng] = embed_patches(
                    encoder,
                    store,
                    index,
                    e.bands,
                    e.reflectance_max,
                    batch_size=e.batch_size,
                    min_valid_fraction=0.0,
                    tasks_batches=args.task_batches,
                    engine=eng.split(":")[0],
                    precision=(eng.split(":") + ["float32"])[1],
                )["embedding"].values
                times[eng].append(time.perf_counter() - t)
    first = args.engines[0]
    stage_times = times[first]
    t_plain, t_stage = min(plain_times), min(stage_times)
    err = float(np.abs(embs[first] - ref).max())
    print(
        f"patches: {n} of {cfg.patches.size} px, bands {e.bands}, head {e.head}, "
        f"{threads} threads, {args.task_batches} batches a task, dask {dask.__version__}"
    )
    print(f"plain model.predict (in memory): {n / t_plain:.2f} patches/s ({t_plain:.1f} s)")
    print(f"distributed embedding stage:     {n / t_stage:.2f} patches/s ({t_stage:.1f} s)")
    print(
        f"ratio stage / plain: {t_plain / t_stage:.3f}  (goal >= 0.9); max |diff| {err:.2e}; "
        f"best of {args.rounds} alternating rounds (plain {', '.join(f'{v:.1f}' for v in plain_times)} s; "
        f"stage {', '.join(f'{v:.1f}' for v in stage_times)} s)"
    )
    for eng in args.engines[1:]:
        t = min(times[eng])
        d = float(np.abs(embs[eng] - ref).max())
        print(
            f"stage with runtime.engine {eng}: {n / t:.2f} patches/s ({t:.1f} s): {t_stage / t:.2f}x the "
            f"{first} stage (rounds {', '.join(f'{v:.1f}' for v in times[eng])} s); max |diff| vs predict {d:.2e}"
        )


if __name__ == "__main__":
    main()
