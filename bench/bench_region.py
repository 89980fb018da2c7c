"""Region-scale benchmark: what planning each stage costs for N full-size tiles, and real runs.

Data: synthetic regions of N adjacent Sentinel-2-size tiles (10980 x 10980 px at 10 m, 109.8
km apart, a near-square grid in UTM 18N, EPSG:32618, like the sample) x 4 dates x the bands
the demo pipeline's cube reads (red, green, blue, nir; the demo's items are L1C, so
``cube.cloud_mask: auto`` adds no SCL band). Built honestly from the real Sentinel-2 L1C
Virginia sample (``../shared/data/s2-l1c-virginia``): one real 10980 x 10980 uint16 GeoTIFF
a band (512 px tiles, deflate + predictor 2, internal overviews: COG-like), made by
mirroring the sample's pixels around it (the sample sits at its true place in the first
tile), cached and reused; then per tile, date and band a small GDAL VRT with the tile's
own geotransform pointing at that file, and per tile and date a STAC item (the sample's
asset keys and metadata, ``proj:epsg``/``proj:code``, ``proj:shape``, ``proj:transform``,
lon/lat bbox and geometry, datetime, ``eo:cloud_cover``) whose assets are the VRTs. Every
asset's georeferencing is real: the cube stage's ``check_assets`` opens each VRT and
compares its CRS, size and transform with the item's (and decodes two blocks).
All dates of a tile hold the same pixels (the composite still reads every date).

Measured (``--tiles``, default 1, 10, 100), each stage in a fresh child process (clean RSS),
against the targets of issue 32 (at 100 tiles: every stage planned and submitted in <= 60 s
of client CPU in all, client RSS <= 2 GB, scheduler RSS <= 2 GB, tasks linear in tiles):

- **search**: the local STAC API (``local_stac_api``, rustac) searched for the region;
- **check_assets**: the cube stage's probe of every asset (a header and two blocks each);
- **cube graph**: ``load_zone_cubes`` as the cube stage calls it (tasks, client CPU and wall);
- **patches**: ``patch_index`` on the stored cube's metadata (its Dask ``clear_count`` in
  stored chunks, as ``open_cube`` gives it to the patches stage);
- **embeddings graph**: ``embed_patches`` on the patch grid (every patch valid; as
  ``bench_run.graph_size``), reading from an Icechunk store as the run does;
- **segmentation graph**: ``segment_region`` on the stored cube's grid;
- **write planning** of the cube, embeddings and segmentation products: the stage's
  ``Products.write_together`` (or, in older code, ``write_blocks``) call for one zone,
  black-box, up to submission: a separate ``dask scheduler`` process with NO worker, a
  ``distributed.Client`` connected to it, the write in a daemon thread, the scheduler's
  task count polled until it stops growing (with waves of ``runtime.wave_tasks``: the first
  wave, since no block ever finishes to make room for the next); recorded: client
  CPU (``time.process_time``, the whole client process) and wall until the last growth,
  scheduler tasks, scheduler RSS (psutil), client RSS (now and peak, sampled every 0.1 s).
  The patches stage's ``client.compute`` is measured the same way.

Each child has a wall-clock limit (``--timeout``) and a memory limit on its process tree
(``--max-rss-gb``, the scheduler included); a child past either is killed and its stage is
recorded as ``timed out`` / ``killed: memory``, not waited for.

With ``--run``: the demo pipeline run for real (``agriland run``) on regions of
``--run-tiles`` tiles (default 1 and 2) of ``--tile-px`` px (default 10980; e.g. 2048 for a
quick run), served by ``local_stac_api``, with trained models given (``embed.model``,
``segment.model``: no training; ``--models DIR`` holding ``encoder.keras`` and
``unet.keras``, else the demo is trained once on its small embedded window with a short
schedule and the models are cached) and ``segment.labels`` unset (labels only annotate the
product when a model is given). Recorded: wall time per stage (the run's ``timings_s``), the
peak RSS of the client process and of each worker process (the process tree sampled every
0.5 s), the store's size and object count, the COGs' size.

Run:

    nice -n 5 python bench/bench_region.py [--tiles 1,10,100] [--run --tile-px 2048] [--json bench/results/region.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "s2-l1c-virginia"
DEMO = REPO / "agriland_scale" / "data" / "demo.yaml"
EPSG, RES, FULL = 32618, 10.0, 10980
# a full tile's top-left corner (the MGRS grid's tile holding the sample), and the sample's
SAMPLE_X0, SAMPLE_Y0 = 435730.0, 4179460.0
FULL_X0, FULL_Y0 = 399960.0, 4200000.0
DATES = ["2020-05-15", "2020-06-14", "2020-07-14", "2020-08-13", "2020-09-12", "2020-10-12"]
CLOUD = [0.0, 3.5, 7.0, 1.2, 4.4, 9.1]
STAGES = ("cube", "patches", "embeddings", "segmentation")
SCHEDULE = {  # training the models once, when none is given: short, as bench_run's
    "embed.train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "learning_rate": 0.001},
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


def cube_bands() -> list[str]:
    from agriland_scale import load_config

    return list(load_config(DEMO).cube.bands)


# -- synthetic data ------------------------------------------------------------------------
def tile_origin(tile_px: int) -> tuple[float, float]:
    """Top-left corner of the first tile: a full tile's MGRS-like corner, else the sample's."""
    return (FULL_X0, FULL_Y0) if tile_px >= FULL else (SAMPLE_X0, SAMPLE_Y0)


def mirrored(n: int, offset: int, size: int):
    """Indices 0..size-1 of ``n`` positions, ``offset`` being index 0, mirrored at the edges."""
    import numpy as np

    m = np.mod(np.arange(n) - offset, 2 * size)
    return np.where(m >= size, 2 * size - 1 - m, m)


def build_cogs(cache: Path, tile_px: int, bands: list[str]) -> dict[str, Path]:
    """One tiled, compressed ``tile_px``² GeoTIFF a band (cached): the sample's pixels, mirrored."""
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    item = json.loads((SHARED / "item.json").read_text())
    folder = cache / f"cog-{tile_px}"
    folder.mkdir(parents=True, exist_ok=True)
    ox, oy = tile_origin(tile_px)
    roff, coff = round((oy - SAMPLE_Y0) / RES), round((SAMPLE_X0 - ox) / RES)
    out = {}
    for band in bands:
        path = folder / f"{band}.tif"
        out[band] = path
        if path.exists() and (folder / f"{band}.done").exists():
            continue
        t0 = time.perf_counter()
        with rasterio.open(SHARED / item["assets"][band]["href"]) as src:
            a = src.read(1)
            nodata = src.nodata
        h, w = a.shape
        big = a[np.ix_(mirrored(tile_px, roff, h), mirrored(tile_px, coff, w))]
        block = 512 if tile_px >= 1024 else 256
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=tile_px,
            height=tile_px,
            count=1,
            dtype=big.dtype,
            crs=f"EPSG:{EPSG}",
            transform=from_origin(ox, oy, RES, RES),
            nodata=nodata,
            tiled=True,
            blockxsize=block,
            blockysize=block,
            compress="deflate",
            predictor=2,
            BIGTIFF="IF_SAFER",
            NUM_THREADS="2",
        ) as dst:
            dst.write(big, 1)
            levels = [f for f in (2, 4, 8, 16, 32) if tile_px // f >= 256]
            if levels:
                dst.build_overviews(levels, Resampling.average)
                dst.update_tags(ns="rio_overview", resampling="average")
        del big
        (folder / f"{band}.done").write_text("")
        print(
            f"  built {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return out


def vrt_xml(cog: Path, tile_px: int, x0: float, y0: float, wkt: str, nodata, block: int) -> str:
    """A GDAL VRT of the whole ``cog`` placed with its top-left corner at (x0, y0)."""
    nd = f"    <NoDataValue>{nodata:g}</NoDataValue>\n" if nodata is not None else ""
    return (
        f'<VRTDataset rasterXSize="{tile_px}" rasterYSize="{tile_px}">\n'
        f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(wkt)}</SRS>\n'
        f"  <GeoTransform>{x0:.1f}, {RES:.1f}, 0.0, {y0:.1f}, 0.0, {-RES:.1f}</GeoTransform>\n"
        f'  <VRTRasterBand dataType="UInt16" band="1" blockXSize="{block}" blockYSize="{block}">\n'
        f"{nd}"
        "    <SimpleSource>\n"
        f'      <SourceFilename relativeToVRT="0">{escape(str(cog))}</SourceFilename>\n'
        "      <SourceBand>1</SourceBand>\n"
        f'      <SourceProperties RasterXSize="{tile_px}" RasterYSize="{tile_px}" DataType="UInt16" '
        f'BlockXSize="{block}" BlockYSize="{block}" />\n'
        f'      <SrcRect xOff="0" yOff="0" xSize="{tile_px}" ySize="{tile_px}" />\n'
        f'      <DstRect xOff="0" yOff="0" xSize="{tile_px}" ySize="{tile_px}" />\n'
        "    </SimpleSource>\n"
        "  </VRTRasterBand>\n"
        "</VRTDataset>\n"
    )


def grid_shape(n: int) -> tuple[int, int]:
    """Rows x columns of ``n`` tiles: the most square exact rectangle (10: 2 x 5, 100: 10 x 10),
    else a near-square one filled row by row (7: 3 x 3, its last row short)."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    if rows > 1 or n <= 3:
        return rows, n // rows
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def build_catalog(
    cache: Path, n: int, tile_px: int, dates: int, bands: list[str]
) -> tuple[Path, list[float]]:
    """A local STAC catalogue of ``n`` tiles x ``dates`` (cached); returns it and its lon/lat bbox."""
    import rasterio
    from pyproj import Transformer

    cogs = build_cogs(cache, tile_px, bands)
    rows, cols = grid_shape(n)
    ox, oy = tile_origin(tile_px)
    side = tile_px * RES
    to_ll = Transformer.from_crs(EPSG, 4326, always_xy=True)
    bbox = [
        round(v, 6)
        for v in to_ll.transform_bounds(ox, oy - rows * side, ox + cols * side, oy, densify_pts=51)
    ]
    folder = cache / f"cat-{tile_px}-{n}x{dates}-{rows}x{cols}"
    if (folder / "done.json").exists():
        return folder, json.loads((folder / "done.json").read_text())["bbox"]
    (folder / "vrt").mkdir(parents=True, exist_ok=True)
    for old in folder.glob("item_*.json"):
        old.unlink()
    sample = json.loads((SHARED / "item.json").read_text())
    wkt = rasterio.crs.CRS.from_epsg(EPSG).to_wkt()
    nodata = {}
    block = {}
    for b, p in cogs.items():
        with rasterio.open(p) as src:
            nodata[b], block[b] = src.nodata, src.block_shapes[0][0]
    coll = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": "bench-region",
        "description": f"synthetic region: {n} tile(s) of {tile_px} px x {dates} date(s), from the Virginia sample",
        "license": "various",
        "links": [],
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [[None, None]]}},
    }
    (folder / "collection.json").write_text(json.dumps(coll))
    exts = sample["stac_extensions"] + ["https://stac-extensions.github.io/projection/v2.0.0/schema.json"]
    for k in range(n):
        r, c = divmod(k, cols)
        x0, y0 = ox + c * side, oy - r * side
        edge = [i / 10 for i in range(11)]
        ring_xy = (
            [(x0 + f * side, y0) for f in edge]
            + [(x0 + side, y0 - f * side) for f in edge[1:]]
            + [(x0 + side - f * side, y0 - side) for f in edge[1:]]
            + [(x0, y0 - side + f * side) for f in edge[1:]]
        )
        lon, lat = to_ll.transform([p[0] for p in ring_xy], [p[1] for p in ring_xy])
        tb = to_ll.transform_bounds(x0, y0 - side, x0 + side, y0, densify_pts=51)
        for d in range(dates):
            day = DATES[d % len(DATES)]
            assets = {}
            for b in bands:
                vrt = folder / "vrt" / f"r{r:02d}c{c:02d}_d{d}_{b}.vrt"
                vrt.write_text(vrt_xml(cogs[b], tile_px, x0, y0, wkt, nodata[b], block[b]))
                a = json.loads(json.dumps(sample["assets"][b]))
                # no media type: odc-stac reads only assets typed as rasters it knows (or
                # untyped); "application/x-vrt" would leave the item without bands
                a.pop("type", None)
                a.update(
                    {
                        "href": str(vrt.resolve()),
                        "proj:shape": [tile_px, tile_px],
                        "proj:transform": [RES, 0.0, x0, 0.0, -RES, y0],
                    }
                )
                assets[b] = a
            props = {
                k2: v
                for k2, v in sample["properties"].items()
                if k2 not in ("start_datetime", "end_datetime")
            }
            props.update(
                {
                    "datetime": f"{day}T15:50:00Z",
                    "eo:cloud_cover": CLOUD[d % len(CLOUD)],
                    "proj:epsg": EPSG,
                    "proj:code": f"EPSG:{EPSG}",
                    "proj:shape": [tile_px, tile_px],
                    "proj:transform": [RES, 0.0, x0, 0.0, -RES, y0],
                    "description": "synthetic tile: the Virginia L1C sample's pixels, mirrored (bench_region)",
                }
            )
            item = {
                "type": "Feature",
                "stac_version": "1.0.0",
                "stac_extensions": exts,
                "id": f"synthetic-r{r:02d}c{c:02d}-{day.replace('-', '')}",
                "collection": "bench-region",
                "bbox": [round(v, 6) for v in tb],
                "geometry": {"type": "Polygon", "coordinates": [[[x, y] for x, y in zip(lon, lat)]]},
                "properties": props,
                "links": [],
                "assets": assets,
            }
            (folder / f"item_{k:04d}_{d}.json").write_text(json.dumps(item))
    (folder / "done.json").write_text(
        json.dumps({"bbox": bbox, "tiles": n, "dates": dates, "tile_px": tile_px})
    )
    return folder, bbox


def check_georef(folder: Path) -> dict:
    """Open the first and the last item's assets with rasterio: CRS, shape, transform as declared."""
    import rasterio

    items = sorted(folder.glob("item_*.json"))
    checked, bad = 0, []
    for p in (items[0], items[-1]):
        it = json.loads(p.read_text())
        for key, a in it["assets"].items():
            with rasterio.open(a["href"]) as src:
                ok = (
                    src.crs.to_epsg() == it["properties"]["proj:epsg"]
                    and list(src.shape) == a["proj:shape"]
                    and all(abs(u - v) < 1e-6 for u, v in zip(list(src.transform)[:6], a["proj:transform"]))
                )
                src.read(1, window=((0, 16), (0, 16)))
            checked += 1
            if not ok:
                bad.append(f"{it['id']}/{key}")
    return {"assets_checked": checked, "mismatches": bad}


# -- models --------------------------------------------------------------------------------
def ensure_models(cache: Path, given: Path | None) -> tuple[str, str]:
    """Return (encoder, unet) .keras paths: from ``given``, cached, or trained once with the demo."""
    if given:
        enc, unet = given / "encoder.keras", given / "unet.keras"
        for p in (enc, unet):
            if not (p.exists() and Path(str(p) + ".json").exists()):
                raise SystemExit(f"--models {given}: needs {p.name} and its sidecar {p.name}.json")
        return str(enc), str(unet)
    out = cache / "models-run"
    rec_path = out / "run.json"
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        enc, unet = (rec.get("cae") or {}).get("encoder_path"), (rec.get("unet") or {}).get("model_path")
        if enc and unet and Path(enc).exists() and Path(unet).exists():
            return enc, unet
    import yaml

    from agriland_scale import load_config

    print("training the demo's models once (short schedule, the embedded window)...", flush=True)
    cfg = load_config(DEMO).with_overrides(**SCHEDULE)
    cache.mkdir(parents=True, exist_ok=True)
    pipe = cache / "models.yaml"
    pipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    t0 = time.perf_counter()
    for until in ("cae", "unet"):  # --until runs what the stage depends on only
        cmd = [agriland_exe(), "run", str(pipe), "--out", str(out), "--until", until, "--quiet"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"training the demo's models failed:\n{(res.stdout + res.stderr)[-3000:]}")
    print(f"  trained in {time.perf_counter() - t0:.0f} s", flush=True)
    rec = json.loads(rec_path.read_text())
    return rec["cae"]["encoder_path"], rec["unet"]["model_path"]


def agriland_exe() -> str:
    return str(Path(sys.executable).parent / "agriland")


# -- planning, in a child process ------------------------------------------------------------
class RssPeak:
    """Peak RSS of this process, sampled every 0.1 s between ``reset()`` and ``peak()``."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self._peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self._peak = max(self._peak, self.proc.memory_info().rss)
            time.sleep(0.1)

    def now(self) -> int:
        return self.proc.memory_info().rss

    def reset(self) -> None:
        self._peak = self.now()

    def peak(self) -> int:
        return max(self._peak, self.now())


def gb(n: float) -> float:
    return round(n / 1e9, 3)


def timed(rss: RssPeak, fn, *args, **kwargs):
    """Call ``fn``; return its result and {cpu_s, wall_s, rss_gb, peak_rss_gb} of this process."""
    rss.reset()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, {
        "cpu_s": round(time.process_time() - c0, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "rss_gb": gb(rss.now()),
        "peak_rss_gb": gb(rss.peak()),
    }


class Scheduler:
    """A ``dask scheduler`` process with no worker, and a client connected to it."""

    def __enter__(self):
        import psutil
        from distributed import Client

        self.dir = tempfile.TemporaryDirectory(prefix="bench-region-sched-")
        sfile = Path(self.dir.name) / "scheduler.json"
        exe = str(Path(sys.executable).parent / "dask")
        self.proc = subprocess.Popen(
            [
                exe,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(sfile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not sfile.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dask scheduler did not start")
            time.sleep(0.1)
        time.sleep(0.2)
        self.ps = psutil.Process(self.proc.pid)
        self.client = Client(scheduler_file=str(sfile), timeout=60)
        self.dashboard = self.client.dashboard_link  # http://127.0.0.1:PORT/status
        return self

    def status_s(self) -> float | None:
        """Seconds the dashboard's ``/status`` page takes to answer (None: no answer in 30 s)."""
        import urllib.request

        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(self.dashboard, timeout=30) as r:
                r.read()
        except OSError:
            return None
        return round(time.perf_counter() - t0, 3)

    def tasks(self) -> int:
        return int(self.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def __exit__(self, *exc):
        try:
            self.client.close(timeout=10)
        except Exception:  # noqa: BLE001 - the client of a benchmark, closing anyway
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.dir.cleanup()


def submitted(sched: Scheduler, rss: RssPeak, fn, timeout: float, settle_s: float = 5.0) -> dict:
    """Run ``fn()`` (which plans and submits to ``sched``'s client) in a daemon thread; poll the
    scheduler's tasks until they stop growing (``settle_s``), ``fn`` ends, or ``timeout``."""
    err: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported, never raised: the thread is abandoned
            err.append(e)

    base_rss, base_tasks = sched.rss(), sched.tasks()
    rss.reset()
    c0, t0 = time.process_time(), time.perf_counter()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    last, at_cpu, at_wall, since = base_tasks, 0.0, 0.0, time.perf_counter()
    status = "settled"
    while True:
        time.sleep(0.5)
        n = sched.tasks()
        now = time.perf_counter()
        if n != last:
            last, since = n, now
            at_cpu, at_wall = time.process_time() - c0, now - t0
        if err:
            status = f"error: {type(err[0]).__name__}: {str(err[0])[:300]}"
            break
        if not th.is_alive():
            status = "returned"
            break
        if last > base_tasks and now - since >= settle_s:
            break
        if now - t0 > timeout:
            status = "timed out"
            at_cpu, at_wall = time.process_time() - c0, now - t0
            break
    return {
        "status": status,
        "scheduler_tasks": last - base_tasks,
        "cpu_s": round(at_cpu, 2),
        "wall_s": round(at_wall, 2),
        "client_rss_gb": gb(rss.now()),
        "client_peak_rss_gb": gb(rss.peak()),
        "scheduler_rss_gb": gb(sched.rss()),
        "scheduler_rss_before_gb": gb(base_rss),
        # the dashboard with the wave submitted (issue: /status answers in <= 2 s)
        "dashboard_status_s": sched.status_s(),
    }


def graph_tasks(obj) -> int:
    return len(obj.__dask_graph__())


def graph_layers(obj) -> int:
    """High-level graph layers: a whole-graph cull costs about layers x keys (dask's Layer.cull
    copies the set of keys wanted for every layer)."""
    return len(getattr(obj.__dask_graph__(), "layers", {None: None}))


def write_call(products, ds, group: str, raster: bool, client, cfg, settings: dict):
    """A function that writes ``ds`` as the stage does in stages.py (one UTM zone).

    ``Products.write_together([(ds, group, label)], ...)`` where it exists (the stages' call
    since square blocks and waves), else ``write_blocks``: with square blocks of
    ``runtime.block_px`` and waves of ``runtime.wave_tasks`` when it takes them, else the
    old call (a block is a row of chunks along ``y``).
    """
    import inspect

    together = getattr(products, "write_together", None)
    params = inspect.signature(together or products.write_blocks).parameters
    kw: dict = {"settings": settings, "progress": None}
    if "block" in params:
        dims: object = ("y", "x") if raster else "patch"
        if raster:
            kw["block"] = getattr(cfg.runtime, "block_px", None)
    else:
        dims = "y" if raster else "patch"
    if "max_tasks" in params:
        kw["max_tasks"] = getattr(cfg.runtime, "wave_tasks", None)
    if "band" in params and raster and group.endswith("segmentation"):  # band by band, as the stage
        kw["band"] = getattr(cfg.segment, "band_px", 0) or None
    if together is not None:
        return lambda: together([(ds, group, group)], dims, client, **kw)
    return lambda: products.write_blocks(ds, group, dims, client, label=group, **kw)


def plan_child(
    stage: str, catalog: Path, bbox: list[float], work: Path, models: list[str], timeout: float
) -> dict:
    """Measure one stage's planning for one catalogue, in this (fresh) process."""
    import warnings

    warnings.simplefilter("ignore")
    import numpy as np
    import xarray as xr

    from agriland_scale import load_config
    from agriland_scale.config.region import Region
    from agriland_scale.pipeline.context import stage_settings
    from agriland_scale.store import open_cube
    from agriland_scale.store.resume import Products

    rss = RssPeak()
    enc, unet = models
    cfg = load_config(DEMO).with_overrides(
        **{
            "search.catalog": str(catalog),
            "search.collections": ["bench-region"],
            "search.bbox": bbox,
            "search.datetime": None,
            "search.max_cloud_cover": None,
            "embed.model": enc,
            "segment.model": unet,
        }
    )
    record = {"cae": {"encoder_path": enc}, "unet": {"model_path": unet}}
    # the code measured: other work may change the package between children
    res: dict = {"stage": stage, "rss_start_gb": gb(rss.now()), "code": fingerprint()}
    meta = work / "cube-meta.zarr"
    deadline = time.perf_counter() + timeout

    def left() -> float:
        return max(deadline - time.perf_counter() - 30, 10)

    if stage == "cube":
        from agriland_scale.cube.assets import check_assets
        from agriland_scale.cube.load import load_bands, load_zone_cubes
        from agriland_scale.search.items import normalize_items
        from agriland_scale.search.stac import local_stac_api, search_items

        def search():
            with local_stac_api(catalog) as url:
                return search_items(cfg.search, url)

        items, res["search"] = timed(rss, search)
        res["items"] = len(items)
        bands = load_bands(items, cfg.cube)
        items = normalize_items(items, bands)
        if cfg.cube.check_assets:
            (items, bad), res["check_assets"] = timed(rss, check_assets, items, bands, cfg.cube.on_bad_asset)
            res["check_assets"]["bad"] = len(bad)
        region = Region.from_bbox(bbox)
        cubes, res["graph"] = timed(
            rss, load_zone_cubes, items, cfg.cube, region, normalized=True, encoded=True
        )
        (cube,) = cubes.values()
        res["graph"]["tasks"] = graph_tasks(cube)
        res["graph"]["layers"] = graph_layers(cube)
        res["shape"] = [int(cube.sizes["y"]), int(cube.sizes["x"])]
        res["read_chunk"] = int(cube["reflectance"].data.chunksize[-1])
        res["stored_chunk"] = cfg.cube.chunk
        # the stored cube's metadata, for the later stages' children (not measured)
        _, res["metadata_write"] = timed(
            rss,
            cube.to_zarr,
            str(meta),
            group="cube",
            mode="w",
            compute=False,
            zarr_format=3,
            consolidated=False,
        )
        with Scheduler() as s:
            res["write"] = submitted(
                s,
                rss,
                write_call(
                    Products(work / "store-cube"),
                    cube,
                    "cube",
                    True,
                    s.client,
                    cfg,
                    stage_settings(cfg, record, "cube"),
                ),
                left(),
            )
        return res

    if not meta.exists():
        return {"stage": stage, "status": "skipped: no cube metadata (the cube child failed)"}
    cube = open_cube(str(meta), "cube")
    res["shape"] = [int(cube.sizes["y"]), int(cube.sizes["x"])]
    p = cfg.patches
    if stage == "patches":
        import inspect

        from agriland_scale.patches import patch_index

        class Recording:
            """The client, counting the tasks ``patch_index`` hands it (compute, map, submit)."""

            def __init__(self, client):
                self.client, self.tasks = client, 0

            def compute(self, x, **kw):
                self.tasks += (
                    sum(graph_tasks(c) for c in x) if isinstance(x, list | tuple) else graph_tasks(x)
                )
                return self.client.compute(x, **kw)

            def map(self, fn, *iterables, **kw):
                futures = self.client.map(fn, *iterables, **kw)
                self.tasks += len(futures)
                return futures

            def submit(self, *a, **kw):
                self.tasks += 1
                return self.client.submit(*a, **kw)

            def __getattr__(self, name):
                return getattr(self.client, name)

        # as patches_stage calls it: with the store where the workers read the cube, when
        # patch_index takes one (here the metadata-only Zarr copy: nothing is read)
        kw = (
            {"store": str(meta), "group": "cube"}
            if "store" in inspect.signature(patch_index).parameters
            else {}
        )
        with Scheduler() as s:
            rec = Recording(s.client)
            res["write"] = submitted(
                s, rss, lambda: patch_index(cube, p.size, p.stride, client=rec, **kw), left()
            )
            res["graph"] = {"tasks": rec.tasks}
        return res

    products = Products(work / f"store-{stage}")
    store = products.reader()  # as the stages' ctx.store: an Icechunk store, pickled into tasks
    if stage == "embeddings":
        from agriland_scale.models.embed import embed_patches
        from agriland_scale.patches import patch_grid

        rows, cols = patch_grid(cube.sizes["y"], cube.sizes["x"], p.size, p.stride)
        y0, x0 = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
        index = xr.Dataset(
            {
                "y0": ("patch", y0),
                "x0": ("patch", x0),
                "valid_fraction": ("patch", np.ones(len(y0), dtype="float32")),
            },
            coords={"patch": np.arange(len(y0))},
            attrs={"patch_size": p.size, "stride": p.stride},
        )
        res["patches"] = len(y0)
        e = cfg.embed
        prod, res["graph"] = timed(
            rss,
            embed_patches,
            enc,
            store,
            index,
            e.bands,
            e.reflectance_max,
            batch_size=e.batch_size,
            min_valid_fraction=p.min_valid_fraction,
            group="cube",
        )
    else:
        from agriland_scale.models.segment import segment_region
        from agriland_scale.store import write_georef

        s_ = cfg.segment

        def seg():
            out = segment_region(
                unet,
                store,
                cube,
                s_.bands,
                window=s_.window,
                overlap=s_.overlap,
                reflectance_max=s_.reflectance_max,
                threshold=s_.threshold,
                batch_size=s_.batch_size,
                group="cube",
                inference_window=s_.inference_window,
                # as segmentation_stage: output chunks of 1024 px, or the write block when smaller
                **({"block": min(1024, cfg.runtime.block_px)} if hasattr(cfg.runtime, "block_px") else {}),
                # as segmentation_stage: column bands that share no window task
                **({"band": s_.band_px or None} if hasattr(s_, "band_px") else {}),
            )
            return write_georef(out, cube.rio.crs)

        prod, res["graph"] = timed(rss, seg)
    res["graph"]["tasks"] = graph_tasks(prod)
    res["graph"]["layers"] = graph_layers(prod)
    with Scheduler() as s:
        res["write"] = submitted(
            s,
            rss,
            write_call(
                products,
                prod,
                stage,
                stage == "segmentation",
                s.client,
                cfg,
                stage_settings(cfg, record, stage),
            ),
            left(),
        )
    return res


def tree(proc) -> list:
    try:
        return [proc] + proc.children(recursive=True)
    except Exception:  # noqa: BLE001 - the process is gone
        return []


def tree_rss(proc) -> dict[int, tuple[int, str]]:
    """{pid: (rss, name)} of ``proc`` and its descendants."""
    out = {}
    for p in tree(proc):
        try:
            cmd = p.cmdline()
            name = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:3]))[:80]
            out[p.pid] = (p.memory_info().rss, name)
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    return out


