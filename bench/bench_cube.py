"""Cube-building benchmark: our masked, composited, Zarr-written cube vs plain odc-stac.

Prints, from one run on this machine:

- throughput (pixels/s) of ``load_cube(encoded=True)`` + ``write_group`` (what the cube
  stage writes: scale/offset, nodata and cloud masking, median composite over T dates,
  packed int16 reflectance, Zarr v3 on disk) against a plain
  ``odc.stac.load(...).compute()`` of the same items, bands, grid, resampling and chunks as
  the ``odc.stac.load`` call inside ``load_cube`` (ratio; goal >= 0.9), and the same without
  the Zarr write (``ours_in_memory``);
- the same ratio from ``--pairs`` builds of ``ours`` and ``plain`` alternated one by one
  in one process (the median of the per-pair ratios): on a shared machine whose speed
  drifts from second to second, a pair sees the same conditions, where modes measured in
  separate processes a few seconds apart may not;
- peak RSS of building the cube of a region and of a region 4x larger (ratio; goal <= 1.2),
  each a single build in a fresh process.

Fairness: every mode runs on the same Dask LocalCluster (1 worker x 2 threads, in process);
each measuring process first builds once untimed (file cache, GDAL and imports warm; that
build gives its peak RSS), then times ``--repeat`` builds; the modes' processes alternate
over ``--rounds`` rounds, and the reported time is the median of all timed builds. CPU time
(user + system, all threads) is recorded too: on a shared machine it varies less than wall
time.

Data: the real Sentinel-2 L1C Virginia sample (``../shared/data/s2-l1c-virginia``, 1933 x
1947 px at 10 m) when present, else the embedded 1024 x 1024 demo window. The scene is
registered under T nominal dates (same pixels) so that the composite has T observations to
reduce; the served catalogue is a real local STAC API. With ``--assets http`` the COGs are
read over HTTP from a range-request server on 127.0.0.1 (GDAL's /vsicurl/, as from a public
bucket but without the network's latency), in both modes; by default they are local files.
Run:

    nice -n 5 python bench/bench_cube.py [--dates 4] [--pairs 20] [--assets file|http] [--json bench/results/cube.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "s2-l1c-virginia"
BANDS = ["red", "green", "blue", "nir"]


def serve_files(root: Path):
    """A threaded HTTP server on 127.0.0.1 serving ``root`` with byte-range requests (what
    GDAL's /vsicurl/ asks of a COG); returns the server (``.server_address``, ``.shutdown()``)."""
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):  # quiet
            pass

        def send_head(self):
            rng = self.headers.get("Range")
            path = Path(self.translate_path(self.path))
            if not rng or not path.is_file():
                return super().send_head()
            size = path.stat().st_size
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start = int(start_s) if start_s else size - int(end_s)
            end = min(int(end_s) if (start_s and end_s) else size - 1, size - 1)
            f = path.open("rb")
            f.seek(start)
            self.send_response(206)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self._remaining = end - start + 1
            return f

        def copyfile(self, source, outputfile):
            n = getattr(self, "_remaining", None)
            if n is None:
                return super().copyfile(source, outputfile)
            outputfile.write(source.read(n))

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def make_catalog(dates: int, tmp: Path, base_url: str | None = None) -> tuple[Path, list[float], str]:
    """A local catalog with the sample scene under ``dates`` nominal dates; returns folder,
    its lon/lat bbox and a description of the source. With ``base_url`` the asset hrefs
    point at that HTTP server (serving the source folder) instead of the files."""
    if (SHARED / "item.json").exists():
        src, what = SHARED, "s2-l1c-virginia full sample (1933 x 1947 px)"
    else:
        src, what = REPO / "agriland_scale" / "data" / "virginia", "embedded 1024 x 1024 window"
    item = json.loads((src / "item.json").read_text())
    coll = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": "bench",
        "description": "bench",
        "license": "various",
        "links": [],
        "extent": {"spatial": {"bbox": [item["bbox"]]}, "temporal": {"interval": [[None, None]]}},
    }
    (tmp / "collection.json").write_text(json.dumps(coll))
    for d in range(dates):
        it = json.loads(json.dumps(item))
        it["id"], it["collection"] = f"bench-{d}", "bench"
        it["properties"].update(datetime=f"2020-0{d % 9 + 1}-15T10:00:00Z")
        for k in ("start_datetime", "end_datetime"):
            it["properties"].pop(k, None)
        it["assets"] = {k: v for k, v in it["assets"].items() if k in BANDS}
        for a in it["assets"].values():
            name = Path(a["href"]).name
            a["href"] = f"{base_url}/{name}" if base_url else str((src / a["href"]).resolve())
        (tmp / f"item_{d}.json").write_text(json.dumps(it))
    return tmp, item["bbox"], what


