"""Training steps in float32 against Keras mixed precision ``mixed_bfloat16`` on this CPU.

Issue 34, goal 5: does training in bfloat16 (float32 master weights, Keras's
``mixed_bfloat16`` policy) pay on a CPU that computes bfloat16 natively (AVX512-BF16 / AMX)?
Times ``train_on_batch`` of the demo's two models, built as the training stages build them
(``weights: none``), on random inputs of the demo's shapes: the CAE (ResNet-50 encoder, ``gap``
head, 256 px, 3 bands, batch 8, MSE, Adam) and the plain U-Net (256 px, 3 bands, batch 8,
masked BCE, Adam). Each precision in its own fresh process (a Keras global policy), the two
alternated ``--rounds`` times; after ``--warmup`` steps (tracing), ``--steps`` steps are timed
and the best round kept. Prints seconds a step and the ratio float32 / bfloat16 (goal >= 1.5
for the demo's training to take bfloat16). Run:

    python bench/bench_train_precision.py [--steps 6] [--rounds 2] [--json bench/results/train_precision.json]

``--quality``: whole trainings instead, float32 against ``train_precision: bfloat16``, with
``bench/bench_quality.py``'s machinery (imported): the demo's plain U-Net on the demo labels
with the demo schedule (validation: the western 30 % strip), per seed the validation IoU at
0.5 and the training's wall time; then the CAE + DEC (the pipeline to the clusters, the demo's
schedule) per seed in each precision, and the agreement of the bfloat16 run's cluster
assignments with the float32 run's (adjusted Rand index; share of patches in matching
clusters, clusters matched one to one by the Hungarian method), cluster purity against the
labels and the CAE's training time. Precisions alternate per seed. The results are added to
``--json`` (key ``quality``) and the table appended to ``--txt``:

    nice -n 5 python bench/bench_train_precision.py --quality --seeds 42 43 44 --cae-seeds 42 43 \
        --json bench/results/train_precision.json --txt bench/results/train_precision.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
import numpy as np
from agriland_scale.models.worker import configure_tensorflow
configure_tensorflow()
import keras
model_name, policy, warmup, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
keras.config.set_dtype_policy(policy)
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.random((8, 256, 256, 3), dtype="float32")
if model_name == "cae":
    from agriland_scale.models.encoder import build_cae
    cae = build_cae(256, 3, head="gap", weights="none")
    model = keras.Model(cae.input, cae.get_layer("reconstruction").output)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    y = x
else:
    from agriland_scale.models.unet import build_unet, unet_loss
    model = build_unet("plain", 256, 3, weights="none")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=unet_loss("bce"))
    y = (rng.random((8, 256, 256, 1)) > 0.5).astype("float32")
    y[:, :32] = 255  # ignored pixels, as the labels have
losses = [float(model.train_on_batch(x, y)) for _ in range(warmup)]
t0 = time.perf_counter()
for _ in range(steps):
    losses.append(float(model.train_on_batch(x, y)))
dt = (time.perf_counter() - t0) / steps
print(json.dumps({"s_per_step": dt, "losses": losses, "compute_dtype": model.layers[2].compute_dtype}))
"""


PRECISIONS = ("float32", "bfloat16")


