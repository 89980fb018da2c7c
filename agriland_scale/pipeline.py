"""The pipeline: search -> cube -> patches -> embeddings -> clusters -> segmentation -> publish.

:func:`run` composes the stage modules over one output folder::

    OUT/agriland.zarr   groups cube, patches, embeddings, clusters, segmentation
    OUT/cog/            cluster_map.tif, probability.tif, mask.tif (Cloud-Optimized GeoTIFF)
    OUT/models/         cae.keras, encoder.keras, unet.keras (+ .json metadata sidecars)
    OUT/items.json      the exact STAC items the run used
    OUT/run.json        config, inputs, versions, timings, dashboard link, stage status
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import cluster as cluster_mod
from . import cube as cube_mod
from . import embed as embed_mod
from . import patches as patches_mod
from . import publish, segment, stac
from .config import RunConfig, resolve_path
from .errors import ConfigError, OutputExists
from .labels import rasterize_labels
from .runtime import dask_client, gpu_resources
from .train import train_cae, train_unet

__all__ = ["STAGES", "run"]

log = logging.getLogger(__name__)

STAGES = ("search", "cube", "patches", "embeddings", "clusters", "segmentation", "publish")


def _check_output(out: Path, cfg: RunConfig, overwrite: bool) -> None:
    run_json = out / "run.json"
    if run_json.exists():
        try:
            old = json.loads(run_json.read_text()).get("config")
        except json.JSONDecodeError:
            old = None
        if old != json.loads(cfg.model_dump_json()) and not overwrite:
            raise OutputExists(f"{out} holds another run (run.json with a different config "
                               f"'{(old or {}).get('name', '?')}'): choose another --out, or pass "
                               "--overwrite to replace it")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} is not empty and holds no agriland run: choose an empty or new "
                           "--out folder, or pass --overwrite")


def run(cfg: RunConfig, out: str | Path, *, scheduler: str | None = None, overwrite: bool = False,
        report: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run every stage of ``cfg`` into the folder ``out``; returns the run record (run.json).

    ``scheduler`` (or ``cfg.runtime.scheduler``) connects to an existing Dask cluster;
    otherwise a LocalCluster is started and closed. ``report`` receives progress lines.
    """
    out = Path(out).resolve()
    _check_output(out, cfg, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    store = str(out / "agriland.zarr")
    models = out / "models"
    models.mkdir(exist_ok=True)
    record: dict[str, Any] = {
        "config": json.loads(cfg.model_dump_json()), "versions": publish.package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings_s": {}, "stages": {},
    }
    t_run = time.perf_counter()
    try:
        _run_stages(cfg, out, store, models, record, report, scheduler)
    finally:
        record["timings_s"]["total"] = time.perf_counter() - t_run
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        publish.write_json(record, out / "run.json")
    report(f"done in {record['timings_s']['total']:.0f} s: {out}")
    return record


def _run_stages(cfg: RunConfig, out: Path, store: str, models: Path, record: dict[str, Any],
                report: Callable[[str], None], scheduler: str | None) -> None:
    def stage(name: str):
        return _Stage(name, record, report)

    with dask_client(cfg.runtime, scheduler) as client:
        record["dashboard"] = client.dashboard_link
        record["scheduler"] = client.scheduler.address
        report(f"Dask dashboard: {client.dashboard_link}")
        res = gpu_resources(client)
        record["gpu"] = bool(res)
        publish.write_json(record, out / "run.json")

        with stage("search"):
            with stac.api_url(cfg.search) as url:
                items = stac.search_items(cfg.search, url)
            (out / "items.json").write_text(json.dumps(
                {"type": "FeatureCollection", "features": [i.to_dict() for i in items]}, indent=1))
            record["inputs"] = {"api": cfg.search.api, "items": [
                {"id": i.id, "datetime": str(i.datetime or i.properties.get("start_datetime")),
                 "cloud_cover": i.properties.get("eo:cloud_cover")} for i in items]}
            report(f"search: {len(items)} item(s)")

        with stage("cube"):
            cube = cube_mod.load_cube(items, cfg.cube, cfg.search.bbox)
            publish.write_group(cube, store, "cube")
            cube = cube_mod.open_cube(store)
            cube_mod.check_not_empty(cube)
            record["cube"] = {"shape": dict(cube.sizes), "crs": str(cube.rio.crs),
                              "transform": list(cube.rio.transform())[:6],
                              "bounds": list(cube.rio.bounds())}
            report(f"cube: {dict(cube.sizes)} in {cube.rio.crs}")

        p = cfg.patches
        with stage("patches"):
            index = patches_mod.patch_index(cube, p.size, p.stride)
            publish.write_group(index, store, "patches")
            valid = index["valid_fraction"].values >= p.min_valid_fraction
            record["patches"] = {"count": int(index.sizes["patch"]), "valid": int(valid.sum()),
                                 "grid": [index.attrs["n_rows"], index.attrs["n_cols"]]}
            report(f"patches: {index.sizes['patch']} ({int(valid.sum())} valid)")

        e = cfg.embed
        with stage("embeddings"):
            sel = np.flatnonzero(valid)
            fut = client.submit(train_cae, store, index["y0"].values[sel], index["x0"].values[sel], e,
                                p.size, str(models / "cae.keras"), seed=cfg.seed, region=cfg.name,
                                resources=res, pure=False)
            cae_meta = fut.result()
            record["cae"] = {k: v for k, v in cae_meta.items() if k != "history"} | {
                "final_loss": (cae_meta["history"].get("loss") or [None])[-1]}
            report(f"CAE trained: {e.train.epochs} epoch(s) x {e.train.steps_per_epoch} steps "
                   f"in {cae_meta['seconds']:.0f} s")
            emb = embed_mod.embed_patches(cae_meta["encoder_path"], store, index, e.bands, e.reflectance_max,
                                          batch_size=e.batch_size, min_valid_fraction=p.min_valid_fraction,
                                          resources=res)
            publish.write_group(emb, store, "embeddings")

        with stage("clusters"):
            emb = publish.open_product(store, "embeddings")["embedding"]
            cl, info = cluster_mod.cluster_embeddings(emb, valid, cfg.cluster, seed=cfg.seed)
            cl["cluster_map"] = cluster_mod.cluster_map(cl["labels"].values, index, cube)
            cl = cube_mod.write_georef(cl, cube.rio.crs)
            publish.write_group(cl, store, "clusters")
            record["clusters"] = info | {"sizes": np.bincount(cl["labels"].values[valid],
                                                              minlength=cfg.cluster.k).tolist()}
            report(f"clusters: k={cfg.cluster.k}, DEC {info['dec_iterations']} iterations")

        s = cfg.segment
        with stage("segmentation"):
            if not s.labels:
                raise ConfigError("segment.labels is not set: the U-Net needs labelled polygons "
                                  "(GeoJSON with a 'class' property); see the README")
            label_path = str(resolve_path(s.labels, Path.cwd()))
            label = rasterize_labels(label_path, cube, s.positive_classes)
            fut = client.submit(train_unet, store, label.values, s, str(models / "unet.keras"),
                                seed=cfg.seed, label_source=label_path, resources=res, pure=False)
            unet_meta = fut.result()
            record["unet"] = {k: v for k, v in unet_meta.items() if k != "per_epoch"}
            report(f"U-Net ({s.encoder}) trained in {unet_meta['seconds']:.0f} s, validation "
                   f"IoU {unet_meta['validation_metrics']['iou']:.3f}")
            seg = segment.segment_region(str(models / "unet.keras"), store, cube, s.bands,
                                         window=s.window, overlap=s.overlap,
                                         reflectance_max=s.reflectance_max, threshold=s.threshold,
                                         batch_size=s.batch_size, resources=res)
            seg["training_label"] = label.chunk({"y": cfg.cube.chunk, "x": cfg.cube.chunk})
            seg["training_label"].encoding.update(_FillValue=None)
            seg = cube_mod.write_georef(seg, cube.rio.crs)
            publish.write_group(seg, store, "segmentation")

        with stage("publish"):
            cl = publish.open_product(store, "clusters")
            seg = publish.open_product(store, "segmentation")
            cogs = out / "cog"
            publish.write_cog(cl["cluster_map"], cogs / "cluster_map.tif", nodata=-1)
            publish.write_cog(seg["probability"], cogs / "probability.tif", nodata=np.nan)
            publish.write_cog(seg["mask"].fillna(255).astype("uint8"), cogs / "mask.tif", nodata=255)
            publish.write_quicklook(cube, cl, seg, out / "quicklook.png")
            publish.consolidate(store)
            record["products"] = {"zarr": store, "groups": ["cube", "patches", "embeddings",
                                                            "clusters", "segmentation"],
                                  "cogs": sorted(str(x) for x in cogs.glob("*.tif"))}


class _Stage:
    """Times a stage and records its status in the run record (also on failure)."""

    def __init__(self, name: str, record: dict[str, Any], report: Callable[[str], None]):
        self.name, self.record, self.report = name, record, report

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        self.record["stages"][self.name] = "running"

    def __exit__(self, et, ev, tb) -> None:
        dt = time.perf_counter() - self.t0
        self.record["timings_s"][self.name] = dt
        self.record["stages"][self.name] = "failed" if et else "done"
        if et:
            self.record["error"] = f"{self.name}: {ev}"
        else:
            self.report(f"[{self.name}] {dt:.1f} s")
