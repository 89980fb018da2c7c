"""The stages of a run, each a plain function of the run's context.

``STAGE_FUNCTIONS`` maps each stage name of :data:`~agriland_scale.layout.STAGES` to the
function that does its work. A stage reads the products of the stages it depends on from the
store, writes its own through ``ctx.products`` (resumable, block by block) and notes what it
found in ``ctx.record``; the runner (:mod:`.runner`) owns status, timing, files and resume.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pystac
import xarray as xr

from agriland_scale.cluster.fit import NOT_CLUSTERED, cluster_map, fit_clusters_streaming
from agriland_scale.config.files import resolve_path
from agriland_scale.cube.assets import READ_SKIPPED, check_assets, describe_skipped
from agriland_scale.cube.load import load_bands, load_zone_cubes
from agriland_scale.cube.masks import chunk_valid_fraction
from agriland_scale.cube.reads import SkippedReads
from agriland_scale.errors import AgrilandWarning, ConfigError, EmptyRegion, NoItemsFound
from agriland_scale.files import write_json
from agriland_scale.labels.classes import IGNORE
from agriland_scale.labels.raster import load_labels
from agriland_scale.layout import ITEMS, zone_name
from agriland_scale.models.embed import check_model, embed_patches
from agriland_scale.models.engines import have_onnxruntime
from agriland_scale.models.files import model_threshold, read_sidecar
from agriland_scale.models.segment import choose_inference_window, segment_region
from agriland_scale.models.train import train_cae, train_unet
from agriland_scale.models.windows import training_windows
from agriland_scale.patches import patch_index
from agriland_scale.pipeline.context import RunContext
from agriland_scale.pipeline.publishing import publish_stage
from agriland_scale.pipeline.runtime import MAIN_WORKER
from agriland_scale.search.items import acquired, normalize_items
from agriland_scale.search.stac import api_url, region_of, search_items
from agriland_scale.store import open_cube, open_product, run_relative, write_georef
from agriland_scale.store.blocks import BlockGrid

__all__ = ["STAGE_FUNCTIONS"]


class _Rows:
    """Row-concatenation of several ``(patch, dim)`` Zarr arrays, read a slice at a time."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.starts = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(int)
        self.shape = (int(self.starts[-1]), int(arrays[0].shape[1]))

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop = sl.start or 0, min(sl.stop, self.shape[0])
        parts = []
        for a, s0, s1 in zip(self.arrays, self.starts[:-1], self.starts[1:]):
            lo, hi = max(start, s0), min(stop, s1)
            if hi > lo:
                parts.append(np.asarray(a[lo - s0 : hi - s0]))
        return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), dtype="float32")


