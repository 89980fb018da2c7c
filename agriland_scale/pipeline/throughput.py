"""How fast each stage works: the throughput ``agriland plan`` turns work into time.

A stage's work is counted in :data:`UNITS` (its "px"); its throughput, units a second, is
built in (:data:`DEFAULT_THROUGHPUT`, measured by the benchmarks on a 2-core CPU, each value
naming its source), measured by an earlier run (:func:`measured_throughput`) or given by the
user (``--throughput STAGE=UNITS_PER_S``, :func:`parse_throughput`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agriland_scale.errors import ConfigError, OutputError
from agriland_scale.layout import RECORD

__all__ = [
    "DEFAULT_THROUGHPUT",
    "DEFAULT_WORKERS",
    "PARALLEL",
    "UNITS",
    "measured_throughput",
    "parse_throughput",
]

# what a stage's work is counted in (its "px"), for --throughput and the plan's table
UNITS: dict[str, str] = {
    "cube": "source px (grid px x dates x bands read)",
    "patches": "grid px",
    "cae": "training px (epochs x steps x batch x patch px)",
    "embeddings": "patch px (patches x patch px)",
    "clusters": "patch px (patches x patch px)",
    "unet": "training px (epochs x steps x batch x window px)",
    "segmentation": "grid px",
    "publish": "grid px",
}
# stages whose work is spread over the workers' tasks (the others: one task, or the client)
PARALLEL = ("cube", "patches", "embeddings", "segmentation")

# Built-in throughput, units of UNITS a second, measured on this machine: 2 CPU cores, one
# Dask worker of 2 threads (the benchmarks' LocalCluster); "workers" is that worker count.
DEFAULT_THROUGHPUT: dict[str, dict[str, Any]] = {
    "cube": {
        # 18,275,501 source px x dates / s with 4 bands (4x region, local files)
        "value": 18_275_501 * 4,
        "source": "bench/results/cube.txt (4x region, local COGs; warm builds)",
    },
    "patches": {
        "value": 3_748_047 / 0.44,
        "source": "bench/results/run.json (scaling 4x: 3,748,047 px in 0.44 s)",
    },
    "cae": {
        # a training step of 8 patches of 256 px costs about 30 CPU-seconds: 15 s on 2 cores
        "value": 8 * 256**2 / 15.0,
        "source": "README.md (a CAE training step of 8 patches: about 30 CPU-seconds on 2 cores)",
    },
    "embeddings": {
        "value": 13.98 * 256**2,
        "source": "bench/results/embed.txt (13.98 patches/s of 256 px, head gap)",
    },
    "clusters": {
        "value": 200_000 * 256**2 / 5.6,
        "source": "bench/results/cluster.txt (200,000 patches in 5.6 s, k 20)",
    },
    "unet": {
        "value": 8 * 6 * 8 * 256**2 / 149.0,
        "source": "bench/results/unet_variants.txt (plain U-Net, 8 epochs x 6 steps x 8 windows in 149 s)",
    },
    "segmentation": {
        "value": 379_643.0,
        "source": "bench/results/windows.txt (inference_window auto, float32)",
    },
    "publish": {
        "value": 3_748_047 / 4.73,
        "source": "bench/results/run.json (scaling 4x: 3,748,047 px in 4.73 s)",
    },
}
DEFAULT_WORKERS = 1  # the benchmarks' worker count
# a training measured on fewer steps is not used: its time is mostly building the model
MIN_MEASURED_STEPS = 20


def parse_throughput(pairs: Iterable[str] | None) -> dict[str, float]:
    """Parse ``--throughput STAGE=UNITS_PER_S`` pairs (e.g. ``segmentation=400000``).

    Raises
    ------
    ConfigError
        A pair that is not STAGE=NUMBER with a known stage and a positive number.
    """
    out: dict[str, float] = {}
    for p in pairs or []:
        stage, eq, value = p.partition("=")
        stage = stage.strip()
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if not eq or stage not in UNITS or not v > 0 or not math.isfinite(v):
            raise ConfigError(
                f"--throughput {p[:100]!r}: write STAGE=PX_PER_S with STAGE one of {', '.join(UNITS)} and a "
                "positive number, e.g. --throughput segmentation=400000"
            )
        out[stage] = v
    return out


def measured_throughput(run: Path) -> dict[str, dict[str, Any]]:
    """Throughput of each stage (:data:`UNITS` a second) measured by an earlier run in ``run``.

    From its ``run.json``: the stage timings, its zones' shapes, patches, dates, bands and
    training schedules; the stages it did not time (or whose model was given) are left out.

    Raises
    ------
    OutputError
        No readable ``run.json`` in ``run``.
    """
    path = Path(run) / RECORD
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OutputError(
            f"--measured {run}: no readable {RECORD} there ({type(err).__name__}: {err}); give the folder "
            "of an earlier run on this machine"
        ) from None
    cfg = rec.get("config") or {}
    timings = rec.get("timings_s") or {}
    zones = rec.get("zones") or {}
    runtime = cfg.get("runtime") or {}
    workers = int(runtime.get("n_workers") or 1)
    bands = len((cfg.get("cube") or {}).get("bands") or []) or 4
    dates = len({str(i.get("datetime"))[:10] for i in (rec.get("inputs") or {}).get("items") or []}) or 1
    px = sum(int(z["shape"]["y"]) * int(z["shape"]["x"]) for z in zones.values() if "shape" in z)
    n = int((rec.get("patches") or {}).get("count") or 0)
    size = int((cfg.get("patches") or {}).get("size") or 256)
    work: dict[str, float] = {
        "cube": float(px * dates * bands),
        "patches": float(px),
        "embeddings": float(n * size**2),
        "clusters": float(n * size**2),
        "segmentation": float(px),
        "publish": float(px),
    }
    for stage in ("cae", "unet"):
        m = rec.get(stage) or {}
        steps = int(m.get("epochs") or 0) * int(m.get("steps_per_epoch") or 0)
        # a schedule of a few steps times mostly the model's build and tracing: not a rate
        if not m.get("given") and steps >= MIN_MEASURED_STEPS:
            work[stage] = float(m["epochs"] * m["steps_per_epoch"] * m["batch_size"] * m["patch_size"] ** 2)
            # the training task's own seconds (the stage also waits for the worker)
            timings = {**timings, stage: m.get("seconds") or timings.get(stage)}
    out = {}
    for stage, units in work.items():
        sec = timings.get(stage)
        if units > 0 and sec and sec > 0 and (rec.get("stages") or {}).get(stage) == "done":
            out[stage] = {
                "value": units / float(sec),
                "source": f"measured: {path} ({units:,.0f} units in {float(sec):.1f} s)",
                "workers": workers,
                "units": units,
            }
    return out
