"""Whole-run benchmark: scaling with area, workers, resume overhead, stage efficiency, graph size.

Prints, from one run on this machine (and saves as JSON):

- **scaling**: wall time and peak RSS (the ``agriland`` process and its Dask worker
  processes, sampled every 0.2 s) of ``agriland run`` on regions of about 1x, 2x and 4x
  the demo area, cut from the real Sentinel-2 L1C Virginia sample around the demo window.
  Training schedules are fixed (same steps whatever the area), so the stages that grow with
  area are cube, patches, embeddings, segmentation and publish; the exponent ``b`` of
  ``time ~ area^b`` is fitted on the 1x..4x points for the whole run and for those stages;
- **workers**: the 1x region with 1 worker x 2 threads against 2 workers x 1 thread;
- **resume overhead**: ``agriland run`` again on the finished 1x run (wall time, whole CLI);
- **efficiency**: the embeddings and segmentation stages of the 1x run against the same
  models' plain ``predict`` on the same patches / windows already in memory, in this
  process, with the same batch size and TensorFlow threads (ratio = predict time / stage
  time; goal >= 0.9);
- **graph size** for a full 110 x 110 km Sentinel-2 tile (10980 x 10980 px at 10 m, one
  date, 4 bands): tasks in the cube, embeddings and segmentation graphs, built lazily from
  an item describing such a tile (no pixel is read).

Needs ``../shared/data/s2-l1c-virginia`` (the full sample). Run:

    nice -n 5 python bench/bench_run.py [--json bench/results/run.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "s2-l1c-virginia"
BANDS = ["red", "green", "blue", "nir"]
# the sample's grid (EPSG:32618) and the demo window's centre in its pixels
X0, Y0, RES, W, H = 435730.0, 4179460.0, 10.0, 1933, 1947
CX, CY = 768, 1024
SCHEDULE = {  # fixed, short training: the same work whatever the area
    "embed.train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "learning_rate": 0.001},
    "cluster.dec": {"max_iter": 300, "update_interval": 50},
    "segment.train": {
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.001,
        "augment_factor": 1,
        "patience": 3,
        "validation": "west",
        "validation_fraction": 0.3,
    },
    "runtime.dashboard_address": ":0",
}


def catalog(tmp: Path) -> Path:
    item = json.loads((SHARED / "item.json").read_text())
    coll = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": "bench-run",
        "description": "bench",
        "license": "various",
        "links": [],
        "extent": {"spatial": {"bbox": [item["bbox"]]}, "temporal": {"interval": [[None, None]]}},
    }
    (tmp / "collection.json").write_text(json.dumps(coll))
    item["collection"] = "bench-run"
    item["assets"] = {k: v for k, v in item["assets"].items() if k in BANDS}
    for a in item["assets"].values():
        a["href"] = str((SHARED / a["href"]).resolve())
    (tmp / "item.json").write_text(json.dumps(item))
    return tmp


def region_bbox(side: int | None) -> list[float]:
    """Lon/lat bbox of a ``side`` px square centred on the demo window (``None``: whole sample),
    shrunk by 2 px so that its UTM bounding box stays inside the requested square."""
    from pyproj import Transformer

    if side is None:
        c0, r0, c1, r1 = 0, 0, W, H
    else:
        c0, r0 = max(CX - side // 2, 0), max(CY - side // 2, 0)
        c1, r1 = min(c0 + side, W), min(r0 + side, H)
    t = Transformer.from_crs(32618, 4326, always_xy=True)
    xs = [X0 + RES * (c0 + 2), X0 + RES * (c1 - 2)]
    ys = [Y0 - RES * (r1 - 2), Y0 - RES * (r0 + 2)]
    lon, lat = t.transform([xs[0], xs[1], xs[1], xs[0]], [ys[0], ys[0], ys[1], ys[1]])
    # the largest lon/lat box inside the UTM square
    return [
        round(max(lon[0], lon[3]), 6),
        round(max(lat[0], lat[1]), 6),
        round(min(lon[1], lon[2]), 6),
        round(min(lat[2], lat[3]), 6),
    ]


def pipeline(tmp: Path, cat: Path, bbox: list[float], name: str, **extra) -> Path:
    import yaml

    from agriland_scale.config.load import load_config

    cfg = load_config(REPO / "agriland_scale" / "data" / "demo.yaml").with_overrides(
        **SCHEDULE,
        **{
            "name": name,
            "search.catalog": str(cat),
            "search.collections": ["bench-run"],
            "search.bbox": bbox,
            "search.datetime": None,
            "search.max_cloud_cover": None,
        },
        **extra,
    )
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return p


def tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def agriland(pipe: Path, out: Path) -> dict:
    """Run the CLI; wall seconds, peak RSS of its process tree, and the run's stage timings."""
    import psutil

    cmd = [str(Path(sys.executable).parent / "agriland"), "run", str(pipe), "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak = psutil.Process(proc.pid), [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.2)

    th = threading.Thread(target=sample)
    th.start()
    output = proc.communicate()[0]
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"agriland run failed:\n{output[-3000:]}")
    rec = json.loads((out / "run.json").read_text())
    shape = rec["cube"]["shape"]
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak[0] / 2**20),
        "pixels": shape["y"] * shape["x"],
        "timings_s": {k: round(v, 2) for k, v in rec["timings_s"].items()},
        "patches": rec["patches"]["count"],
    }