def sub_bbox(bbox: list[float], frac: float) -> list[float]:
    """The top-left ``frac`` (side fraction) of a lon/lat bbox."""
    x0, y0, x1, y1 = bbox
    return [x0, y1 - (y1 - y0) * frac, x0 + (x1 - x0) * frac, y1]


def build(catalog: str, bbox: list[float], mode: str, out: str, repeat: int, time_chunk: int) -> dict:
    """Measure one mode (``ours`` | ``ours_in_memory`` | ``plain``) in this process: one
    untimed build (peak RSS), then ``repeat`` timed builds (wall and CPU seconds)."""
    import statistics
    import warnings

    import odc.stac
    from distributed import Client, LocalCluster

    from agriland_scale.config.schema import CubeConfig, SearchConfig
    from agriland_scale.cube.load import cube_geobox, load_cube, read_chunk
    from agriland_scale.search.items import normalize_items
    from agriland_scale.search.stac import local_stac_api, search_items
    from agriland_scale.store import write_group

    warnings.simplefilter("ignore")
    s = SearchConfig(api="local", catalog=catalog, collections=["bench"], bbox=tuple(bbox))
    with local_stac_api(catalog) as url:
        items = normalize_items(
            search_items(s, url), BANDS
        )  # once, as the cube stage does (normalized=True below)
    cfg = CubeConfig(bands=BANDS, resolution=10, chunk=512)
    gb = cube_geobox(items, bbox, 10)
    rc = read_chunk(cfg, len(items), len(BANDS))  # the chunks load_cube reads in (stored: cfg.chunk)

    def once(i: int, mode: str = mode) -> None:
        if mode == "ours":
            write_group(load_cube(items, cfg, bbox, normalized=True, encoded=True), f"{out}-{i}.zarr", "cube")
        elif mode == "ours_in_memory":
            load_cube(items, cfg, bbox, normalized=True).compute()
        else:  # what load_cube asks odc-stac for: same grid, resampling and (read) chunks
            ds = odc.stac.load(
                items,
                bands=BANDS,
                geobox=gb,
                groupby="solar_day",
                chunks={"time": time_chunk, "x": rc, "y": rc},
                resampling="bilinear",
                fail_on_error=True,
            )
            ds.compute()

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    wall, cpus = [], []
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as lc,
        Client(lc),
    ):
        if mode == "pairs":  # ours and plain alternated build by build: per-pair plain/ours
            once(0, "ours")
            once(0, "plain")
            pairs = []
            for i in range(1, repeat + 1):  # (ours, plain) seconds; who goes first alternates
                took = {}
                for m in ("ours", "plain")[:: 1 if i % 2 else -1]:
                    t0 = time.perf_counter()
                    once(i, m)
                    took[m] = time.perf_counter() - t0
                pairs.append((took["ours"], took["plain"]))
            return {
                "mode": mode,
                "pairs": pairs,
                "ratio": statistics.median(p / o for o, p in pairs),
                "pixels": int(gb.shape[0] * gb.shape[1]),
                "dates": len(items),
            }
        once(0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for i in range(1, repeat + 1):
            t0, c0 = time.perf_counter(), cpu()
            once(i)
            wall.append(time.perf_counter() - t0)
            cpus.append(cpu() - c0)
    return {
        "mode": mode,
        "seconds": statistics.median(wall),
        "cpu_seconds": statistics.median(cpus),
        "all_seconds": wall,
        "pixels": int(gb.shape[0] * gb.shape[1]),
        "dates": len(items),
        "peak_rss_mib": rss,
        "read_chunk": rc,
        "stored_chunk": cfg.chunk,
    }


def child(args: list[str]) -> dict:
    """Run :func:`build` in a fresh Python process (clean peak RSS)."""
    res = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    import statistics

    ap = argparse.ArgumentParser()
    ap.add_argument("--dates", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="timed builds per measuring process")
    ap.add_argument("--rounds", type=int, default=3, help="measuring processes per mode, alternating")
    ap.add_argument(
        "--plain-time-chunk",
        type=int,
        default=-1,
        help="time chunk of the plain load: the one load_cube asks odc-stac for (-1: all dates)",
    )
    ap.add_argument(
        "--assets",
        choices=("file", "http"),
        default="file",
        help="read the COGs as local files or over HTTP from a server on 127.0.0.1",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=20,
        help="builds of ours and plain alternated in one process (4x region; 0: none)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=6, metavar=("CATALOG", "BBOX", "MODE", "OUT", "REPEAT", "TIME_CHUNK"))
    a = ap.parse_args()
    if a.child:
        cat, bbox, mode, out, repeat, tc = a.child
        print(json.dumps(build(cat, json.loads(bbox), mode, out, int(repeat), int(tc))))
        return
    modes = ("ours", "ours_in_memory", "plain")
    srv = None
    if a.assets == "http":
        src = SHARED if (SHARED / "item.json").exists() else REPO / "agriland_scale" / "data" / "virginia"
        srv = serve_files(src)
        os.environ.update(
            GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
            CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif",
            GDAL_HTTP_MULTIRANGE="YES",
            GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES",
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = f"http://127.0.0.1:{srv.server_address[1]}" if srv else None
        cat, bbox, what = make_catalog(a.dates, tmp, base)
        small, large = sub_bbox(bbox, 0.5), sub_bbox(bbox, 1.0)
        runs = {}
        for label, bb in (("region", small), ("region_4x", large)):
            got: dict[str, list[dict]] = {m: [] for m in modes}
            for r in range(a.rounds):
                for mode in modes:
                    out = str(tmp / f"{label}-{mode}-{r}")
                    got[mode].append(
                        child([str(cat), json.dumps(bb), mode, out, str(a.repeat), str(a.plain_time_chunk)])
                    )
            for mode, res in got.items():
                wall = [t for x in res for t in x["all_seconds"]]
                runs[f"{label}/{mode}"] = {
                    "mode": mode,
                    "seconds": statistics.median(wall),
                    "cpu_seconds": statistics.median([x["cpu_seconds"] for x in res]),
                    "all_seconds": wall,
                    "pixels": res[0]["pixels"],
                    "dates": res[0]["dates"],
                    "peak_rss_mib": max(x["peak_rss_mib"] for x in res),
                    "read_chunk": res[0].get("read_chunk"),
                    "stored_chunk": res[0].get("stored_chunk"),
                }
        paired = None
        if a.pairs:
            paired = child(
                [
                    str(cat),
                    json.dumps(large),
                    "pairs",
                    str(tmp / "pairs"),
                    str(a.pairs),
                    str(a.plain_time_chunk),
                ]
            )
    big_o, big_p = runs["region_4x/ours"], runs["region_4x/plain"]
    thr_o = big_o["pixels"] * big_o["dates"] / big_o["seconds"]
    thr_p = big_p["pixels"] * big_p["dates"] / big_p["seconds"]
    mem = runs["region_4x/ours_in_memory"]
    thr_m = mem["pixels"] * mem["dates"] / mem["seconds"]
    cpu_ratio = big_p["cpu_seconds"] / big_o["cpu_seconds"]
    rss = runs["region_4x/ours"]["peak_rss_mib"] / runs["region/ours"]["peak_rss_mib"]
    if srv:
        srv.shutdown()
    result = {
        "source": what,
        "assets": a.assets,
        "dates": a.dates,
        "bands": BANDS,
        "repeat": a.repeat,
        "rounds": a.rounds,
        "dask": "LocalCluster 1 worker x 2 threads",
        "plain_chunks": {"time": a.plain_time_chunk, "x": big_p["read_chunk"], "y": big_p["read_chunk"]},
        "stored_chunk": big_o["stored_chunk"],
        "runs": runs,
        "throughput_px_per_s": {"ours": thr_o, "plain_odc_stac": thr_p},
        "throughput_ratio": thr_o / thr_p,
        "throughput_ratio_in_memory": thr_m / thr_p,
        "cpu_time_ratio": cpu_ratio,
        "peak_rss_mib": {
            "region": runs["region/ours"]["peak_rss_mib"],
            "region_4x": runs["region_4x/ours"]["peak_rss_mib"],
        },
        "peak_rss_ratio_4x": rss,
        "paired": paired,
    }
    print(
        f"source: {what} ({'over HTTP from 127.0.0.1' if srv else 'local files'}), "
        f"{a.dates} dates x {len(BANDS)} bands, LocalCluster 1 worker x 2 threads, "
        f"median of {a.rounds} x {a.repeat} warm builds"
    )
    for k, v in runs.items():
        print(
            f"  {k:<26} {v['pixels']:>10,} px  {v['seconds']:6.2f} s  (cpu {v['cpu_seconds']:6.2f} s)  "
            f"peak RSS {v['peak_rss_mib']:7.0f} MiB"
        )
    print(
        f"throughput (4x region, source pixels x dates / s): ours {thr_o:,.0f}, plain odc-stac "
        f"{thr_p:,.0f} -> ratio {thr_o / thr_p:.2f} (goal >= 0.9)"
    )
    print(f"  without writing the Zarr store (masking + compositing only): ratio {thr_m / thr_p:.2f}")
    if paired:
        o = statistics.median(x[0] for x in paired["pairs"])
        p = statistics.median(x[1] for x in paired["pairs"])
        print(
            f"  alternated build by build in one process ({len(paired['pairs'])} pairs, 4x region): ours "
            f"{o:.2f} s, plain {p:.2f} s; median of the per-pair ratios {paired['ratio']:.2f} (goal >= 0.9)"
        )
    print(f"  CPU time, plain / ours (with the Zarr write): {cpu_ratio:.2f}")
    print(
        f"peak RSS ours: region {result['peak_rss_mib']['region']:.0f} MiB, 4x region "
        f"{result['peak_rss_mib']['region_4x']:.0f} MiB -> ratio {rss:.2f} (goal <= 1.2)"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
