"""``agriland plan``: what a run of a pipeline will do, before it starts, without reading pixels.

:func:`plan_run` runs the checks ``agriland run`` runs before it changes anything
(:func:`~agriland_scale.pipeline.preflight.preflight`), the STAC search, and then only
arithmetic on the items' metadata: per UTM zone the cube's grid (the same
:func:`~agriland_scale.cube.load.cube_geobox` the cube stage loads on, an odc-geo ``GeoBox``:
no Dask graph, no read), the patch grid (:func:`~agriland_scale.patches.patch_grid`), the
approximate number of tasks of each stage (from its chunks, batches and windows, as the
stages build them), the store's size (bytes per pixel and per patch of the dtypes the stages
write; an uncompressed upper bound) and a time per stage from a throughput:

1. ``throughput`` given (``--throughput STAGE=UNITS_PER_S``), else
2. measured by earlier runs on this machine (``--measured RUN``: their ``run.json`` has the
   stage timings, zones' shapes, patches and training schedules), else
3. :data:`DEFAULT_THROUGHPUT`, measured on this machine (2 CPU cores, one worker of 2
   threads), each value citing the benchmark file it comes from.

Each stage's work is counted in pixels of what it processes (:data:`UNITS`). The stages that
run as many tasks (cube, patches, embeddings, segmentation) are scaled to ``workers``
workers of the kind that measured the throughput, linearly (an ideal: a lower bound of their
time); the training tasks, the clustering and the publish stage run as one task or on the
client and are not scaled.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pystac

from agriland_scale.config.bands import canonical_band
from agriland_scale.config.schema import RunConfig
from agriland_scale.cube.load import check_grid_size, cube_geobox, load_bands, read_chunk, solar_days
from agriland_scale.errors import ConfigError, NoItemsFound
from agriland_scale.layout import STAGES, stages_needed, zone_name
from agriland_scale.models.blend import _grid, choose_inference_window
from agriland_scale.models.files import read_sidecar
from agriland_scale.models.segment import _groups
from agriland_scale.patches import patch_grid
from agriland_scale.pipeline.preflight import preflight
from agriland_scale.pipeline.throughput import (
    DEFAULT_THROUGHPUT,
    DEFAULT_WORKERS,
    PARALLEL,
    UNITS,
    measured_throughput,
)
from agriland_scale.search.items import acquired, group_by_zone, item_epsg, normalize_items, scale_offset
from agriland_scale.search.stac import api_url, item_tile, region_of, search_items

__all__ = ["format_plan", "plan_run"]

# bytes a patch in the index (patches): row, col int32; y0, x0, patch int64; 4 float64
# bounds; valid_fraction float32
_INDEX_BYTES = 2 * 4 + 3 * 8 + 4 * 8 + 4
_SEGMENT_BLOCK = 1024  # segment_region's output block, px a side
_EMBED_TASK_BATCHES = 4  # embed_patches' batches a task


def _ceil(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _zone_plan(group: list[pystac.Item], cfg: RunConfig, region: Any, encoder: str | None) -> dict[str, Any]:
    """Grid, patches, tasks and bytes of one UTM zone (metadata only)."""
    c, p, s, e = cfg.cube, cfg.patches, cfg.segment, cfg.embed
    geobox = cube_geobox(group, region, c.resolution)
    h, w = (int(v) for v in geobox.shape.yx)
    scl = canonical_band(c.scl_band)
    read = load_bands(group, c)
    use_scl = c.cloud_mask in ("auto", "scl") and scl in read
    fine = list(c.bands) + ([scl] if use_scl and scl not in c.bands else [])
    dates = solar_days(group)
    check_grid_size(geobox, c.resolution, c.max_pixels, len(fine), dates)
    rc = read_chunk(c, dates, len(fine))
    rows, cols = patch_grid(h, w, p.size, p.stride)
    n_patches = len(rows) * len(cols)
    px = h * w
    read_chunks = _ceil(h, rc) * _ceil(w, rc)
    factors = np.array([scale_offset(group[0], b) for b in c.bands])
    packed = c.storage == "int16" and bool(np.all(factors[:, 0] == factors[0, 0]))
    window = choose_inference_window(s.inference_window, s.window, s.overlap, h, w, encoder)
    r_groups = _groups(_grid(h, window, s.overlap), h, window, _SEGMENT_BLOCK)
    c_groups = _groups(_grid(w, window, s.overlap), w, window, _SEGMENT_BLOCK)
    predict = sum(1 for a in r_groups if len(a)) * sum(1 for b in c_groups if len(b))
    out_blocks = _ceil(h, _SEGMENT_BLOCK) * _ceil(w, _SEGMENT_BLOCK)
    embed_tasks = _ceil(n_patches, e.batch_size * _EMBED_TASK_BATCHES)
    n_win = max(1, (max(p.size, int(np.sqrt(64 * 2**20 / 2))) - p.size) // p.stride + 1)
    # the square write blocks of runtime.block_px (store/blocks.py), over the stored chunks
    block = max(cfg.runtime.block_px // c.chunk, 1) * c.chunk
    write_blocks = _ceil(h, block) * _ceil(w, block)
    seg_block = max(cfg.runtime.block_px // _SEGMENT_BLOCK, 1) * _SEGMENT_BLOCK
    seg_writes = _ceil(h, seg_block) * _ceil(w, seg_block)
    bbox = geobox.boundingbox
    return {
        "epsg": geobox.crs.epsg if geobox.crs is not None else None,
        "crs": str(geobox.crs),
        "items": len(group),
        "tiles": len({_tile_key(i) for i in group}),
        "tile_ids": sorted({t for i in group if (t := item_tile(i))}),
        "dates": dates,
        "shape": [h, w],
        "pixels": px,
        "bounds": [float(bbox.left), float(bbox.bottom), float(bbox.right), float(bbox.top)],
        "transform": list(geobox.transform)[:6],
        "bands_read": len(fine),
        "read_chunk": rc,
        "read_chunks": read_chunks,
        "write_blocks": write_blocks,
        "patches": {"count": n_patches, "grid": [len(rows), len(cols)]},
        "inference_window": window,
        "windows": len(_grid(h, window, s.overlap)) * len(_grid(w, window, s.overlap)),
        # approximate task counts, as the stages build their graphs (write blocks included)
        "tasks": {
            # a read per band and chunk (every date in it), the composite and the clear count
            # per chunk, an open per band; one write task per square block
            "cube": read_chunks * (len(fine) + 2) + len(fine) + write_blocks,
            # a patches-index task a window of whole patches, 64 MiB of uint16 clear counts
            # (patches.patch_valid_fraction)
            "patches": _ceil(len(rows), n_win) * _ceil(len(cols), n_win),
            # a task embeds batch_size x 4 patches; one write task each
            "embeddings": 2 * embed_tasks,
            # predicted spans, blended blocks, the mask of each block; a write task per square block
            "segmentation": predict + 3 * out_blocks + seg_writes,
        },
        # stored bytes, uncompressed
        "bytes": {
            "cube": px * len(c.bands) * (2 if packed else 4) + px * 2,
            "patches": n_patches * _INDEX_BYTES,
            "embeddings": n_patches * (e.embedding_dim * 4 + 8),
            "clusters": n_patches * (2 + 2 + 8 + 4 * cfg.cluster.k + 2) + cfg.cluster.k * e.embedding_dim * 4,
            "labels": px if s.labels and not s.model else 0,
            "segmentation": px * (3 if s.labels else 2),
        },
        "cog_bytes": px * 2 + n_patches * 2,
        "storage": "int16" if packed else "float32",
    }


def _tile_key(item: pystac.Item) -> str:
    """Name an item's tile: its MGRS code, else its grid (EPSG, transform, shape)."""
    tile = item_tile(item)
    if tile:
        return tile
    p = item.properties
    return f"EPSG:{item_epsg(item)} {p.get('proj:transform')} {p.get('proj:shape')}"


