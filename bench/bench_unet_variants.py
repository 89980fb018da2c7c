"""Benchmark: the three U-Net encoders (plain, ResNet-50, InceptionV3) side by side.

Builds the demo cube Zarr as the tests do (the embedded Sentinel-2 window served by a local
STAC API, written single-threaded) or reuses one (``--store``), rasterises the demo labels
(``segment.labels`` of the config, ``builtin:virginia/labels.geojson``) onto the cube grid with
:func:`agriland_scale.labels.raster.load_labels`, and trains each encoder with the project's
:func:`agriland_scale.models.train.train_unet`: same seed, epochs, windows, augmentation and the
config's spatially separate validation strip (``segment.train.validation``). Weights are
always ``none`` (random initialisation): nothing here is a pretrained (ImageNet) result.

Reported per encoder: parameters, epochs run, training seconds (``train_unet`` wall time:
patch loading, build, fit with per-epoch validation, save), the best epoch (lowest validation
loss, the weights EarlyStopping restores and ModelCheckpoint keeps) and that epoch's
validation IoU, F1 and pixel accuracy (labelled pixels only, threshold 0.5). The table is
printed and saved as JSON.

Run: ``python bench/bench_unet_variants.py [--store CUBE.zarr] [--epochs N]``
(defaults: the demo config's schedule without early stopping, ``--threads 2``). The saved
``bench/results/unet_variants.json`` is from ``--epochs 20`` (all three in about 45 min on 2
shared CPU cores); with a GPU use e.g. ``--epochs 50 --augment-factor 15 --batch-size 16
--learning-rate 1e-4 --patience 9`` for the seed's full schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "agriland_scale" / "data" / "demo.yaml"
ENCODERS = ("plain", "resnet50", "inceptionv3")


def build_store(cfg, store: str) -> None:
    """The demo cube written to a Zarr store, as ``tests/conftest.py`` (``cube_store``) does."""
    import dask

    from agriland_scale.cube.load import load_cube
    from agriland_scale.search.stac import local_stac_api, search_items
    from agriland_scale.store import write_group

    with local_stac_api(cfg.search.catalog) as url:
        items = search_items(cfg.search, url)
    with dask.config.set(scheduler="synchronous"):
        write_group(load_cube(items, cfg.cube, cfg.search.bbox), store, "cube")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=DEMO_YAML, help="pipeline YAML (default: the demo)")
    ap.add_argument("--store", help="an existing cube Zarr store (group 'cube'); default: build the demo one")
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    ap.add_argument("--epochs", type=int, help="epochs for every encoder (default: the config's)")
    ap.add_argument("--augment-factor", type=int, help="steps per epoch = windows x this / batch")
    ap.add_argument("--batch-size", type=int, help="training batch size (default: the config's)")
    ap.add_argument("--learning-rate", type=float)
    ap.add_argument(
        "--patience",
        type=int,
        help="early-stopping patience (default: the epoch count, so every encoder runs "
        "the same number of epochs; the best epoch's weights are still restored)",
    )
    ap.add_argument("--seed", type=int, help="default: the config's seed")
    ap.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    ap.add_argument("--work", type=Path, help="folder for the cube and models (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "unet_variants.json")
    args = ap.parse_args()

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)  # read once, before TF starts

    from agriland_scale import load_config
    from agriland_scale.config.files import resolve_path
    from agriland_scale.labels.raster import load_labels
    from agriland_scale.models.train import train_unet
    from agriland_scale.models.windows import unet_windows
    from agriland_scale.store import open_cube

    cfg = load_config(args.config)
    over = {"segment.weights": "none"}  # offline: random initialisation for all three
    for key, val in (
        ("epochs", args.epochs),
        ("augment_factor", args.augment_factor),
        ("batch_size", args.batch_size),
        ("learning_rate", args.learning_rate),
        ("patience", args.patience),
    ):
        if val is not None:
            over[f"segment.train.{key}"] = val
    cfg = cfg.with_overrides(**over)
    if args.patience is None:
        cfg = cfg.with_overrides(**{"segment.train.patience": max(1, cfg.segment.train.epochs)})
    seed = cfg.seed if args.seed is None else args.seed
    s = cfg.segment

    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_unet_"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if args.store:
        store = args.store
        cube_seconds = None
    else:
        store = str(work / "cube.zarr")
        build_store(cfg, store)
        cube_seconds = time.perf_counter() - t
        print(f"cube: built {store} in {cube_seconds:.0f} s", flush=True)

    label_path = str(resolve_path(s.labels, Path.cwd()))
    cube = open_cube(store, "cube")
    label = load_labels(label_path, cube, s.positive_classes).values
    tr, va, split = unet_windows(label, s.window, s.window // 2, s)

    def labelled(offsets):
        px = [label[r : r + s.window, c : c + s.window] for r, c in offsets]
        return {
            "positive": int(sum((p == 1).sum() for p in px)),
            "negative": int(sum((p == 0).sum() for p in px)),
        }

    steps = max(1, (len(tr) * max(s.train.augment_factor, 1)) // s.train.batch_size)
    print(
        f"cube {dict(cube.sizes)}, bands {s.bands}, labels {Path(label_path).name}: "
        f"{int((label == 1).sum())} positive / {int((label == 0).sum())} negative px; "
        f"{len(tr)} training / {len(va)} validation windows of {s.window} px "
        f"(validation: {s.train.validation} {s.train.validation_fraction:.0%}, split at {split} px); "
        f"{s.train.epochs} epochs x {steps} steps of {s.train.batch_size}, "
        f"augment x{s.train.augment_factor}, patience {s.train.patience}, seed {seed}, weights none, {args.threads} threads",
        flush=True,
    )

    import keras
    import tensorflow as tf

    runs = {}
    for enc in args.encoders:
        se = s.model_copy(update={"encoder": enc})
        out_path = str(work / f"unet_{enc}.keras")
        t = time.perf_counter()
        try:
            meta = train_unet(store, label, se, out_path, seed=seed, label_source=label_path)
        except Exception as e:  # noqa: BLE001 - record the failure, go on with the others
            tb = traceback.format_exc()
            print(
                f"{enc}: FAILED after {time.perf_counter() - t:.0f} s: {type(e).__name__}: {e}\n{tb}",
                flush=True,
            )
            runs[enc] = {"encoder": enc, "error": f"{type(e).__name__}: {e}", "traceback": tb}
            continue
        wall = time.perf_counter() - t
        params = keras.saving.load_model(out_path, compile=False).count_params()
        per_epoch = meta["per_epoch"]
        best = min(per_epoch, key=lambda m: m["val_loss"]) if per_epoch else None
        runs[enc] = {
            "encoder": enc,
            "parameters": int(params),
            "epochs_run": len(per_epoch),
            "train_seconds": wall,
            "seconds_in_train_unet": meta["seconds"],
            "best_epoch": best["epoch"] if best else None,
            "best": {k: best[k] for k in ("iou", "f1", "pixel_accuracy", "val_loss", "loss")}
            if best
            else None,
            "max_iou_any_epoch": max((m["iou"] for m in per_epoch), default=None),
            "final_model_metrics": meta["validation_metrics"],
            "per_epoch": per_epoch,
            "steps_per_epoch": meta["steps_per_epoch"],
        }
        b = runs[enc]["best"]
        print(
            f"{enc}: {len(per_epoch)} epochs in {wall:.0f} s, best epoch {runs[enc]['best_epoch']}"
            + (f" IoU {b['iou']:.3f} F1 {b['f1']:.3f} acc {b['pixel_accuracy']:.3f}" if b else ""),
            flush=True,
        )

    head = (
        f"{'encoder':<12} {'parameters':>11} {'epochs':>6} {'train s':>8} {'best ep':>7} "
        f"{'val IoU':>7} {'F1':>6} {'px acc':>6}"
    )
    lines = [head, "-" * len(head)]
    for enc, r in runs.items():
        if "error" in r:
            lines.append(f"{enc:<12} FAILED: {r['error'].splitlines()[0][:90]}")
            continue
        b = r["best"] or {"iou": float("nan"), "f1": float("nan"), "pixel_accuracy": float("nan")}
        lines.append(
            f"{enc:<12} {r['parameters']:>11,} {r['epochs_run']:>6} {r['train_seconds']:>8.0f} "
            f"{r['best_epoch'] or '-':>7} {b['iou']:>7.3f} {b['f1']:>6.3f} {b['pixel_accuracy']:>6.3f}"
        )
    table = "\n".join(lines)
    print(
        f"\nU-Net encoders, weights none (random init, NOT ImageNet-pretrained), "
        f"validation = {s.train.validation} {s.train.validation_fraction:.0%} strip, best epoch = lowest val loss"
    )
    print(table, flush=True)

    result = {
        "config": str(args.config),
        "store": store,
        "labels": label_path,
        "weights": "none (random initialisation; ImageNet weights not used: no network)",
        "seed": seed,
        "threads": args.threads,
        "segment": s.model_dump(exclude={"encoder", "labels"}),
        "windows": {
            "window": s.window,
            "train": len(tr),
            "validation": len(va),
            "validation_side": s.train.validation,
            "split_px": split,
            "train_labelled_px": labelled(tr),
            "validation_labelled_px": labelled(va),
            "steps_per_epoch": steps,
        },
        "cube_build_seconds": cube_seconds,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        },
        "table": table,
        "total_seconds": time.perf_counter() - t_start,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"total {result['total_seconds']:.0f} s; saved {args.out}")


if __name__ == "__main__":
    main()