def run_child(args: list[str], timeout: float, max_rss: float) -> dict:
    """Run this script with ``args`` in a fresh process group; kill it past ``timeout`` s or
    ``max_rss`` bytes of its process tree; return its JSON (or why there is none)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ps, peak, why = psutil.Process(proc.pid), [0], []

    def watch():
        while proc.poll() is None:
            total = sum(r for r, _ in tree_rss(ps).values())
            peak[0] = max(peak[0], total)
            if total > max_rss and not why:
                why.append(f"killed: memory (process tree {total / 1e9:.1f} GB > {max_rss / 1e9:.0f} GB)")
                os.killpg(proc.pid, signal.SIGKILL)
            if time.perf_counter() - t0 > timeout and not why:
                why.append(f"timed out ({timeout:.0f} s)")
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.5)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    try:  # the scheduler the child started, if the kill left it behind
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wall = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if why or proc.returncode != 0 or not lines:
        return {
            "status": why[0] if why else f"failed (exit {proc.returncode})",
            "child_wall_s": wall,
            "tree_peak_rss_gb": gb(peak[0]),
            "stderr_tail": err[-2000:],
        }
    res = json.loads(lines[-1])
    res.update(child_wall_s=wall, tree_peak_rss_gb=gb(peak[0]))
    return res


# -- real runs -----------------------------------------------------------------------------
def real_run(
    cache: Path, n: int, tile_px: int, dates: int, models: tuple[str, str], keep: Path, engine: str = "auto"
) -> dict:
    """``agriland run`` of the demo pipeline on ``n`` synthetic tiles; wall, stages, RSS, store."""
    import psutil
    import yaml

    from agriland_scale import load_config

    bands = cube_bands()
    cat, bbox = build_catalog(cache, n, tile_px, dates, bands)
    cfg = load_config(DEMO).with_overrides(
        **{
            "name": f"bench-region-{n}x{tile_px}",
            "search.catalog": str(cat),
            "search.collections": ["bench-region"],
            "search.bbox": bbox,
            "search.datetime": None,
            "search.max_cloud_cover": None,
            "embed.model": models[0],
            "segment.model": models[1],
            "segment.labels": None,
            "runtime.dashboard_address": ":0",
            "runtime.engine": engine,
        }
    )
    keep.mkdir(parents=True, exist_ok=True)
    pipe = keep / f"region-{n}x{tile_px}-{engine}.yaml"
    pipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = keep / f"run-{n}x{tile_px}-{engine}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [agriland_exe(), "run", str(pipe), "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peaks: dict[int, list] = {}  # pid -> [peak rss, name]
    total = [0]
    series: list[tuple[float, int]] = []  # (unix time, the largest worker's rss)

    def sample():
        while proc.poll() is None:
            now = tree_rss(ps)
            total[0] = max(total[0], sum(r for r, _ in now.values()))
            for pid, (r, name) in now.items():
                p = peaks.setdefault(pid, [0, name])
                p[0] = max(p[0], r)
            workers_now = [r for pid, (r, name) in now.items() if pid != proc.pid and "python" in name]
            series.append((time.time(), max(workers_now, default=0)))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    output = proc.communicate()[0]
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {
            "status": f"failed (exit {proc.returncode})",
            "wall_s": round(wall, 1),
            "output_tail": output[-3000:],
        }
    rec = json.loads((out / "run.json").read_text())
    client = peaks.pop(proc.pid, [0, ""])
    workers = {f"{pid} {name}": gb(r) for pid, (r, name) in peaks.items() if "python" in name and r > 100e6}

    def du(p: Path) -> tuple[int, int]:
        files = [f for f in p.rglob("*") if f.is_file()] if p.exists() else []
        return sum(f.stat().st_size for f in files), len(files)

    store_bytes, store_objects = du(out / "agriland.icechunk")
    cogs = [f for f in out.rglob("*.tif") if f.is_file()]
    shape = rec["cube"]["shape"]
    return {
        "status": "done",
        "tiles": n,
        "tile_px": tile_px,
        "dates": dates,
        "cube_px": [shape["y"], shape["x"]],
        "wall_s": round(wall, 1),
        "timings_s": {k: round(v, 1) for k, v in rec["timings_s"].items()},
        "client_peak_rss_gb": gb(client[0]),
        "worker_peak_rss_gb": workers,
        "worker_peak_by_stage_gb": by_stage(rec, series),
        "tree_peak_rss_gb": gb(total[0]),
        "store_mb": round(store_bytes / 1e6, 1),
        "store_objects": store_objects,
        "cogs_mb": round(sum(f.stat().st_size for f in cogs) / 1e6, 1),
        "patches": rec.get("patches", {}).get("count"),
        "engine": engine,
        "engines_used": rec.get("engines"),
        "out": str(out),
    }


def by_stage(rec: dict, series: list[tuple[float, int]]) -> dict[str, float]:
    """The largest worker's peak RSS (GB) during each stage of the run recorded in ``rec``.

    The stages run one after the other and end at ``finished``: each stage's window is laid
    back from there by the durations in ``timings_s`` (the bookkeeping between stages, a
    second or so, goes to the stage before).
    """
    from datetime import datetime

    from agriland_scale.layout import STAGES

    end = datetime.strptime(rec["finished"], "%Y-%m-%dT%H:%M:%S%z").timestamp() + 1  # whole seconds
    out: dict[str, float] = {}
    for stage in reversed([s for s in STAGES if s in rec["timings_s"]]):
        start = end - rec["timings_s"][stage]
        inside = [r for t, r in series if start <= t <= end]
        if inside:
            out[stage] = gb(max(inside))
        end = start
    return dict(reversed(list(out.items())))


# -- the table -----------------------------------------------------------------------------
def cell(r: dict | None, *path, fmt="{:,}") -> str:
    """The value at ``path`` in a child's result, formatted; "" where there is none."""
    if r is None:
        return ""
    if path == ("status",):  # the child's own status: "ok" when it answered
        return str(r.get("status", "ok"))[:15]
    v: object = r
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return ""
        v = v[k]
    return str(v)[:15] if isinstance(v, str) else fmt.format(v)