def _agreement(a, b) -> dict:
    """Adjusted Rand index and best one-to-one matching agreement of two cluster assignments."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(a, int), np.asarray(b, int)
    ok = (a >= 0) & (b >= 0)
    a, b = a[ok], b[ok]
    table = np.zeros((a.max() + 1, b.max() + 1), int)
    np.add.at(table, (a, b), 1)
    r, c = linear_sum_assignment(-table)
    return {
        "ari": float(adjusted_rand_score(a, b)),
        "matched": float(table[r, c].sum() / len(a)),
        "n": int(len(a)),
    }


def quality(a) -> dict:
    """Whole trainings of the demo's U-Net and CAE + DEC, float32 against bfloat16 (``--quality``)."""
    import functools
    import os
    import tempfile

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["TF_NUM_INTRAOP_THREADS"] = "2"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_quality as bq
    import numpy as np

    import agriland_scale as ag
    from agriland_scale import load_config
    from agriland_scale.config.files import resolve_path
    from agriland_scale.labels.raster import load_labels
    from agriland_scale.models import train
    from agriland_scale.models.worker import configure_tensorflow
    from agriland_scale.pipeline import runner  # noqa: F401 - loads the stage modules
    from agriland_scale.store import open_cube

    over = {"segment.weights": "none", "segment.threshold": None}
    if a.epochs is not None:  # smoke runs only: the results are the demo schedule's
        over |= {"segment.train.epochs": a.epochs, "embed.train.epochs": a.epochs}
    cfg = load_config(bq.DEMO_YAML).with_overrides(**over)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_train_precision_"))
    for p in PRECISIONS:
        (work / p).mkdir(parents=True, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "unet": {}, "cae": {}}
    unet_train, cae_train = train.train_unet, train.train_cae
    # the pipeline module whose CAE stage submits train_cae (found, as the stages move about)
    holders = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("agriland_scale.pipeline") and getattr(m, "train_cae", None) is cae_train
    ]
    try:
        if a.seeds:
            store = str(work / "cube.zarr")
            if not Path(store).exists():
                bq.build_store(cfg.with_overrides(**{"cube.bands": ["red", "green", "blue"]}), store)
            s = cfg.segment
            label_path = str(resolve_path(s.labels, None))
            label = load_labels(label_path, open_cube(store, "cube"), s.positive_classes).values
            configure_tensorflow()  # TensorFlow's import outside the first training's time
            import keras  # noqa: F401

            for i, seed in enumerate(a.seeds):  # which precision goes first alternates
                for p in PRECISIONS[:: 1 if i % 2 == 0 else -1]:  # unet_runs calls train.train_unet
                    train.train_unet = functools.partial(unet_train, precision=p)
                    (run,) = bq.unet_runs(cfg, store, label, label_path, ["rgb"], [seed], work / p)["rgb"]
                    res["unet"].setdefault(p, []).append(run)
                    print(f"U-Net seed {seed} {p}: {run.get('train_seconds', 0):.0f} s", flush=True)
        f32_labels = []
        for seed in a.cae_seeds:
            labels = {}
            for p in PRECISIONS:  # the setting, and bound in case the stage does not pass it yet
                for m in holders:
                    m.train_cae = functools.partial(cae_train, precision=p)
                cp = cfg.with_overrides(**{"runtime.train_precision": p})
                (run,) = bq.cae_runs(cp, ["rgb"], [seed], work / p)["rgb"]
                if "error" not in run:
                    tree = ag.open_run(work / p / f"run_rgb_{seed}")
                    labels[p] = np.nan_to_num(tree["clusters"].to_dataset()["labels"].values, nan=-1)
                    try:
                        rec = json.loads((work / p / f"run_rgb_{seed}" / "run.json").read_text())
                        run["train_precision"] = rec["cae"].get("train_precision")
                    except (OSError, ValueError, KeyError) as e:
                        run["train_precision"] = f"unknown ({e})"
                res["cae"].setdefault(p, []).append(run)
            if "float32" in labels:
                f32_labels.append(labels["float32"])
            if len(labels) == 2:
                agree = _agreement(labels["float32"], labels["bfloat16"])
                res["cae"].setdefault("agreement", []).append({"seed": seed, **agree})
                print(f"CAE seed {seed}: bfloat16 vs float32 clusters {agree}", flush=True)
        if len(f32_labels) > 1:  # the reference: how far float32 runs of two seeds agree
            res["cae"]["float32_seed_vs_seed"] = _agreement(f32_labels[0], f32_labels[1])
    finally:
        train.train_unet = unet_train
        for m in holders:
            m.train_cae = cae_train
    res["table"] = quality_table(res, a)
    return res