def fit_exponent(areas: list[float], times: list[float]) -> float:
    import numpy as np

    return float(np.polyfit(np.log(areas), np.log(times), 1)[0])


def efficiency(out: Path) -> dict:
    """Plain ``predict`` on the run's patches / windows in memory vs the run's stage times."""
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")
    import numpy as np

    from agriland_scale.config.bands import reflectance_scale
    from agriland_scale.models import worker as _worker
    from agriland_scale.patches import read_patches, window_starts
    from agriland_scale.store import open_cube, open_product, reader

    rec = json.loads((out / "run.json").read_text())
    cfg = rec["config"]
    store = reader(out)
    cube = open_cube(store, dask=False)
    index = open_product(store, "patches").load()
    valid = index["valid_fraction"].values >= cfg["patches"]["min_valid_fraction"]
    e = cfg["embed"]
    x = read_patches(
        cube["reflectance"],
        index["y0"].values[valid],
        index["x0"].values[valid],
        cfg["patches"]["size"],
        e["bands"],
        e["reflectance_max"],
    )
    enc, _ = _worker.get_model(rec["cae"]["encoder_path"])
    enc.predict(x[: e["batch_size"]], batch_size=e["batch_size"], verbose=0)  # warm up
    t0 = time.perf_counter()
    enc.predict(x, batch_size=e["batch_size"], verbose=0)
    t_embed = time.perf_counter() - t0
    s = cfg["segment"]
    H, W = cube.sizes["y"], cube.sizes["x"]
    stride, off = s["window"] - s["overlap"], s["overlap"] // 2
    rs, cs = window_starts(H, s["window"], stride, off), window_starts(W, s["window"], stride, off)
    refl = np.nan_to_num(cube["reflectance"].sel(band=s["bands"]).values)
    pad = np.zeros((len(s["bands"]), H + 2 * s["window"], W + 2 * s["window"]), dtype="float32")
    pad[:, s["window"] : s["window"] + H, s["window"] : s["window"] + W] = refl
    wins = np.stack(
        [
            np.moveaxis(
                pad[:, r + s["window"] : r + 2 * s["window"], c + s["window"] : c + 2 * s["window"]], 0, -1
            )
            for r in rs
            for c in cs
        ]
    )
    scale = np.asarray(reflectance_scale(s["reflectance_max"], s["bands"]), dtype="float32")  # one a band
    wins = np.clip(wins / scale, 0, 1)
    unet, _ = _worker.get_model(rec["unet"]["model_path"])
    unet.predict(wins[: s["batch_size"]], batch_size=s["batch_size"], verbose=0)
    t0 = time.perf_counter()
    unet.predict(wins, batch_size=s["batch_size"], verbose=0)
    t_seg = time.perf_counter() - t0
    st = rec["timings_s"]
    return {
        "patches": int(valid.sum()),
        "embed_predict_s": round(t_embed, 2),
        "embed_stage_s": round(st["embeddings"], 2),
        "embed_ratio": round(t_embed / st["embeddings"], 3),
        "windows": len(wins),
        "segment_predict_s": round(t_seg, 2),
        "segment_stage_s": round(st["segmentation"], 2),
        "segment_ratio": round(t_seg / st["segmentation"], 3),
    }


