"""Benchmark: map quality by input bands, over seeds (U-Net and CAE + DEC on the demo region).

U-Net: the demo pipeline's segment settings (plain encoder, weights none, window 256, its
training schedule and its spatial split: the west 30 % strip validates) trained with the
project's :func:`agriland_scale.models.train.train_unet` on the demo labels
(``builtin:virginia/labels.geojson`` rasterised by :func:`agriland_scale.labels.raster.load_labels`)
for each band set (RGB; RGB+NIR; RGB+NIR+SWIR, i.e. swir16/swir22 resampled from 20 m to the
10 m cube) and each seed. ``reflectance_max`` is ``auto`` (per band: 0.3 visible, 0.5 NIR,
0.4 / 0.3 SWIR; RGB is the seed's 0.3). One 6-band cube is built once (as ``tests/conftest.py``
does) and every band set reads its bands from it. Reported per band set, mean ± sd over the
seeds: validation IoU at the fixed threshold 0.5 (the unbiased comparison) and at the
threshold chosen on the validation strip (its IoU is measured where it was chosen:
optimistic), the chosen threshold, precision and recall at 0.5, the mean predicted
probability over labelled validation pixels against the labelled agricultural fraction (their
difference: over-prediction) and the training wall time.

CAE + DEC: the pipeline itself (:func:`agriland_scale.pipeline.runner.run`, ``--until
clusters``, the demo's schedule: CAE 3 x 6 steps, k = 6) with ``embed.bands`` RGB and RGB+NIR
(``embed.reflectance_max: auto``), per seed. Each clustered patch (256 px, stride 128) counts
the labelled arable and other pixels it holds; per cluster these add up to a 2 x k table:
purity (share of labelled pixels in their cluster's majority class; the majority class alone
gives the baseline printed beside it) and entropy (bits, 0 = pure, 1 = even mix; weighted by
cluster size). Few patches (49) and k = 6: a coarse measure.

Run (the saved results): ``nice -n 5 python bench/bench_quality.py --json
bench/results/quality.json > /tmp/quality.log 2>&1`` (3 U-Net seeds a band set, 2 CAE seeds;
about 50 min on 2 shared CPU cores; the table also goes to ``bench/results/quality.txt``).
Options: ``--seeds 42 43 44``, ``--cae-seeds 42 43``, ``--sets rgb rgbn``, ``--skip-cae``,
``--skip-unet``, ``--unet-from WORK`` / ``--cae-from JSON`` (collect the results of earlier
runs: the U-Net's from the model sidecars in their ``--work`` folder, the CAE's from a JSON),
``--epochs N`` / ``--cae-epochs N`` (default: the demo's), ``--work DIR`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "agriland_scale" / "data" / "demo.yaml"
BAND_SETS = {
    "rgb": ["red", "green", "blue"],
    "rgbn": ["red", "green", "blue", "nir"],
    "rgbn+swir": ["red", "green", "blue", "nir", "swir16", "swir22"],
}
CAE_SETS = ("rgb", "rgbn")
ALL_BANDS = BAND_SETS["rgbn+swir"]


def build_store(cfg, store: str) -> None:
    """The demo cube (every band of ``cfg.cube``) written to a Zarr store, as ``tests/conftest.py`` does."""
    import dask

    from agriland_scale.cube.load import load_cube
    from agriland_scale.search.stac import local_stac_api, search_items
    from agriland_scale.store import write_group

    with local_stac_api(cfg.search.catalog) as url:
        items = search_items(cfg.search, url)
    with dask.config.set(scheduler="synchronous"):
        write_group(load_cube(items, cfg.cube, cfg.search.bbox), store, "cube")


def _ms(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(values: list[float], digits: int = 3) -> str:
    m, s = _ms(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def unet_runs(cfg, store: str, label: np.ndarray, label_path: str, sets, seeds, work: Path) -> dict:
    """Train the U-Net for every band set and seed; returns ``{set: [run, ...]}``."""
    from agriland_scale.models.train import train_unet

    runs: dict[str, list[dict]] = {}
    for name in sets:
        s = cfg.segment.model_copy(update={"bands": BAND_SETS[name], "reflectance_max": "auto"})
        for seed in seeds:
            out = str(work / f"unet_{name}_{seed}.keras")
            t = time.perf_counter()
            try:
                meta = train_unet(store, label, s, out, seed=seed, label_source=label_path)
            except Exception as e:  # noqa: BLE001 - record the failure, go on with the others
                tb = traceback.format_exc()
                print(f"{name} seed {seed}: FAILED: {type(e).__name__}: {e}\n{tb}", flush=True)
                runs.setdefault(name, []).append({"seed": seed, "error": f"{type(e).__name__}: {e}"})
                continue
            wall = time.perf_counter() - t
            at05 = meta["threshold_choice"]["at_0.5"]
            run = {
                "seed": seed,
                "bands": BAND_SETS[name],
                "train_seconds": wall,
                "epochs_run": len(meta["per_epoch"]),
                "threshold": meta["threshold"],
                "at_threshold": meta["validation_metrics"],
                "at_0.5": at05,
                "iou_by_threshold": meta["threshold_choice"]["iou_by_threshold"],
                "normalisation": meta["normalisation"],
            }
            runs.setdefault(name, []).append(run)
            print(
                f"{name} seed {seed}: {wall:.0f} s, {run['epochs_run']} epochs, IoU@0.5 {at05['iou']:.3f}, "
                f"IoU@{meta['threshold']:g} {meta['validation_metrics']['iou']:.3f}, precision "
                f"{at05['precision']:.3f}, recall {at05['recall']:.3f}, mean p "
                f"{at05['mean_probability']:.3f} vs labelled {at05['labelled_fraction']:.3f}",
                flush=True,
            )
    return runs


def unet_runs_from(work: Path, sets, seeds) -> dict:
    """The U-Net results of an earlier run of this benchmark, from the sidecars in its ``--work``.

    ``train_seconds`` is then ``train_unet``'s own time (the sidecar's ``seconds``), which the
    wall time around it exceeds by the model's first load only.
    """
    runs: dict[str, list[dict]] = {}
    for name in sets:
        for seed in seeds:
            side = work / f"unet_{name}_{seed}.keras.json"
            if not side.exists():
                continue
            meta = json.loads(side.read_text())
            runs.setdefault(name, []).append(
                {
                    "seed": seed,
                    "bands": BAND_SETS[name],
                    "train_seconds": meta["seconds"],
                    "epochs_run": len(meta["per_epoch"]),
                    "threshold": meta["threshold"],
                    "at_threshold": meta["validation_metrics"],
                    "at_0.5": meta["threshold_choice"]["at_0.5"],
                    "iou_by_threshold": meta["threshold_choice"]["iou_by_threshold"],
                    "normalisation": meta["normalisation"],
                }
            )
    return runs


def _purity(counts: np.ndarray) -> dict[str, float]:
    """Purity, entropy (bits) and majority baseline of a ``(cluster, 2)`` table of labelled pixels."""
    n_k = counts.sum(axis=1)
    total = float(n_k.sum())
    if total == 0:
        return {"purity": float("nan"), "entropy_bits": float("nan"), "baseline_purity": float("nan")}
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = counts / np.maximum(n_k[:, None], 1)
        h = -np.nansum(np.where(frac > 0, frac * np.log2(frac), 0.0), axis=1)
    return {
        "purity": float(counts.max(axis=1).sum() / total),
        "entropy_bits": float((n_k / total * h).sum()),
        "baseline_purity": float(counts.sum(axis=0).max() / total),
        "clusters_with_labels": int((n_k > 0).sum()),
    }


def cae_runs(cfg, sets, seeds, work: Path) -> dict:
    """Run the pipeline to the clusters for every band set and seed; purity against the labels."""
    import agriland_scale as ag
    from agriland_scale.config.files import resolve_path
    from agriland_scale.labels.raster import load_labels
    from agriland_scale.pipeline.runner import run

    runs: dict[str, list[dict]] = {}
    for name in sets:
        for seed in seeds:
            over = {"embed.bands": BAND_SETS[name], "embed.reflectance_max": "auto", "seed": seed}
            c = cfg.with_overrides(**over)
            out = work / f"run_{name}_{seed}"
            t = time.perf_counter()
            try:
                rec = run(c, out, until="clusters", report=lambda line: None)
            except Exception as e:  # noqa: BLE001
                tb = traceback.format_exc()
                print(f"CAE {name} seed {seed}: FAILED: {type(e).__name__}: {e}\n{tb}", flush=True)
                runs.setdefault(name, []).append({"seed": seed, "error": f"{type(e).__name__}: {e}"})
                continue
            wall = time.perf_counter() - t
            tree = ag.open_run(out)
            cube = tree["cube"].to_dataset()
            label = load_labels(
                str(resolve_path(c.segment.labels, None)), cube, c.segment.positive_classes
            ).values
            index = tree["patches"].to_dataset()
            clusters = np.asarray(tree["clusters"].to_dataset()["labels"].values)
            clusters = (
                np.where(np.isnan(clusters), -1, clusters).astype(int)
                if clusters.dtype.kind == "f"
                else clusters
            )
            size = int(index.attrs["patch_size"])
            counts = np.zeros((c.cluster.k, 2), dtype=np.int64)
            for y0, x0, k in zip(index["y0"].values, index["x0"].values, clusters):
                if k < 0:
                    continue
                win = label[int(y0) : int(y0) + size, int(x0) : int(x0) + size]
                counts[k] += [(win == 1).sum(), (win == 0).sum()]
            res = {
                "seed": seed,
                "bands": BAND_SETS[name],
                "seconds": wall,
                "cae_seconds": (rec.get("cae") or {}).get("seconds"),
                "counts_arable_other": counts.tolist(),
                **_purity(counts),
            }
            runs.setdefault(name, []).append(res)
            print(
                f"CAE {name} seed {seed}: {wall:.0f} s, purity {res['purity']:.3f} (majority "
                f"{res['baseline_purity']:.3f}), entropy {res['entropy_bits']:.3f} bits",
                flush=True,
            )
    return runs


def unet_table(runs: dict) -> str:
    head = (
        f"{'bands':<10} {'n':>2} {'IoU@0.5':>13} {'IoU@t*':>13} {'t*':>11} {'precision':>13} "
        f"{'recall':>13} {'mean p':>13} {'labelled':>8} {'over':>7} {'train s':>9}"
    )
    lines = [head, "-" * len(head)]
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"{name:<10} FAILED")
            continue
        mean_p = [r["at_0.5"]["mean_probability"] for r in ok]
        lab = statistics.fmean(r["at_0.5"]["labelled_fraction"] for r in ok)
        lines.append(
            f"{name:<10} {len(ok):>2} {_pm([r['at_0.5']['iou'] for r in ok]):>13} "
            f"{_pm([r['at_threshold']['iou'] for r in ok]):>13} {_pm([r['threshold'] for r in ok], 2):>11} "
            f"{_pm([r['at_0.5']['precision'] for r in ok]):>13} {_pm([r['at_0.5']['recall'] for r in ok]):>13} "
            f"{_pm(mean_p):>13} {lab:>8.3f} {statistics.fmean(mean_p) - lab:>+7.3f} "
            f"{_pm([r['train_seconds'] for r in ok], 0):>9}"
        )
    return "\n".join(lines)


def cae_table(runs: dict) -> str:
    head = f"{'bands':<10} {'n':>2} {'purity':>13} {'majority':>8} {'entropy bits':>13} {'run s':>9}"
    lines = [head, "-" * len(head)]
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"{name:<10} FAILED")
            continue
        lines.append(
            f"{name:<10} {len(ok):>2} {_pm([r['purity'] for r in ok]):>13} "
            f"{statistics.fmean(r['baseline_purity'] for r in ok):>8.3f} "
            f"{_pm([r['entropy_bits'] for r in ok]):>13} {_pm([r['seconds'] for r in ok], 0):>9}"
        )
    return "\n".join(lines)


def winner(runs: dict) -> str:
    """The band set whose mean IoU@0.5 beats every other's by more than the larger sd, else 'none'."""
    stats = {n: _ms([r["at_0.5"]["iou"] for r in rs if "error" not in r]) for n, rs in runs.items()}
    stats = {n: v for n, v in stats.items() if np.isfinite(v[0])}
    if not stats:
        return "none"
    best = max(stats, key=lambda n: stats[n][0])
    m, s = stats[best]
    beats = all(m - stats[o][0] > max(s, stats[o][1]) for o in stats if o != best)
    return best if beats else "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=DEMO_YAML, help="pipeline YAML (default: the demo)")
    ap.add_argument("--sets", nargs="+", default=list(BAND_SETS), choices=list(BAND_SETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="U-Net seeds")
    ap.add_argument("--cae-seeds", nargs="+", type=int, default=[42, 43], help="CAE + DEC seeds")
    ap.add_argument("--skip-cae", action="store_true", help="only the U-Net part")
    ap.add_argument("--skip-unet", action="store_true", help="only the CAE + DEC part")
    ap.add_argument("--epochs", type=int, help="U-Net epochs (default: the config's)")
    ap.add_argument("--cae-epochs", type=int, help="CAE epochs (default: the config's)")
    ap.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    ap.add_argument("--work", type=Path, help="folder for the cube, models and runs (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="save the results here (the table goes beside it as .txt)")
    ap.add_argument(
        "--unet-from",
        type=Path,
        help="take the U-Net results from the model sidecars of an earlier run's --work folder (no training)",
    )
    ap.add_argument("--cae-from", type=Path, help="take the CAE + DEC results from an earlier run's --json")
    args = ap.parse_args()

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)  # read once, before TF starts

    from agriland_scale import load_config
    from agriland_scale.config.files import resolve_path
    from agriland_scale.labels.raster import load_labels
    from agriland_scale.models.windows import unet_windows
    from agriland_scale.store import open_cube

    t_start = time.perf_counter()
    cfg = load_config(args.config)
    over = {"segment.weights": "none", "segment.threshold": None}
    if args.epochs is not None:
        over["segment.train.epochs"] = args.epochs
    if args.cae_epochs is not None:
        over["embed.train.epochs"] = args.cae_epochs
    cfg = cfg.with_overrides(**over)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    work.mkdir(parents=True, exist_ok=True)

    result: dict = {"config": str(args.config), "seeds": args.seeds, "cae_seeds": args.cae_seeds}
    unet, cae = {}, {}
    if args.unet_from:
        unet = unet_runs_from(args.unet_from, args.sets, args.seeds)
        result["unet"] = {
            "segment": cfg.segment.model_dump(exclude={"bands", "labels"}),
            "runs": unet,
            "winner": winner(unet),
            "from": str(args.unet_from),
        }
    elif not args.skip_unet:
        cube_cfg = cfg.with_overrides(**{"cube.bands": ALL_BANDS, "embed.bands": ["red", "green", "blue"]})
        store = str(work / "cube.zarr")
        t = time.perf_counter()
        build_store(cube_cfg, store)
        print(f"cube: {ALL_BANDS} built in {time.perf_counter() - t:.0f} s ({store})", flush=True)
        s = cfg.segment
        label_path = str(resolve_path(s.labels, None))
        label = load_labels(label_path, open_cube(store, "cube"), s.positive_classes).values
        tr, va, split = unet_windows(label, s.window, s.window // 2, s)
        tc = s.train
        print(
            f"U-Net {s.encoder}, weights none, {len(tr)} training / {len(va)} validation windows of "
            f"{s.window} px (validation: {tc.validation} {tc.validation_fraction:.0%}, split at {split} px), "
            f"{tc.epochs} epochs, augment x{tc.augment_factor}, batch {tc.batch_size}, lr "
            f"{tc.learning_rate:g}, patience {tc.patience}; seeds {args.seeds}",
            flush=True,
        )
        unet = unet_runs(cfg, store, label, label_path, args.sets, args.seeds, work)
        result["unet"] = {
            "segment": s.model_dump(exclude={"bands", "labels"}),
            "windows": {"train": len(tr), "validation": len(va), "split_px": split},
            "runs": unet,
            "winner": winner(unet),
        }
    if args.cae_from:
        earlier = json.loads(args.cae_from.read_text())
        result["cae"] = earlier["cae"] | {"from": str(args.cae_from)}
        result["cae_seeds"] = earlier["cae_seeds"]
        cae = result["cae"]["runs"]
    elif not args.skip_cae:
        cae = cae_runs(cfg, [n for n in CAE_SETS if n in args.sets], args.cae_seeds, work)
        result["cae"] = {"embed": cfg.embed.model_dump(exclude={"bands"}), "k": cfg.cluster.k, "runs": cae}

    import keras
    import tensorflow as tf

    parts = []
    if unet:
        parts.append(
            f"U-Net (plain, weights none, demo schedule), validation = {cfg.segment.train.validation} "
            f"{cfg.segment.train.validation_fraction:.0%} strip, mean ± sd over seeds {args.seeds}.\n"
            "IoU@0.5: at the fixed threshold; t*: the threshold chosen on validation (max IoU, grid "
            "0.05..0.95), IoU@t* at it (chosen on the same pixels: optimistic); precision, recall at 0.5; "
            "mean p: mean predicted probability over labelled pixels, labelled: their agricultural "
            "fraction, over: mean p - labelled.\n"
            + unet_table(unet)
            + f"\nwinner by mean IoU@0.5 beyond one sd: {result['unet']['winner']}"
        )
    if cae:
        parts.append(
            f"CAE + DEC (pipeline to clusters, k = {cfg.cluster.k}), clusters against labelled arable / "
            f"other pixels, mean ± sd over seeds {result['cae_seeds']}; majority: the purity of one cluster.\n"
            + cae_table(cae)
        )
    table = "\n\n".join(parts)
    result.update(
        table=table,
        total_seconds=time.perf_counter() - t_start,
        machine={
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    )
    print("\n" + table, flush=True)
    print(f"total {result['total_seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        args.json.with_suffix(".txt").write_text(table + "\n")
        print(f"saved {args.json} and {args.json.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