def print_plan_table(plan: dict, tiles: list[int]) -> None:
    rows = [
        ("items", "cube", ("items",), "{:,}"),
        ("cube grid (px)", "cube", ("shape",), "{}"),
        ("search wall s", "cube", ("search", "wall_s"), "{:.1f}"),
        ("check_assets wall s", "cube", ("check_assets", "wall_s"), "{:.1f}"),
        ("check_assets CPU s", "cube", ("check_assets", "cpu_s"), "{:.1f}"),
    ]
    for st in STAGES:
        rows += [
            (f"{st}: graph tasks", st, ("graph", "tasks"), "{:,}"),
            (f"{st}: graph layers", st, ("graph", "layers"), "{:,}"),
            (f"{st}: graph CPU s", st, ("graph", "cpu_s"), "{:.1f}"),
            (f"{st}: graph wall s", st, ("graph", "wall_s"), "{:.1f}"),
            (f"{st}: submit status", st, ("write", "status"), "{}"),
            (f"{st}: scheduler tasks", st, ("write", "scheduler_tasks"), "{:,}"),
            (f"{st}: plan+submit CPU s", st, ("write", "cpu_s"), "{:.1f}"),
            (f"{st}: plan+submit wall s", st, ("write", "wall_s"), "{:.1f}"),
            (f"{st}: client peak RSS GB", st, ("write", "client_peak_rss_gb"), "{:.2f}"),
            (f"{st}: scheduler RSS GB", st, ("write", "scheduler_rss_gb"), "{:.2f}"),
            (f"{st}: dashboard /status s", st, ("write", "dashboard_status_s"), "{:.2f}"),
            (f"{st}: child status", st, ("status",), "{}"),
        ]
    w = 32
    print(f"{'planning (no workers)':<{w}}" + "".join(f"{f'{n} tile(s)':>18}" for n in tiles))
    for label, st, path, fmt in rows:
        vals = [cell(plan.get(str(n), {}).get(st), *path, fmt=fmt) for n in tiles]
        if any(vals):
            print(f"{label:<{w}}" + "".join(f"{v:>18}" for v in vals))
    tot = []
    for n in tiles:
        cpu = 0.0
        for st in STAGES:
            r = plan.get(str(n), {}).get(st) or {}
            cpu += (r.get("graph") or {}).get("cpu_s", 0) + (r.get("write") or {}).get("cpu_s", 0)
            cpu += (r.get("check_assets") or {}).get("cpu_s", 0) + (r.get("search") or {}).get("cpu_s", 0)
        tot.append(f"{cpu:.1f}")
    print(
        f"{'all stages: client CPU s':<{w}}" + "".join(f"{v:>18}" for v in tot) + "   (target <= 60 at 100)"
    )