def graph_size(tmp: Path, encoder: str, unet: str) -> dict:
    """Task counts for a full 10980 x 10980 px tile, built lazily (nothing is read)."""
    import numpy as np
    import pystac
    import xarray as xr
    from pyproj import Transformer

    from agriland_scale import load_config
    from agriland_scale.cube.load import load_cube
    from agriland_scale.models.embed import embed_patches
    from agriland_scale.models.segment import segment_region
    from agriland_scale.patches import patch_grid

    item = json.loads((tmp / "cat" / "item.json").read_text())
    tx0, ty0, n = 399960.0, 4200000.0, 10980
    for a in item["assets"].values():
        a["proj:shape"], a["proj:transform"] = [n, n], [10.0, 0.0, tx0, 0.0, -10.0, ty0]
    t = Transformer.from_crs(32618, 4326, always_xy=True)
    lon, lat = t.transform([tx0, tx0 + 10 * n], [ty0 - 10 * n, ty0])
    item["bbox"] = [lon[0], lat[0], lon[1], lat[1]]
    item["properties"]["proj:epsg"] = 32618
    cfg = load_config(REPO / "agriland_scale" / "data" / "demo.yaml")
    t0 = time.perf_counter()
    inner = Transformer.from_crs(32618, 4326, always_xy=True)
    lo, la = inner.transform([tx0 + 100, tx0 + 10 * n - 100], [ty0 - 10 * n + 100, ty0 - 100])
    cube = load_cube([pystac.Item.from_dict(item)], cfg.cube, [lo[0], la[0], lo[1], la[1]])
    t_cube = time.perf_counter() - t0
    hh, ww = cube.sizes["y"], cube.sizes["x"]
    rows, cols = patch_grid(hh, ww, cfg.patches.size, cfg.patches.stride)
    y0, x0 = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
    index = xr.Dataset(
        {
            "y0": ("patch", y0),
            "x0": ("patch", x0),
            "valid_fraction": ("patch", np.ones(len(y0), dtype="float32")),
        },
        coords={"patch": np.arange(len(y0))},
        attrs={"patch_size": cfg.patches.size, "stride": cfg.patches.stride},
    )
    emb = embed_patches(
        encoder,
        "unused.zarr",
        index,
        cfg.embed.bands,
        cfg.embed.reflectance_max,
        batch_size=cfg.embed.batch_size,
        min_valid_fraction=0.5,
    )
    seg = segment_region(
        unet,
        "unused.zarr",
        cube,
        cfg.segment.bands,
        window=cfg.segment.window,
        overlap=cfg.segment.overlap,
        reflectance_max=cfg.segment.reflectance_max,
        threshold=0.5,
        batch_size=cfg.segment.batch_size,
    )
    return {
        "tile_px": [hh, ww],
        "chunk": cfg.cube.chunk,
        "cube_tasks": len(cube.__dask_graph__()),
        "cube_graph_build_s": round(t_cube, 2),
        "patches": len(y0),
        "embeddings_tasks": len(emb.__dask_graph__()),
        "segmentation_tasks": len(seg.__dask_graph__()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "run.json")
    ap.add_argument("--keep", type=Path, help="keep the run folders here")
    args = ap.parse_args()
    if not (SHARED / "item.json").exists():
        raise SystemExit(f"needs the full Virginia sample at {SHARED}")
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench-run-"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cat").mkdir(exist_ok=True)
    cat = catalog((tmp / "cat").resolve())
    res: dict = {"machine": f"{os.cpu_count()} cores", "scaling": {}, "workers": {}}
    for label, side in (("1x", 970), ("2x", 1372), ("4x", None)):
        out = tmp / f"run_{label}"
        shutil.rmtree(out, ignore_errors=True)
        r = agriland(pipeline(tmp, cat, region_bbox(side), f"bench-{label}"), out)
        res["scaling"][label] = r
        print(
            f"{label}: {r['pixels']:,} px, {r['patches']} patches: wall {r['wall_s']} s, peak RSS "
            f"{r['peak_rss_mib']} MiB; stages {r['timings_s']}",
            flush=True,
        )
    sc = res["scaling"]
    areas = [sc[k]["pixels"] for k in ("1x", "2x", "4x")]
    grow = ("cube", "patches", "embeddings", "segmentation", "publish")
    res["exponent_total"] = round(fit_exponent(areas, [sc[k]["timings_s"]["total"] for k in sc]), 3)
    res["exponent_area_stages"] = round(
        fit_exponent(areas, [sum(sc[k]["timings_s"][s] for s in grow) for k in sc]), 3
    )
    res["rss_ratio_4x_1x"] = round(sc["4x"]["peak_rss_mib"] / sc["1x"]["peak_rss_mib"], 3)
    res["area_ratio_4x_1x"] = round(areas[2] / areas[0], 3)
    print(
        f"time ~ area^b: b = {res['exponent_total']} (whole run), {res['exponent_area_stages']} "
        f"(cube+patches+embeddings+segmentation+publish); area 4x/1x = {res['area_ratio_4x_1x']}; "
        f"peak RSS 4x/1x = {res['rss_ratio_4x_1x']} (goal <= 1.2)",
        flush=True,
    )

    again = agriland(pipeline(tmp, cat, region_bbox(970), "bench-1x"), tmp / "run_1x")
    res["resume_overhead_s"] = again["wall_s"]
    res["resume_in_run_s"] = again["timings_s"]["total"]
    print(
        f"rerun of the finished 1x run: {again['wall_s']} s wall for the whole CLI "
        f"({again['timings_s']['total']} s inside the run)",
        flush=True,
    )

    for label, (nw, nt) in {"1 worker x 2 threads": (1, 2), "2 workers x 1 thread": (2, 1)}.items():
        out = tmp / f"workers_{nw}"
        shutil.rmtree(out, ignore_errors=True)
        r = agriland(
            pipeline(
                tmp,
                cat,
                region_bbox(970),
                f"bench-w{nw}",
                **{"runtime.n_workers": nw, "runtime.threads_per_worker": nt},
            ),
            out,
        )
        res["workers"][label] = r
        print(f"{label}: wall {r['wall_s']} s; stages {r['timings_s']}", flush=True)

    res["efficiency"] = efficiency(tmp / "run_1x")
    ef = res["efficiency"]
    print(
        f"embeddings: stage {ef['embed_stage_s']} s vs plain predict {ef['embed_predict_s']} s on "
        f"{ef['patches']} patches -> ratio {ef['embed_ratio']}; segmentation: stage "
        f"{ef['segment_stage_s']} s vs plain predict {ef['segment_predict_s']} s on {ef['windows']} "
        f"windows -> ratio {ef['segment_ratio']} (goal >= 0.9)",
        flush=True,
    )
    rec = json.loads((tmp / "run_1x" / "run.json").read_text())
    res["graph_full_tile"] = graph_size(tmp, rec["cae"]["encoder_path"], rec["unet"]["model_path"])
    g = res["graph_full_tile"]
    print(
        f"full tile {g['tile_px']} px, chunk {g['chunk']}: cube graph {g['cube_tasks']:,} tasks "
        f"(built in {g['cube_graph_build_s']} s), embeddings {g['embeddings_tasks']:,} tasks for "
        f"{g['patches']:,} patches, segmentation {g['segmentation_tasks']:,} tasks",
        flush=True,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