def _fit_clusters_task(
    store: Any, groups: list[str], valid: np.ndarray, cfg, seed: int, sample_size: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Streaming k-means + DEC over the embeddings of every zone (runs on a worker).

    Returns the fit's summary and its arrays (``labels``, ``kmeans_labels`` ``(patch,)``,
    ``soft`` ``(patch, cluster)``, ``centroids`` ``(cluster, dim)``): a few bytes a patch,
    sent back to the client, which writes them into the run's store.
    """
    import zarr

    root = zarr.open_group(store, mode="r")
    emb = _Rows([cast(zarr.Group, root[g])["embedding"] for g in groups])
    fit = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    # _Rows reads like a Zarr array (``shape``, row slices), all fit_clusters_streaming uses
    info = fit_clusters_streaming(cast(zarr.Array, emb), valid, cfg, seed, out=fit, sample_size=sample_size)
    return info, {name: np.asarray(arr[...]) for name, arr in fit.arrays()}


def _items(ctx: RunContext) -> list[pystac.Item]:
    fc = json.loads((ctx.out / ITEMS).read_text())
    return [pystac.Item.from_dict(f) for f in fc["features"]]


def search_stage(ctx: RunContext) -> None:
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


def _index(ctx: RunContext, zone: dict[str, Any]) -> tuple[xr.Dataset, np.ndarray]:
    index = open_product(ctx.store, zone["prefix"] + "patches").load()
    return index, index["valid_fraction"].values >= ctx.cfg.patches.min_valid_fraction


def patches_stage(ctx: RunContext) -> None:
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


def cae_stage(ctx: RunContext) -> None:
    e, cfg = ctx.cfg.embed, ctx.cfg
    if e.model:  # a CAE encoder trained before (agriland train-cae), maybe on another region
        meta = check_model(
            e.model, "embedding", e.bands, e.reflectance_max, cfg.patches.size, key="embed.model"
        )
        ctx.record["cae"] = {
            "encoder_path": e.model,
            "given": True,
            "training_region": meta.get("training_region"),
        }
        ctx.say(f"CAE: using the encoder {e.model} (trained on '{meta.get('training_region')}')")
        return
    # the CAE learns from the zone with the most valid patches; every zone is embedded
    zones = ctx.zones()
    idx = {n: _index(ctx, z) for n, z in zones.items()}
    train_zone = max(zones, key=lambda n: idx[n][1].sum())
    ix, valid = idx[train_zone]
    sel = np.flatnonzero(valid)
    fut = ctx.client.submit(
        train_cae,
        ctx.store,
        ix["y0"].values[sel],
        ix["x0"].values[sel],
        e,
        cfg.patches.size,
        ctx.model_location("cae.keras"),
        seed=cfg.seed,
        region=cfg.name,
        group=zones[train_zone]["prefix"] + "cube",
        progress_tag=ctx.tag,
        resources=ctx.res,
        onnx=_export_after_training(ctx, "cae"),
        pure=False,
    )
    meta = fut.result()
    ctx.fetched_models()
    ctx.record["cae"] = {k: v for k, v in meta.items() if k != "history"} | {
        "final_loss": (meta["history"].get("loss") or [None])[-1],
        "zone": train_zone,
    }
    ctx.say(
        f"CAE trained on {train_zone}: {e.train.epochs} epoch(s) x {e.train.steps_per_epoch} "
        f"steps in {meta['seconds']:.0f} s"
    )


def _export_after_training(ctx: RunContext, stage: str) -> bool:
    """Whether training stage ``stage`` exports the ONNX artifact beside its model.

    Always for ``runtime.engine`` ``onnx`` or ``openvino``. Under ``auto``, when the run ends
    with this training (``agriland train-cae``/``train-unet``, ``--until cae``/``unet``: a model
    trained to be applied elsewhere) and ONNX Runtime is installed: the runs that apply it then
    start without TensorFlow. A run that trains and applies the model at once exports only
    where its stage is large enough (:func:`~agriland_scale.models.engines.resolve`): the
    demo's export would cost more (20-45 s) than it saves.
    """
    engine = ctx.cfg.runtime.engine
    if engine in ("onnx", "openvino"):
        return True
    return engine == "auto" and ctx.wanted[-1] == stage and have_onnxruntime()


def _engine_used(ctx: RunContext, stage: str, attrs: dict[str, Any]) -> None:
    """Record in run.json the engine and precision that predicted ``stage`` (``engines``)."""
    ctx.record.setdefault("engines", {})[stage] = {
        "engine": attrs.get("engine", "tensorflow"),
        "precision": attrs.get("precision"),
    }


def embeddings_stage(ctx: RunContext) -> None:
    e, p = ctx.cfg.embed, ctx.cfg.patches
    todo = []
    for name, z in ctx.zones().items():
        index, _ = _index(ctx, z)
        emb = embed_patches(
            ctx.record["cae"]["encoder_path"],
            ctx.store,
            index,
            e.bands,
            e.reflectance_max,
            batch_size=e.batch_size,
            min_valid_fraction=p.min_valid_fraction,
            resources=ctx.res,
            group=z["prefix"] + "cube",
            precision="mixed_float16" if e.mixed_precision and ctx.res else ctx.precision("embeddings"),
            engine=ctx.cfg.runtime.engine,
        )
        emb["embedding"].attrs["model"] = run_relative(
            ctx.record["cae"]["encoder_path"], ctx.out, ctx.location
        )
        _engine_used(ctx, "embeddings", emb["embedding"].attrs)
        todo.append((emb, z["prefix"] + "embeddings", f"embeddings {name}"))
    stats = ctx.products.write_together(
        todo,
        "patch",
        ctx.client,
        max_tasks=ctx.cfg.runtime.wave_tasks,
        settings=ctx.settings("embeddings"),
        progress=ctx.progress,
    )
    for z in ctx.zones().values():
        z["embeddings_blocks"] = stats[z["prefix"] + "embeddings"]


def clusters_stage(ctx: RunContext) -> None:
    # one clustering over every zone's embeddings, so cluster ids mean the same everywhere;
    # k-means and DEC stream the stored embeddings on a worker (memory: one chunk + sample)
    c, zones = ctx.cfg.cluster, ctx.zones()
    idx = {n: _index(ctx, z) for n, z in zones.items()}
    valid_all = np.concatenate([idx[n][1] for n in zones])
    fut = ctx.client.submit(
        _fit_clusters_task,
        ctx.store,
        [z["prefix"] + "embeddings" for z in zones.values()],
        valid_all,
        c,
        ctx.cfg.seed,
        c.sample_size,
        pure=False,
    )
    info, arrays = fut.result()
    fit = xr.Dataset(
        {
            "labels": ("patch", arrays["labels"]),
            "kmeans_labels": ("patch", arrays["kmeans_labels"]),
            "soft": (("patch", "cluster"), arrays["soft"]),
            "centroids": (("cluster", "dim"), arrays["centroids"]),
        }
    )
    start = 0
    for name, z in zones.items():
        index, _ = idx[name]
        n = index.sizes["patch"]
        cube = open_cube(ctx.store, z["prefix"] + "cube")
        cl = (
            fit.drop_vars("centroids")
            .isel(patch=slice(start, start + n))
            .assign_coords(patch=index["patch"].values, cluster=np.arange(c.k))
        )
        cl["centroids"] = fit["centroids"].assign_coords(cluster=np.arange(c.k))
        start += n
        for v in ("labels", "kmeans_labels"):  # CF: -1 is the declared fill (not clustered)
            cl[v].encoding["_FillValue"] = np.int16(-1)
        cl["labels"].attrs.update(long_name="DEC cluster", comment=NOT_CLUSTERED)
        cl["kmeans_labels"].attrs.update(long_name="k-means cluster", comment=NOT_CLUSTERED)
        cl["soft"].attrs.update(long_name="DEC soft assignment: probability of each cluster", units="1")
        cl["centroids"].attrs.update(long_name="DEC cluster centre in the embedding space", units="1")
        cl["patch"].attrs.update(long_name="patch number (as in the patches group)")
        cl["cluster"].attrs.update(long_name="cluster id")
        cl["cluster_map"] = cluster_map(cl["labels"].values, index, cube)
        cl = write_georef(cl, cube.rio.crs)
        ctx.products.write(cl, z["prefix"] + "clusters")
    ctx.record["clusters"] = info
    ctx.say(
        f"clusters: k={c.k}, DEC {info['dec_iterations']} iterations on {info['n_sample']} "
        f"patches, {info['n_clustered']} patches assigned"
    )


def _labels(ctx: RunContext, *, lazy: bool = False) -> dict[str, xr.DataArray]:
    """Each zone's labels on its cube grid; ``lazy``: rasterised over the polygons' window only."""
    s = ctx.cfg.segment
    assert s.labels is not None  # called only with segment.labels set (checked by the preflight)
    label_path = str(resolve_path(s.labels, Path.cwd()))
    labels, why = {}, []
    for name, z in ctx.zones().items():
        try:
            labels[name] = load_labels(
                label_path, open_cube(ctx.store, z["prefix"] + "cube"), s.positive_classes, lazy=lazy
            )
            labels[name].attrs["source"] = run_relative(label_path, ctx.out, ctx.location)  # no machine path
        except EmptyRegion as err:
            why.append(f"{name}: {err}")
    if not labels:
        raise EmptyRegion("; ".join(why))
    return labels


def unet_stage(ctx: RunContext) -> None:
    s, cfg = ctx.cfg.segment, ctx.cfg
    if s.model:  # a U-Net trained before (agriland train-unet), maybe on another region
        meta = check_model(s.model, "segmentation", s.bands, s.reflectance_max, s.window, key="segment.model")
        ctx.record["unet"] = {
            "model_path": s.model,
            "given": True,
            "training_region": meta.get("training_region"),
            "validation_metrics": meta.get("validation_metrics"),
            "threshold": meta.get("threshold"),
            **_mask_threshold(s.threshold, meta),
        }
        ctx.say(f"U-Net: using {s.model} (trained on '{meta.get('training_region')}')")
        return
    labels = _labels(ctx)
    assert s.labels is not None  # _labels needs them
    # the U-Net learns in the zone with the most labelled pixels, then maps every zone
    train_zone = max(labels, key=lambda n: int((labels[n].values != IGNORE).sum()))
    # labels that cannot train (no positive or no negative pixel) stop here, not after training
    training_windows(
        np.asarray(labels[train_zone].values),
        s,
        f"the labels {resolve_path(s.labels, Path.cwd())} (zone {train_zone})",
    )
    path = ctx.model_location("unet.keras")
    # the training task reads the label raster from the store (a full tile's is 120 MB:
    # not something to send through the scheduler)
    prefix = ctx.zones()[train_zone]["prefix"]
    crs = open_cube(ctx.store, prefix + "cube").rio.crs
    lab = write_georef(xr.Dataset({"label": labels[train_zone]}), crs)
    lab["label"].attrs.update(
        long_name="U-Net training label",
        flag_values=[0, 1, IGNORE],
        flag_meanings="other agricultural ignored",
    )
    lab["label"].encoding.update(chunks=(2048, 2048), _FillValue=None)
    ctx.products.write(lab, prefix + "labels")
    fut = ctx.client.submit(
        train_unet,
        ctx.store,
        prefix + "labels",
        s,
        path,
        seed=cfg.seed,
        label_source=str(resolve_path(s.labels, Path.cwd())),
        region=cfg.name,
        group=prefix + "cube",
        progress_tag=ctx.tag,
        resources=ctx.res,
        onnx=_export_after_training(ctx, "unet"),
        pure=False,
    )
    meta = fut.result()
    ctx.fetched_models()
    ctx.record["unet"] = {k: v for k, v in meta.items() if k != "per_epoch"} | {
        "zone": train_zone,
        "model_path": path,
        **_mask_threshold(s.threshold, meta),
    }
    ctx.say(
        f"U-Net ({s.encoder}) trained on {train_zone} in {meta['seconds']:.0f} s, "
        f"validation IoU {meta['validation_metrics']['iou']:.3f} at threshold "
        f"{meta['threshold']:g} (chosen on validation)"
    )


def _mask_threshold(setting: float | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Return what run.json says of the mask's threshold: ``segment.threshold``, else the model's."""
    if setting is not None:
        return {"mask_threshold": setting, "mask_threshold_from": "segment.threshold"}
    chosen = meta.get("threshold") is not None
    return {
        "mask_threshold": model_threshold(meta),
        "mask_threshold_from": "validation" if chosen else "default (the model records none)",
    }


