"""The data stages: search (STAC items), cube (the masked composite of each zone), patches (the patch index).

Functions of the run's context, as :data:`~.stages.STAGE_FUNCTIONS` lists them.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import numpy as np
import pystac
import xarray as xr

from agriland_scale.cube.assets import READ_SKIPPED, check_assets, describe_skipped
from agriland_scale.cube.load import load_bands, load_zone_cubes
from agriland_scale.cube.masks import chunk_valid_fraction
from agriland_scale.cube.reads import SkippedReads
from agriland_scale.errors import AgrilandWarning, ConfigError, EmptyRegion, NoItemsFound
from agriland_scale.files import write_json
from agriland_scale.layout import ITEMS, zone_name
from agriland_scale.models.files import read_sidecar
from agriland_scale.models.segment import choose_inference_window
from agriland_scale.patches import patch_index
from agriland_scale.pipeline.context import RunContext
from agriland_scale.pipeline.runtime import MAIN_WORKER
from agriland_scale.search.items import acquired, normalize_items
from agriland_scale.search.stac import api_url, region_of, search_items
from agriland_scale.store import open_cube, open_product
from agriland_scale.store.blocks import BlockGrid

__all__ = ["cube_stage", "patch_table", "patches_stage", "search_stage"]


def _items(ctx: RunContext) -> list[pystac.Item]:
    fc = json.loads((ctx.out / ITEMS).read_text())
    return [pystac.Item.from_dict(f) for f in fc["features"]]


def search_stage(ctx: RunContext) -> None:
    """Search the STAC API for the region's items and record them (``items.json``, ``inputs``)."""
    cfg = ctx.cfg
    region = region_of(cfg.search)
    with api_url(cfg.search) as url:
        items = search_items(cfg.search, url)
    write_json({"type": "FeatureCollection", "features": [i.to_dict() for i in items]}, ctx.out / ITEMS)
    ctx.record["inputs"] = {
        "api": cfg.search.api,
        "region_bbox": list(region.bbox),
        "items": [
            {"id": i.id, "datetime": acquired(i), "cloud_cover": i.properties.get("eo:cloud_cover")}
            for i in items
        ],
    }
    ctx.say(f"search: {len(items)} item(s)")


def cube_stage(ctx: RunContext) -> None:
    """Load, mask and composite each UTM zone's cube, and write it to the store block by block."""
    # one entry per UTM zone: {name: prefix of its groups in the store}; a single zone
    # keeps the plain layout (cube, patches, ...), several use utm18n/cube, ...
    cfg, rec = ctx.cfg, ctx.record
    region = region_of(cfg.search)
    items = _items(ctx)
    bands = load_bands(items, cfg.cube)
    items = normalize_items(items, bands)
    # inputs.skipped_assets: the probe's records (items left out, found again each attempt),
    # then the parts of assets left out while the cube was computed (an earlier attempt's
    # kept for the blocks this one reuses)
    inputs = rec.setdefault("inputs", {})
    earlier = [b for b in inputs.get("skipped_assets") or [] if b.get("problem") == READ_SKIPPED]
    bad: list[dict] = []
    if cfg.cube.check_assets:
        items, bad = check_assets(items, bands, cfg.cube.on_bad_asset)
        inputs["skipped_assets"] = bad + earlier
        for b in bad:
            ctx.say(f"cube: {describe_skipped(b)}")
        if not items:
            b = bad[0]
            raise NoItemsFound(
                f"every found item has a bad asset and cube.on_bad_asset is 'skip', so none is left: "
                f"e.g. item {b['item']}, asset '{b['asset']}' ({b['href']}): {str(b['error'])[:300]}. "
                "Fix or download the assets again, or widen the search"
            )
    ctx.say(f"cube: planning the cube of {len(items)} item(s) at {cfg.cube.resolution:g} m")
    t0 = time.perf_counter()
    zones, empty, written = {}, [], {}
    reused: dict[str, set[int]] = {}  # per zone, the blocks an earlier attempt wrote
    with SkippedReads(ctx.client) as skipped:
        cubes = load_zone_cubes(items, cfg.cube, region, normalized=True, encoded=True)
        ctx.say(
            "cube: planned "
            + ", ".join(f"{zone_name(e)} {c.sizes['y']:,} x {c.sizes['x']:,} px" for e, c in cubes.items())
            + f" in {time.perf_counter() - t0:.1f} s"
        )
        multi = len(cubes) > 1
        try:
            # while the run's own worker imports TensorFlow, a worker in this process computes the cube
            with ctx.data_workers() as workers:
                rec["cube_computed_by"] = (
                    "the cluster" if workers is None else f"{MAIN_WORKER} (the workers loaded models)"
                )
                groups = {zone_name(e): (f"{zone_name(e)}/" if multi else "") + "cube" for e in cubes}
                for name, group in groups.items():
                    reused[name] = ctx.products.pending_blocks(group)
                # the zones together: their blocks share the cluster (Products.write_together)
                stats = ctx.products.write_together(
                    [(cube, groups[zone_name(e)], f"cube {zone_name(e)}") for e, cube in cubes.items()],
                    ("y", "x"),
                    ctx.client,
                    block=cfg.runtime.block_px,
                    max_tasks=cfg.runtime.wave_tasks,
                    settings=ctx.settings("cube"),
                    progress=ctx.progress,
                    workers=workers,
                )
                for name, group in groups.items():
                    written[name] = stats[group]
                    if not written[name]["reused"]:
                        reused[name] = set()
        finally:  # also when a block fails: the next attempt keeps the records of the blocks it reuses
            for epsg in cubes:
                name = zone_name(epsg)
                if name not in reused:
                    reused[name] = ctx.products.pending_blocks((f"{name}/" if multi else "") + "cube")
            grids = {
                zone_name(e): BlockGrid.of(c, ("y", "x"), cfg.runtime.block_px) for e, c in cubes.items()
            }
            parts = skipped.records(
                {zone_name(e): c for e, c in cubes.items()},
                reused,
                earlier,
                block_of=lambda zone, row, col: grids[zone].block_at(row, col),
            )
            inputs["skipped_assets"] = bad + parts
            for part in parts:
                ctx.say(f"cube: {describe_skipped(part)}")
    for epsg, cube in cubes.items():
        name = zone_name(epsg)
        prefix = f"{name}/" if multi else ""
        stats = written[name]
        # opened without dask: a small cube's clear counts are read here, with no task graph (a
        # few MB of counts cost less than the cluster's round trips); a region's are counted by
        # the workers, a window a task, and only the counts come back; the rest is metadata
        cube = open_cube(ctx.store, prefix + "cube", dask=False)
        chunks = chunk_valid_fraction(
            cube, cfg.cube.chunk, client=ctx.client, store=ctx.store, group=prefix + "cube"
        )
        info = {
            "epsg": epsg,
            "prefix": prefix,
            "shape": {d: cube.sizes[d] for d in ("band", "y", "x")},
            "crs": str(cube.rio.crs),
            "transform": list(cube.rio.transform())[:6],
            "bounds": list(cube.rio.bounds()),
            "items": list(cube.attrs["items"]),
            "chunks": int(chunks.size),
            "empty_chunks": int((chunks == 0).sum()),
            "blocks_reused": stats["reused"],
        }
        if not (chunks > 0).any():
            empty.append(name)
            info["empty"] = True
        zones[name] = info
        ctx.say(
            f"cube {name}: {dict(cube.sizes)} in {cube.rio.crs}, "
            f"{info['empty_chunks']}/{info['chunks']} chunks without clear pixels"
        )
    rec["zones"] = zones
    if len(empty) == len(zones):
        raise EmptyRegion(
            "every pixel of the region is nodata or masked (clouds, shadows): choose "
            "another search.datetime or raise search.max_cloud_cover"
        )
    if empty:
        warnings.warn(f"zone(s) {empty} have no clear pixel and are left out", AgrilandWarning, stacklevel=1)
    first = next(iter(ctx.zones().values()))
    rec["cube"] = {k: first[k] for k in ("shape", "crs", "transform", "bounds")}
    s = ctx.cfg.segment
    if s.model and "segmentation" in ctx.wanted and rec["stages"].get("segmentation") != "done":
        # a given U-Net is loaded and traced at the window the segmentation will use, on the
        # workers, while patches, embeddings and clusters run
        encoder = read_sidecar(s.model).get("encoder")
        sizes = {
            choose_inference_window(
                s.inference_window, s.window, s.overlap, z["shape"]["y"], z["shape"]["x"], encoder
            )
            for z in ctx.zones().values()
        }
        ctx.warm_up(
            [(s.model, size, len(s.bands), size == s.window) for size in sorted(sizes)], "segmentation"
        )