def print_run_table(runs: dict) -> None:
    keys = list(runs)
    if not keys:
        return
    w = 32
    print(f"{'real run':<{w}}" + "".join(f"{k:>18}" for k in keys))
    stages = []
    for r in runs.values():
        for s in r.get("timings_s", {}):
            if s not in stages:
                stages.append(s)
    for s in stages:
        print(f"{s + ' s':<{w}}" + "".join(f"{runs[k].get('timings_s', {}).get(s, ''):>18}" for k in keys))
    for label, key in (
        ("wall s (CLI)", "wall_s"),
        ("client peak RSS GB", "client_peak_rss_gb"),
        ("tree peak RSS GB", "tree_peak_rss_gb"),
        ("store MB", "store_mb"),
        ("store objects", "store_objects"),
        ("COGs MB", "cogs_mb"),
        ("runtime.engine", "engine"),
        ("status", "status"),
    ):
        print(f"{label:<{w}}" + "".join(f"{str(runs[k].get(key, '')):>18}" for k in keys))
    for stage in ("embeddings", "segmentation"):
        print(
            f"{stage + ' engine':<{w}}"
            + "".join(
                f"{'/'.join(str(v) for v in ((runs[k].get('engines_used') or {}).get(stage) or {}).values()):>18}"
                for k in keys
            )
        )
    print(
        f"{'worker peak RSS GB':<{w}}"
        + "".join(f"{max((runs[k].get('worker_peak_rss_gb') or {'': 0}).values()):>18}" for k in keys)
    )
    for s in stages:
        if any(s in (runs[k].get("worker_peak_by_stage_gb") or {}) for k in keys):
            print(
                f"{'  ' + s + ' worker GB':<{w}}"
                + "".join(f"{(runs[k].get('worker_peak_by_stage_gb') or {}).get(s, ''):>18}" for k in keys)
            )


