"""The model stages: cae and unet (training), embeddings, clusters, segmentation (applying them).

Functions of the run's context, as :data:`~.stages.STAGE_FUNCTIONS` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import xarray as xr

from agriland_scale.cluster.fit import NOT_CLUSTERED, cluster_map, fit_clusters_streaming
from agriland_scale.config.files import resolve_path
from agriland_scale.errors import EmptyRegion
from agriland_scale.labels.classes import IGNORE
from agriland_scale.labels.raster import load_labels
from agriland_scale.models.embed import check_model, embed_patches
from agriland_scale.models.engines import have_onnxruntime
from agriland_scale.models.files import model_threshold
from agriland_scale.models.segment import segment_region
from agriland_scale.models.train import train_cae, train_unet
from agriland_scale.models.windows import training_windows
from agriland_scale.pipeline.context import RunContext
from agriland_scale.pipeline.data_stages import patch_table
from agriland_scale.store import open_cube, run_relative, write_georef

__all__ = ["cae_stage", "clusters_stage", "embeddings_stage", "segmentation_stage", "unet_stage"]


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


def cae_stage(ctx: RunContext) -> None:
    """Train the convolutional autoencoder on the valid patches, or take ``embed.model``."""
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
    idx = {n: patch_table(ctx, z) for n, z in zones.items()}
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
        precision=ctx.cfg.runtime.train_precision,  # resolved on the worker that trains
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
    """Embed every valid patch with the CAE's encoder on the workers, block by block."""
    e, p = ctx.cfg.embed, ctx.cfg.patches
    todo = []
    for name, z in ctx.zones().items():
        index, _ = patch_table(ctx, z)
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
    """Cluster every zone's embeddings together: streaming k-means, DEC refinement, cluster maps."""
    # one clustering over every zone's embeddings, so cluster ids mean the same everywhere;
    # k-means and DEC stream the stored embeddings on a worker (memory: one chunk + sample)
    c, zones = ctx.cfg.cluster, ctx.zones()
    idx = {n: patch_table(ctx, z) for n, z in zones.items()}
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
    """Train the U-Net on the labels (or take ``segment.model``) and choose its threshold on validation."""
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
        precision=ctx.cfg.runtime.train_precision,  # resolved on the worker that trains
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
    """Predict each zone's agricultural-land probability and mask, overlapping windows blended."""
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