def patch_table(ctx: RunContext, zone: dict[str, Any]) -> tuple[xr.Dataset, np.ndarray]:
    """Return zone ``zone``'s patch index and which of its patches are valid enough to embed."""
    index = open_product(ctx.store, zone["prefix"] + "patches").load()
    return index, index["valid_fraction"].values >= ctx.cfg.patches.min_valid_fraction


def patches_stage(ctx: RunContext) -> None:
    """Write each zone's patch index (georeferenced windows and their valid fraction), on the workers."""
    p = ctx.cfg.patches
    for name, z in ctx.zones().items():
        cube = open_cube(ctx.store, z["prefix"] + "cube")
        # counted by the workers (patches-index-... tasks, a window of patches each, reading
        # the store): only one number a patch comes back
        index = patch_index(
            cube, p.size, p.stride, client=ctx.client, store=ctx.store, group=z["prefix"] + "cube"
        )
        ctx.products.write(index, z["prefix"] + "patches")
        valid = index["valid_fraction"].values >= p.min_valid_fraction
        z["patches"] = {
            "count": int(index.sizes["patch"]),
            "valid": int(valid.sum()),
            "grid": [index.attrs["n_rows"], index.attrs["n_cols"]],
        }
    zones = ctx.zones()
    ctx.record["patches"] = {k: sum(z["patches"][k] for z in zones.values()) for k in ("count", "valid")}
    if len(ctx.record["zones"]) == 1:
        ctx.record["patches"]["grid"] = next(iter(zones.values()))["patches"]["grid"]
    ctx.say(f"patches: {ctx.record['patches']['count']} ({ctx.record['patches']['valid']} valid)")
    valid, k = ctx.record["patches"]["valid"], ctx.cfg.cluster.k
    if valid < k and "clusters" in ctx.wanted:  # refused here, not after hours of CAE training
        fix = f"set cluster.k to at most {valid}, or " if valid >= 2 else ""
        raise ConfigError(
            f"cluster.k is {k} but the region has only {valid} valid patch(es) (of "
            f"{ctx.record['patches']['count']}; a patch is valid with at least "
            f"{ctx.cfg.patches.min_valid_fraction:.0%} clear pixels): {fix}enlarge the region, "
            "lower patches.stride or lower patches.min_valid_fraction"
        )
