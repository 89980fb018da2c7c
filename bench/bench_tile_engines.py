"""Tile-scale model stages in each inference engine: the same finished run, stage by stage, A/B.

Issue 34, goal 4: the embedding and segmentation stages of a full-tile run in
``runtime.engine: tensorflow`` (what every run used before ``auto``) against ``auto`` (ONNX
Runtime for the float32 encoder, OpenVINO for the bfloat16 U-Net on this CPU). Given a finished
run folder (e.g. bench_region's ``run-1x10980-auto``: one synthetic full-size Sentinel-2 tile,
4 dates, the demo's trained models given as ``embed.model``/``segment.model``), each round
reruns each stage alone with each engine, alternating, in separate ``agriland run`` processes::

    agriland run PIPE --out RUN --until STAGE --force STAGE --set runtime.engine=ENGINE --quiet

and reads the stage's time from ``run.json`` (the stage itself, without the process start or
the warm-up wait, which are reported apart). Products are compared between the engines: the
embeddings' max |d| and the k-means-free part of the run (the probability's max |d| and the
mask's agreement over the whole tile). Prints images/s (patches for the embeddings, pixels of the
tile for the segmentation) and the ratio auto / tensorflow (goal >= 1.5). Run:

    python bench/bench_tile_engines.py RUN_DIR [--rounds 1] [--json bench/results/tile_engines.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("embeddings", "segmentation")


def agriland() -> str:
    return str(Path(sys.executable).parent / "agriland")


def rerun(pipe: Path, out: Path, stage: str, engine: str) -> dict:
    """Rerun ``stage`` of the run in ``out`` with ``engine``; its record's timings and engines."""
    cmd = [
        agriland(),
        "run",
        str(pipe),
        "--out",
        str(out),
        "--until",
        stage,
        "--force",
        stage,
        "--set",
        f"runtime.engine={engine}",
        "--quiet",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    rec = json.loads((out / "run.json").read_text())
    return {
        "stage_s": rec["timings_s"][stage],
        "warm_up_wait_s": rec["timings_s"].get("warm_up_wait", 0.0),
        "wall_s": round(wall, 1),
        "engine": (rec.get("engines") or {}).get(stage),
    }


def product(out: Path, stage: str) -> np.ndarray:
    """The stage's product as numpy: embeddings ``(patch, dim)``, or the probability ``(y, x)``."""
    from agriland_scale.store import open_product

    ds = open_product(str(out), stage)
    if stage == "embeddings":
        return ds["embedding"].values
    return ds["probability"].values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run folder whose pipeline gives both models")
    ap.add_argument("--engines", type=lambda v: v.split(","), default=["tensorflow", "auto"])
    ap.add_argument("--stages", type=lambda v: v.split(","), default=list(STAGES))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import yaml

    rec = json.loads((a.run / "run.json").read_text())
    pipe = a.run / "bench-tile-engines.yaml"
    pipe.write_text(yaml.safe_dump(rec["config"]))
    shape = rec["cube"]["shape"]
    units = {
        "embeddings": int(rec.get("patches", {}).get("valid") or rec.get("patches", {}).get("count") or 0),
        "segmentation": int(shape["y"]) * int(shape["x"]),
    }
    res: dict = {"run": str(a.run), "cube_px": [shape["y"], shape["x"]], "units": units, "rounds": []}
    outputs: dict[str, dict[str, np.ndarray]] = {s: {} for s in a.stages}
    for r in range(a.rounds):
        row: dict = {}
        for stage in a.stages:
            for engine in a.engines:
                got = rerun(pipe, a.run, stage, engine)
                row[f"{stage}/{engine}"] = got
                print(f"round {r + 1}: {stage} with {engine}: {json.dumps(got)}", flush=True)
                if r == a.rounds - 1:
                    outputs[stage][engine] = product(a.run, stage)
        res["rounds"].append(row)
    base = a.engines[0]
    print(f"\n{a.run.name}: cube {shape['y']} x {shape['x']} px; {units['embeddings']:,} patches embedded")
    res["summary"] = {}
    for stage in a.stages:
        unit = "patches" if stage == "embeddings" else "Mpx"
        scale = 1.0 if stage == "embeddings" else 1e-6
        best = {e: min(rd[f"{stage}/{e}"]["stage_s"] for rd in res["rounds"]) for e in a.engines}
        ref = outputs[stage][base]
        for e in a.engines:
            rate = units[stage] * scale / best[e]
            ok = ~np.isnan(ref)
            d = float(np.nanmax(np.abs(outputs[stage][e] - ref))) if ok.any() else float("nan")
            agree = ""
            if stage == "segmentation":
                agree = f", mask (p >= 0.5) equal on {((outputs[stage][e] >= 0.5) == (ref >= 0.5))[ok].mean():.5%}"
            used = res["rounds"][-1][f"{stage}/{e}"]["engine"]
            print(
                f"  {stage:<13} {e:<11} ({used}): {best[e]:7.1f} s, {rate:8.2f} {unit}/s, "
                f"{best[base] / best[e]:.2f}x {base}; max |d| vs {base} {d:.1e}{agree}"
            )
            res["summary"][f"{stage}/{e}"] = {
                "stage_s": best[e],
                "rate": rate,
                "unit": unit,
                "ratio": round(best[base] / best[e], 2),
                "max_abs_diff": d,
                "engine": used,
            }
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