def segmentation_stage(ctx: RunContext) -> None:
    s = ctx.cfg.segment
    # the training labels beside the probability: over a region, only the labels' window is
    # rasterised in this process (a whole zone's mask of 100 tiles would be 12 GB here)
    labels = _labels(ctx, lazy=True) if s.labels else {}
    todo = []
    for name, z in ctx.zones().items():
        cube = open_cube(ctx.store, z["prefix"] + "cube")
        seg = segment_region(
            ctx.record["unet"]["model_path"],
            ctx.store,
            cube,
            s.bands,
            window=s.window,
            overlap=s.overlap,
            reflectance_max=s.reflectance_max,
            threshold=s.threshold,
            batch_size=s.batch_size,
            # output chunks of 1024 px, or of the write block when that is smaller
            block=min(1024, ctx.cfg.runtime.block_px),
            resources=ctx.res,
            group=z["prefix"] + "cube",
            inference_window=s.inference_window,
            precision=ctx.precision("segmentation"),
            engine=ctx.cfg.runtime.engine,
            band=s.band_px or None,
        )
        seg["probability"].attrs["model"] = run_relative(
            ctx.record["unet"]["model_path"], ctx.out, ctx.location
        )
        _engine_used(ctx, "segmentation", seg["probability"].attrs)
        if name in labels:
            prob_chunks = seg["probability"].chunks
            assert prob_chunks is not None  # segment_region's products are lazy (dask)
            chunks = dict(zip(("y", "x"), prob_chunks))
            seg["training_label"] = labels[name].chunk(chunks)
            seg["training_label"].encoding.update(_FillValue=None)
            seg["training_label"].attrs.update(long_name="U-Net training label")
        todo.append((write_georef(seg, cube.rio.crs), z["prefix"] + "segmentation", f"segmentation {name}"))
    stats = ctx.products.write_together(
        todo,
        ("y", "x"),
        ctx.client,
        block=ctx.cfg.runtime.block_px,
        max_tasks=ctx.cfg.runtime.wave_tasks,
        settings=ctx.settings("segmentation"),
        progress=ctx.progress,
        band=s.band_px or None,  # band by band, as segment_region shares windows
    )
    for z in ctx.zones().values():
        z["segmentation_blocks"] = stats[z["prefix"] + "segmentation"]


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], None]] = {
    "search": search_stage,
    "cube": cube_stage,
    "patches": patches_stage,
    "cae": cae_stage,
    "embeddings": embeddings_stage,
    "clusters": clusters_stage,
    "unet": unet_stage,
    "segmentation": segmentation_stage,
    "publish": publish_stage,
}