def fingerprint() -> dict:
    """sha256 (12 hex) and mtime of the package files whose code is measured (no git needed)."""
    import hashlib

    files = [
        "agriland_scale/store/resume.py",
        "agriland_scale/store/blocks.py",
        "agriland_scale/pipeline/stages.py",
        "agriland_scale/cube/load.py",
        "agriland_scale/patches.py",
        "agriland_scale/models/embed.py",
        "agriland_scale/models/segment.py",
    ]
    out = {}
    for f in files:
        p = REPO / f
        if p.exists():
            out[f] = {
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:12],
                "mtime_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.stat().st_mtime)),
            }
    return out


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tiles", type=ints, default=[1, 10, 100], help="planning at these tile counts ('' none)"
    )
    ap.add_argument("--stages", default=",".join(STAGES), help="stages planned (comma-separated)")
    ap.add_argument("--dates", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900, help="wall seconds a planning child may take")
    ap.add_argument(
        "--max-rss-gb", type=float, default=12, help="memory a planning child's processes may take"
    )
    ap.add_argument("--run", action="store_true", help="also run the demo pipeline for real")
    ap.add_argument("--run-tiles", type=ints, default=[1, 2])
    ap.add_argument(
        "--engines",
        type=lambda v: v.split(","),
        default=["auto"],
        help="runtime.engine of the real runs, comma-separated (e.g. auto,tensorflow: each tile count with each)",
    )
    ap.add_argument("--tile-px", type=int, default=FULL, help="tile side of the real runs (planning: 10980)")
    ap.add_argument("--models", type=Path, help="folder with encoder.keras and unet.keras (+ sidecars)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "agriland-bench-region")
    ap.add_argument("--keep", type=Path, help="keep the real runs here (default: under --cache)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "region.json")
    ap.add_argument("--child", nargs=6, metavar=("STAGE", "CATALOG", "BBOX", "WORK", "MODELS", "TIMEOUT"))
    a = ap.parse_args()
    if a.child:
        stage, cat, bbox, work, models, timeout = a.child
        res = plan_child(stage, Path(cat), json.loads(bbox), Path(work), json.loads(models), float(timeout))
        print(json.dumps(res), flush=True)
        os._exit(0)  # abandoned submit threads and clients: do not wait for them
    if not (SHARED / "item.json").exists():
        raise SystemExit(f"needs the full Virginia sample at {SHARED}")
    import platform

    bands = cube_bands()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result: dict = {
        "started_utc": started,
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "dates": a.dates,
        "bands": bands,
        "tile_px_planning": FULL,
        "code": fingerprint(),
        "plan": {},
        "runs": {},
    }
    t_all = time.perf_counter()
    models = ensure_models(a.cache, a.models)
    result["models"] = list(models)
    stages = [s for s in a.stages.split(",") if s]
    for n in a.tiles:
        print(
            f"== planning {n} tile(s) x {a.dates} dates ({time.strftime('%H:%M:%S', time.gmtime())} UTC)",
            flush=True,
        )
        t0 = time.perf_counter()
        cat, bbox = build_catalog(a.cache, n, FULL, a.dates, bands)
        result.setdefault("catalog_build_s", {})[str(n)] = round(time.perf_counter() - t0, 1)
        if n == a.tiles[0]:
            result["georef_check"] = check_georef(cat)
            print(f"  georeferencing of the VRT assets: {result['georef_check']}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench-region-{n}-") as work:
            plan = result["plan"].setdefault(str(n), {"tiles": n, "grid": list(grid_shape(n))})
            for st in stages:
                r = run_child(
                    [
                        "--child",
                        st,
                        str(cat),
                        json.dumps(bbox),
                        work,
                        json.dumps(list(models)),
                        str(a.timeout),
                    ],
                    a.timeout,
                    a.max_rss_gb * 1e9,
                )
                plan[st] = r
                g, wr = r.get("graph") or {}, r.get("write") or {}
                print(
                    f"  {st}: {r.get('status', 'ok')}; graph {g.get('tasks', '?')} tasks, {g.get('cpu_s', '?')} s CPU; "
                    f"submit {wr.get('status', '?')}: {wr.get('scheduler_tasks', '?')} tasks, {wr.get('cpu_s', '?')} s CPU, "
                    f"client peak {wr.get('client_peak_rss_gb', '?')} GB, scheduler {wr.get('scheduler_rss_gb', '?')} GB "
                    f"(child {r.get('child_wall_s')} s)",
                    flush=True,
                )
                if "stderr_tail" in r:
                    print("    " + r["stderr_tail"][-600:].replace("\n", "\n    "), flush=True)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    if a.run:
        keep = a.keep or a.cache / "runs"
        for n, engine in [(n, e) for e in a.engines for n in a.run_tiles]:
            print(
                f"== real run: {n} tile(s) of {a.tile_px} px, runtime.engine {engine} "
                f"({time.strftime('%H:%M:%S', time.gmtime())} UTC)",
                flush=True,
            )
            r = real_run(a.cache, n, a.tile_px, a.dates, models, keep, engine)
            result["runs"][f"{n}x{a.tile_px}" + ("" if engine == "auto" else f"-{engine}")] = r
            print(f"  {json.dumps({k: v for k, v in r.items() if k != 'output_tail'})}", flush=True)
            if "output_tail" in r:
                print(r["output_tail"][-1500:], flush=True)
            a.json.write_text(json.dumps(result, indent=1))
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    print()
    if a.tiles:
        print_plan_table(result["plan"], a.tiles)
    print_run_table(result["runs"])
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(f"saved {a.json}")


if __name__ == "__main__":
    main()
