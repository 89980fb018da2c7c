"""The pipeline: search -> cube -> patches -> embeddings -> clusters -> segmentation -> publish.

:func:`run` composes the stage modules over one output folder::

    OUT/agriland.zarr   groups cube, patches, embeddings, clusters, segmentation (one UTM zone);
                        utm18n/cube, utm33n/cube, ... per zone when the region spans several,
                        plus ``mosaic`` (probability in cube.mosaic_crs) when asked
    OUT/cog/            cluster_map.tif, probability.tif, mask.tif (Cloud-Optimized GeoTIFF)
    OUT/models/         cae.keras, encoder.keras, unet.keras (+ .json metadata sidecars)
    OUT/items.json      the exact STAC items the run used
    OUT/run.json        config, inputs, versions, timings, dashboard link, stage status
    OUT/report.html     one self-contained page: config, items, quicklooks, clusters, training
    OUT/stac/           STAC Collection + Items of the products (COG and Zarr assets)
    OUT/clusters/       gallery.png, embedding_map.png, stats.csv (per zone when several)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
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
from .errors import AgrilandWarning, ConfigError, EmptyRegion, NoItemsFound, OutputExists
from .items import normalize_items
from .cluster_report import write_cluster_products
from .labels import IGNORE, load_labels
from .report import write_report
from .stac_out import write_stac
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
        try:  # also for a failed run: the report shows what exists and where it stopped
            write_report(out)
        except Exception as e:  # noqa: BLE001 - a report problem must never hide the run's own error
            log.warning("could not write %s: %s", out / "report.html", e)
    report(f"done in {record['timings_s']['total']:.0f} s: {out}")
    return record


def zone_name(epsg: int) -> str:
    """``32618`` -> ``utm18n``, ``32733`` -> ``utm33s``, others ``epsgNNNN``."""
    if 32601 <= epsg <= 32660:
        return f"utm{epsg - 32600:02d}n"
    if 32701 <= epsg <= 32760:
        return f"utm{epsg - 32700:02d}s"
    return f"epsg{epsg}"


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
            region = stac.region_of(cfg.search)
            with stac.api_url(cfg.search) as url:
                items = stac.search_items(cfg.search, url)
            (out / "items.json").write_text(json.dumps(
                {"type": "FeatureCollection", "features": [i.to_dict() for i in items]}, indent=1))
            record["inputs"] = {"api": cfg.search.api, "region_bbox": list(region.bbox), "items": [
                {"id": i.id, "datetime": str(i.datetime or i.properties.get("start_datetime")),
                 "cloud_cover": i.properties.get("eo:cloud_cover")} for i in items]}
            report(f"search: {len(items)} item(s)")

        # one entry per UTM zone: {name: prefix of its groups in the store}; a single zone
        # keeps the plain layout (cube, patches, ...), several use utm18n/cube, ...
        zones: dict[str, dict[str, Any]] = {}
        with stage("cube"):
            bands = cube_mod.load_bands(items, cfg.cube)
            items = normalize_items(items, bands)
            if cfg.cube.check_assets:
                items, bad = cube_mod.check_assets(items, bands, cfg.cube.on_bad_asset)
                record["inputs"]["skipped_assets"] = bad
                if not items:
                    raise NoItemsFound(f"every found item has an unreadable asset ({bad[0]['error']} ...)")
            cubes = cube_mod.load_zone_cubes(items, cfg.cube, region, normalized=True)
            multi = len(cubes) > 1
            empty = []
            for epsg, cube in cubes.items():
                name = zone_name(epsg)
                prefix = f"{name}/" if multi else ""
                publish.write_group(cube, store, prefix + "cube")
                cube = cube_mod.open_cube(store, prefix + "cube")
                chunks = cube_mod.chunk_valid_fraction(cube, cfg.cube.chunk)
                info = {"epsg": epsg, "prefix": prefix, "shape": dict(cube.sizes), "crs": str(cube.rio.crs),
                        "transform": list(cube.rio.transform())[:6], "bounds": list(cube.rio.bounds()),
                        "items": list(cube.attrs["items"]), "chunks": int(chunks.size),
                        "empty_chunks": int((chunks == 0).sum())}
                if not (chunks > 0).any():
                    empty.append(name)
                    info["empty"] = True
                else:
                    zones[name] = info
                record.setdefault("zones", {})[name] = info
                report(f"cube {name}: {dict(cube.sizes)} in {cube.rio.crs}, "
                       f"{info['empty_chunks']}/{info['chunks']} chunks without clear pixels")
            if not zones:
                raise EmptyRegion(
                    "every pixel of the region is nodata or masked (clouds, shadows): choose "
                    "another search.datetime or raise search.max_cloud_cover")
            if empty:
                warnings.warn(f"zone(s) {empty} have no clear pixel and are left out", AgrilandWarning,
                              stacklevel=1)
            first = next(iter(zones.values()))
            record["cube"] = {k: first[k] for k in ("shape", "crs", "transform", "bounds")}

        p = cfg.patches
        index: dict[str, xr.Dataset] = {}
        valid: dict[str, np.ndarray] = {}
        with stage("patches"):
            for name, z in zones.items():
                cube = cube_mod.open_cube(store, z["prefix"] + "cube")
                index[name] = patches_mod.patch_index(cube, p.size, p.stride)
                publish.write_group(index[name], store, z["prefix"] + "patches")
                valid[name] = index[name]["valid_fraction"].values >= p.min_valid_fraction
                z["patches"] = {"count": int(index[name].sizes["patch"]), "valid": int(valid[name].sum()),
                                "grid": [index[name].attrs["n_rows"], index[name].attrs["n_cols"]]}
            record["patches"] = {k: sum(z["patches"][k] for z in zones.values()) for k in ("count", "valid")}
            if not multi:
                record["patches"]["grid"] = first["patches"]["grid"]
            report(f"patches: {record['patches']['count']} ({record['patches']['valid']} valid)")

        e = cfg.embed
        with stage("embeddings"):
            # the CAE learns from the zone with the most valid patches; every zone is embedded
            train_zone = max(zones, key=lambda n: valid[n].sum())
            sel = np.flatnonzero(valid[train_zone])
            ix = index[train_zone]
            fut = client.submit(train_cae, store, ix["y0"].values[sel], ix["x0"].values[sel], e,
                                p.size, str(models / "cae.keras"), seed=cfg.seed, region=cfg.name,
                                group=zones[train_zone]["prefix"] + "cube", resources=res, pure=False)
            cae_meta = fut.result()
            record["cae"] = {k: v for k, v in cae_meta.items() if k != "history"} | {
                "final_loss": (cae_meta["history"].get("loss") or [None])[-1], "zone": train_zone}
            report(f"CAE trained on {train_zone}: {e.train.epochs} epoch(s) x {e.train.steps_per_epoch} "
                   f"steps in {cae_meta['seconds']:.0f} s")
            for name, z in zones.items():
                emb = embed_mod.embed_patches(cae_meta["encoder_path"], store, index[name], e.bands,
                                              e.reflectance_max, batch_size=e.batch_size,
                                              min_valid_fraction=p.min_valid_fraction, resources=res,
                                              group=z["prefix"] + "cube")
                publish.write_group(emb, store, z["prefix"] + "embeddings")

        with stage("clusters"):
            # one clustering over every zone's embeddings, so cluster ids mean the same everywhere
            embs = [publish.open_product(store, z["prefix"] + "embeddings")["embedding"] for z in zones.values()]
            sizes = [em.sizes["patch"] for em in embs]
            emb_all = xr.concat(embs, dim="patch").assign_coords(patch=np.arange(sum(sizes)))
            valid_all = np.concatenate([valid[n] for n in zones])
            cl_all, info = cluster_mod.cluster_embeddings(emb_all, valid_all, cfg.cluster, seed=cfg.seed)
            start = 0
            for (name, z), n in zip(zones.items(), sizes):
                cube = cube_mod.open_cube(store, z["prefix"] + "cube")
                cl = cl_all.isel(patch=slice(start, start + n)).assign_coords(patch=index[name]["patch"].values)
                start += n
                cl["cluster_map"] = cluster_mod.cluster_map(cl["labels"].values, index[name], cube)
                cl = cube_mod.write_georef(cl, cube.rio.crs)
                publish.write_group(cl, store, z["prefix"] + "clusters")
            labels_all = cl_all["labels"].values
            record["clusters"] = info | {"sizes": np.bincount(labels_all[valid_all], minlength=cfg.cluster.k).tolist()}
            report(f"clusters: k={cfg.cluster.k}, DEC {info['dec_iterations']} iterations")

        s = cfg.segment
        with stage("segmentation"):
            if not s.labels:
                raise ConfigError("segment.labels is not set: the U-Net needs labelled polygons "
                                  "(GeoJSON with a 'class' property); see the README")
            label_path = str(resolve_path(s.labels, Path.cwd()))
            labels, why = {}, []
            for name, z in zones.items():
                try:
                    labels[name] = load_labels(label_path, cube_mod.open_cube(store, z["prefix"] + "cube"),
                                               s.positive_classes)
                except EmptyRegion as err:
                    why.append(f"{name}: {err}")
            if not labels:
                raise EmptyRegion("; ".join(why))
            # the U-Net learns in the zone with the most labelled pixels, then maps every zone
            train_zone = max(labels, key=lambda n: int((labels[n].values != IGNORE).sum()))
            fut = client.submit(train_unet, store, labels[train_zone].values, s, str(models / "unet.keras"),
                                seed=cfg.seed, label_source=label_path, group=zones[train_zone]["prefix"] + "cube",
                                resources=res, pure=False)
            unet_meta = fut.result()
            record["unet"] = {k: v for k, v in unet_meta.items() if k != "per_epoch"} | {"zone": train_zone}
            report(f"U-Net ({s.encoder}) trained on {train_zone} in {unet_meta['seconds']:.0f} s, "
                   f"validation IoU {unet_meta['validation_metrics']['iou']:.3f}")
            for name, z in zones.items():
                cube = cube_mod.open_cube(store, z["prefix"] + "cube")
                seg = segment.segment_region(str(models / "unet.keras"), store, cube, s.bands,
                                             window=s.window, overlap=s.overlap,
                                             reflectance_max=s.reflectance_max, threshold=s.threshold,
                                             batch_size=s.batch_size, resources=res, group=z["prefix"] + "cube")
                if name in labels:
                    seg["training_label"] = labels[name].chunk({"y": cfg.cube.chunk, "x": cfg.cube.chunk})
                    seg["training_label"].encoding.update(_FillValue=None)
                seg = cube_mod.write_georef(seg, cube.rio.crs)
                publish.write_group(seg, store, z["prefix"] + "segmentation")

        with stage("publish"):
            cogs = out / "cog"
            groups, seg_by_zone = [], {}
            for name, z in zones.items():
                pre, tag = z["prefix"], (f"{name}_" if multi else "")
                cube = cube_mod.open_cube(store, pre + "cube")
                cl = publish.open_product(store, pre + "clusters")
                seg = publish.open_product(store, pre + "segmentation")
                seg_by_zone[name] = seg
                publish.write_cog(cl["cluster_map"], cogs / f"{tag}cluster_map.tif", nodata=-1)
                publish.write_cog(seg["probability"], cogs / f"{tag}probability.tif", nodata=np.nan)
                publish.write_cog(seg["mask"].fillna(255).astype("uint8"), cogs / f"{tag}mask.tif", nodata=255)
                publish.write_quicklook(cube, cl, seg, out / f"quicklook{'_' + name if multi else ''}.png")
                groups += [pre + g for g in ("cube", "patches", "embeddings", "clusters", "segmentation")]
            if cfg.cube.mosaic_crs:
                mosaic = publish.mosaic_zones(seg_by_zone, cfg.cube.mosaic_crs, cfg.cube.mosaic_resolution)
                publish.write_group(mosaic, store, "mosaic")
                publish.write_cog(mosaic["probability"], cogs / "mosaic_probability.tif", nodata=np.nan)
                groups.append("mosaic")
            for name in zones:  # per-cluster gallery, statistics and embedding map
                write_cluster_products(store, out, cfg.cluster.k, cfg.seed, zone=name if multi else "")
            publish.consolidate(store)
            record["products"] = {"zarr": store, "groups": groups,
                                  "cogs": sorted(str(x) for x in cogs.glob("*.tif")),
                                  "report": str(out / "report.html"), "stac": str(out / "stac" / "collection.json")}
            publish.write_json(record, out / "run.json")
            write_stac(out)


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
