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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="unet,cae")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
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