def _labelled_shape(labels: str, zone: Mapping[str, Any], resolution: float) -> list[int] | None:
    """Pixels (rows, cols) of the labels' bounding box within ``zone``'s grid; None when unknown.

    From the labels' metadata only: a raster's header, or the bounds of GeoJSON polygons (a
    VIA project's extent is its patches': not read here).
    """
    import rasterio
    from pyproj import Transformer

    from agriland_scale.config.files import resolve_path
    from agriland_scale.labels.raster import read_polygons

    path = resolve_path(labels, Path.cwd())
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with rasterio.open(path) as src:
                (x0, y0, x1, y1), crs = tuple(src.bounds), src.crs
        elif path.suffix.lower() == ".json" and (path.parent / "patches.json").exists():
            return None
        else:
            import shapely

            polys, crs = read_polygons(path)
            x0, y0, x1, y1 = shapely.total_bounds([g for g, _ in polys])
        bx0, by0, bx1, by1 = Transformer.from_crs(crs, zone["crs"], always_xy=True).transform_bounds(
            x0, y0, x1, y1
        )
    except Exception:  # noqa: BLE001 - unknown extent: the caller takes the whole zone
        return None
    zx0, zy0, zx1, zy1 = zone["bounds"]
    w, h = min(bx1, zx1) - max(bx0, zx0), min(by1, zy1) - max(by0, zy0)
    return [max(0, int(h // resolution)), max(0, int(w // resolution))]


def _work(
    cfg: RunConfig, zones: Mapping[str, Mapping[str, Any]], labelled: Sequence[int] | None
) -> dict[str, float]:
    """Units of work (:data:`UNITS`) of each stage over every zone.

    ``labelled``: the shape (px) the U-Net's labels cover in the zone it trains in; None: the
    largest zone (an upper bound).
    """
    e, s, p = cfg.embed, cfg.segment, cfg.patches
    px = sum(z["pixels"] for z in zones.values())
    n = sum(z["patches"]["count"] for z in zones.values())
    src = sum(z["pixels"] * z["dates"] * z["bands_read"] for z in zones.values())
    h, w = labelled or max((z["shape"] for z in zones.values()), key=lambda yx: yx[0] * yx[1])
    t = s.train
    # the U-Net's training windows: a half-window stride over the labelled extent, less the
    # validation strip (its early stopping is not foreseen: an upper bound)
    half = s.window // 2
    grid = max(1, (h - half) // half) * max(1, (w - half) // half)
    windows = max(1, int((1 - t.validation_fraction) * grid))
    steps = max(1, (windows * max(t.augment_factor, 1)) // t.batch_size)
    return {
        "cube": float(src),
        "patches": float(px),
        "cae": 0.0
        if e.model
        else float(e.train.epochs * e.train.steps_per_epoch * e.train.batch_size * p.size**2),
        "embeddings": float(n * p.size**2),
        "clusters": float(n * p.size**2),
        "unet": 0.0 if s.model else float(t.epochs * steps * t.batch_size * s.window**2),
        "segmentation": float(px),
        "publish": float(px),
    }


def plan_run(
    cfg: RunConfig,
    *,
    workers: int | None = None,
    throughput: Mapping[str, float] | None = None,
    measured: Sequence[Path] = (),
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Plan a run of ``cfg``: items, tiles, zones, pixels, patches, tasks, bytes and time per stage.

    Runs the checks ``agriland run`` runs before it starts and the STAC search; reads the
    items' metadata only, never a pixel, and builds no Dask graph.

    Parameters
    ----------
    cfg : RunConfig
        The pipeline.
    workers : int, optional
        Workers the run will have (default ``runtime.n_workers``).
    throughput : mapping of str to float, optional
        Throughput given per stage (:data:`UNITS` a second, for the workers that measured it:
        one worker of ``runtime.threads_per_worker`` threads).
    measured : sequence of Path
        Folders of earlier runs on this machine whose timings give the throughput (the run of
        the most work per stage wins).
    scheduler : str, optional
        A Dask scheduler address (``--scheduler``): checked that it answers, as ``run`` does.

    Returns
    -------
    dict
        ``items``, ``tiles``, ``zones`` (per zone: grid, pixels, patches, tasks, bytes),
        ``stages`` (per stage: work, units, tasks, throughput, its source, seconds),
        ``store`` (bytes per product, an uncompressed upper bound), ``total_s`` and
        ``warnings``.

    Raises
    ------
    AgrilandError
        What ``agriland run`` would raise before or at its search and cube planning: a config
        file or model that fails its checks, a scheduler that does not answer, no items, a
        region outside them, a grid above ``cube.max_pixels``, a cube smaller than a patch.
    """
    preflight(cfg, stages_needed(None), None, set(), scheduler)
    n_workers = cfg.runtime.n_workers if workers is None else int(workers)
    if n_workers < 1:
        raise ConfigError(f"--workers {n_workers}: give 1 or more workers")
    region = region_of(cfg.search)
    t0 = time.perf_counter()
    with api_url(cfg.search) as url:
        found = search_items(cfg.search, url)
    search_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    items = normalize_items(found, load_bands(found, cfg.cube))
    s = cfg.segment
    encoder = (read_sidecar(s.model).get("encoder") if s.model else s.encoder) or None
    zones: dict[str, dict[str, Any]] = {}
    errors = []
    for epsg, group in group_by_zone(items).items():
        try:
            zones[zone_name(epsg)] = _zone_plan(group, cfg, region, encoder)
        except NoItemsFound as err:
            errors.append(f"EPSG:{epsg}: {err}")
    if not zones:
        raise NoItemsFound("; ".join(errors))
    planned_s = time.perf_counter() - t1
    warnings = [f"left out (no overlap with the region): {e}" for e in errors]
    n_patches = sum(z["patches"]["count"] for z in zones.values())
    if n_patches < cfg.cluster.k:
        warnings.append(
            f"cluster.k is {cfg.cluster.k} but the region has {n_patches} patch(es) at most: the patches "
            "stage will refuse it"
        )
    # throughput per stage: given > measured (the run with the most work) > built in
    rates: dict[str, dict[str, Any]] = {
        k: {**v, "workers": DEFAULT_WORKERS} for k, v in DEFAULT_THROUGHPUT.items()
    }
    best: dict[str, float] = {}
    for run in measured:
        for stage, m in measured_throughput(Path(run)).items():
            if m["units"] > best.get(stage, 0.0):
                best[stage], rates[stage] = m["units"], m
    for stage, v in (throughput or {}).items():
        rates[stage] = {"value": float(v), "source": "given (--throughput)", "workers": 1}
    labelled = None
    if s.labels and not s.model:  # the U-Net trains in the zone its labels cover most of
        shapes = [x for z in zones.values() if (x := _labelled_shape(s.labels, z, cfg.cube.resolution))]
        labelled = max(shapes, key=lambda yx: yx[0] * yx[1], default=None)
    work = _work(cfg, zones, labelled)
    stages: dict[str, dict[str, Any]] = {
        "search": {"tasks": 0, "seconds": round(search_s, 2), "source": "this search"}
    }
    for stage in STAGES:
        if stage not in work:
            continue
        r = rates[stage]
        seconds = work[stage] / r["value"] if work[stage] else 0.0
        if stage in PARALLEL:
            seconds *= r["workers"] / n_workers
        tasks = sum(z["tasks"][stage] for z in zones.values()) if stage in PARALLEL else 0
        if stage in ("cae", "unet", "clusters") and work[stage]:
            tasks = 1
        if stage == "publish":
            tasks = len(zones)  # the cluster pictures; the COGs are written by the client
        stages[stage] = {
            "work": work[stage],
            "units": UNITS[stage],
            "tasks": tasks,
            "throughput": round(r["value"], 1),
            "throughput_workers": r["workers"],
            "source": r["source"],
            "scaled": stage in PARALLEL,
            "seconds": round(seconds, 1),
        }
        if stage in ("cae", "unet") and not work[stage]:
            stages[stage]["source"] = "model given: no training"
    store: dict[str, int] = {}
    for z in zones.values():
        for product, b in z["bytes"].items():
            store[product] = store.get(product, 0) + int(b)
    tiles = sorted({t for z in zones.values() for t in z["tile_ids"]})
    # an item without an MGRS code counts as the tile of its own grid (CRS, origin, shape)
    grids = {_tile_key(i) for i in items}
    return {
        "name": cfg.name,
        "items": len(items),
        "tiles": len(grids),
        "tile_ids": tiles,
        "items_without_tile": sum(1 for i in items if item_tile(i) is None),
        "dates": len({(acquired(i) or "")[:10] for i in items}),
        "zones": zones,
        "pixels": sum(z["pixels"] for z in zones.values()),
        "patches": n_patches,
        "workers": n_workers,
        "threads_per_worker": cfg.runtime.threads_per_worker,
        "stages": stages,
        "store": {
            "bytes": store,
            "total_bytes": sum(store.values()),
            "cog_bytes": sum(z["cog_bytes"] for z in zones.values()),
            "note": "uncompressed upper bound: the store's chunks and the COGs are compressed",
        },
        "total_s": round(sum(v["seconds"] for v in stages.values()), 1),
        "planned_in_s": round(planned_s, 2),
        "warnings": warnings,
        "unet_labelled_px": labelled,
    }


def _si(v: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g} {unit}"
    return f"{v:.3g}"


def _bytes(v: float) -> str:
    for unit, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= f:
            return f"{v / f:.3g} {unit}"
    return f"{int(v)} B"


def _duration(sec: float) -> str:
    if sec < 60:
        return f"{sec:.1f} s"
    if sec < 3600:
        return f"{sec / 60:.1f} min"
    return f"{sec / 3600:.1f} h"


def format_plan(plan: Mapping[str, Any]) -> str:
    """Render a plan (:func:`plan_run`) as a compact table."""
    lines = [
        f"plan of '{plan['name']}': {plan['items']} item(s), {plan['tiles']} tile(s), {plan['dates']} date(s), "
        f"{len(plan['zones'])} UTM zone(s), {plan['pixels']:,} px, {plan['patches']:,} patches",
        f"{'zone':<9}{'items':>7}{'tiles':>7}{'dates':>6}  {'grid (px)':<19}{'pixels':>14}{'read chunk':>11}"
        f"{'patches':>10}",
    ]
    for name, z in plan["zones"].items():
        grid = f"{z['shape'][0]:,} x {z['shape'][1]:,}"
        lines.append(
            f"{name:<9}{z['items']:>7}{z['tiles']:>7}{z['dates']:>6}  {grid:<19}{z['pixels']:>14,}"
            f"{z['read_chunk']:>11}{z['patches']['count']:>10,}"
        )
    lines.append(f"{'stage':<13}{'work':>10}  {'tasks':>9}{'px/s':>10}{'time':>10}  throughput from")
    for stage, st in plan["stages"].items():
        work = _si(st["work"]) if "work" in st else "-"
        rate = _si(st["throughput"]) if "throughput" in st else "-"
        lines.append(
            f"{stage:<13}{work:>10}  {st['tasks']:>9,}{rate:>10}{_duration(st['seconds']):>10}  {st['source']}"
        )
    sto = plan["store"]
    parts = ", ".join(f"{k} {_bytes(v)}" for k, v in sto["bytes"].items() if v)
    lines.append(
        f"store: {_bytes(sto['total_bytes'])} ({parts}); COGs {_bytes(sto['cog_bytes'])}; an uncompressed "
        "upper bound (chunks and COGs are compressed)"
    )
    lines.append(
        f"total: about {_duration(plan['total_s'])} with {plan['workers']} worker(s) of "
        f"{plan['threads_per_worker']} thread(s); work units: agriland plan --json | jq .stages; tiled "
        "stages scale with workers ideally (a lower bound), training, clusters and publish do not"
    )
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)