def quality_table(res: dict, a) -> str:
    """The ``--quality`` table: per seed and mean ± sd."""
    import statistics

    def pm(vals, d=3):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.fmean(vals):.{d}f} ± {sd:.{d}f}"

    lines = [
        f"# --quality {res['date']}: whole trainings, float32 vs train_precision bfloat16 (mixed_bfloat16)"
    ]
    u = res["unet"]
    if u:
        lines.append(
            "U-Net (demo: plain, weights none, 8 epochs x augment 2, validation west 30 %; t*: the "
            "threshold chosen on it, which the demo's mask uses; s: wall time of train_unet)"
        )
        lines.append(
            f"{'seed':>5} {'IoU@0.5 f32':>12} {'IoU@0.5 bf16':>13} {'diff':>7} {'IoU@t* f32':>11} "
            f"{'IoU@t* bf16':>12} {'s f32':>6} {'s bf16':>7} {'speedup':>8}"
        )
        for f, b in zip(u.get("float32", []), u.get("bfloat16", [])):
            if "error" in f or "error" in b:
                lines.append(f"{f['seed']:>5} FAILED {f.get('error', '')} {b.get('error', '')}")
                continue
            fi, bi = f["at_0.5"]["iou"], b["at_0.5"]["iou"]
            fs, bs = f["train_seconds"], b["train_seconds"]
            ft, bt = f["at_threshold"], b["at_threshold"]
            lines.append(
                f"{f['seed']:>5} {fi:>12.3f} {bi:>13.3f} {bi - fi:>+7.3f} {ft['iou']:>6.3f}@{f['threshold']:<4g} "
                f"{bt['iou']:>7.3f}@{b['threshold']:<4g} {fs:>6.0f} {bs:>7.0f} {fs / bs:>7.2f}x"
            )
        ok = [
            (f, b)
            for f, b in zip(u.get("float32", []), u.get("bfloat16", []))
            if "error" not in f and "error" not in b
        ]
        if ok:
            fi = [f["at_0.5"]["iou"] for f, _ in ok]
            bi = [b["at_0.5"]["iou"] for _, b in ok]
            fs = [f["train_seconds"] for f, _ in ok]
            bs = [b["train_seconds"] for _, b in ok]
            lines.append(
                f"mean ± sd: IoU@0.5 float32 {pm(fi)}, bfloat16 {pm(bi)} (bf16 - f32 {pm([y - x for x, y in zip(fi, bi)])}; "
                f"goal >= -0.01); train s float32 {pm(fs, 0)}, bfloat16 {pm(bs, 0)}: "
                f"{statistics.fmean(fs) / statistics.fmean(bs):.2f}x (goal >= 1.5)"
            )
    c = res["cae"]
    if c.get("float32"):
        lines.append("CAE + DEC (demo pipeline to the clusters, k = 6, CAE 3 x 6 steps, 49 patches)")
        lines.append(
            f"{'seed':>5} {'CAE s f32':>10} {'CAE s bf16':>11} {'speedup':>8} {'purity f32':>11} {'purity bf16':>12} {'ARI':>6} {'matched':>8}"
        )
        agree = {g["seed"]: g for g in c.get("agreement", [])}
        for f, b in zip(c["float32"], c.get("bfloat16", [])):
            g = agree.get(f["seed"], {})
            if "error" in f or "error" in b:
                lines.append(f"{f['seed']:>5} FAILED {f.get('error', '')} {b.get('error', '')}")
                continue
            fs, bs = f["cae_seconds"], b["cae_seconds"]
            lines.append(
                f"{f['seed']:>5} {fs:>10.0f} {bs:>11.0f} {fs / bs:>7.2f}x {f['purity']:>11.3f} {b['purity']:>12.3f} "
                f"{g.get('ari', float('nan')):>6.3f} {g.get('matched', float('nan')):>8.3f}"
            )
        if "float32_seed_vs_seed" in c:
            ref = c["float32_seed_vs_seed"]
            lines.append(
                f"reference, float32 seed {a.cae_seeds[0]} vs seed {a.cae_seeds[1]}: ARI {ref['ari']:.3f}, "
                f"matched {ref['matched']:.3f}"
            )
        if agree:
            lines.append(
                f"mean ± sd: ARI {pm([g['ari'] for g in agree.values()])}, matched {pm([g['matched'] for g in agree.values()])}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="unet,cae")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quality", action="store_true", help="whole demo trainings: IoU, clusters, wall time")
    ap.add_argument("--seeds", nargs="*", type=int, default=[42, 43, 44], help="U-Net seeds (--quality)")
    ap.add_argument("--cae-seeds", nargs="*", type=int, default=[42, 43], help="CAE + DEC seeds (--quality)")
    ap.add_argument("--work", type=Path, help="folder for the cube, models and runs (--quality)")
    ap.add_argument("--txt", type=Path, help="append the --quality table to this file")
    ap.add_argument("--epochs", type=int, help="U-Net and CAE epochs (smoke runs; default: the demo's)")
    a = ap.parse_args()
    if a.quality:
        q = quality(a)
        print("\n" + q["table"], flush=True)
        if a.json:
            old = json.loads(a.json.read_text()) if a.json.exists() else {}
            a.json.write_text(json.dumps(old | {"quality": q}, indent=1, default=str))
        if a.txt:
            with a.txt.open("a") as f:
                f.write("\n" + q["table"] + "\n")
        return
    res: dict = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "models": {}}
    for model in a.models.split(","):
        times: dict[str, list[float]] = {"float32": [], "mixed_bfloat16": []}
        last: dict[str, dict] = {}
        for r in range(a.rounds):
            for policy in times:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, model, policy, str(a.warmup), str(a.steps)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                last[policy] = json.loads(out.stdout.strip().splitlines()[-1])
                times[policy].append(last[policy]["s_per_step"])
                print(f"{model} round {r + 1} {policy}: {times[policy][-1]:.2f} s a step", flush=True)
        f32, bf16 = min(times["float32"]), min(times["mixed_bfloat16"])
        res["models"][model] = {
            "s_per_step": times,
            "ratio_f32_over_bf16": round(f32 / bf16, 2),
            "compute_dtype": {p: v["compute_dtype"] for p, v in last.items()},
            "last_loss": {p: v["losses"][-1] for p, v in last.items()},
        }
        print(
            f"{model}: float32 {f32:.2f} s a step, mixed_bfloat16 {bf16:.2f} s a step: {f32 / bf16:.2f}x "
            f"(goal >= 1.5); compute dtypes {res['models'][model]['compute_dtype']}",
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
