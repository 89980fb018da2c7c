"""The publish stage: files for people and GIS tools, drawn and written by the workers.

COGs (one a product, or one an output tile with a VRT over them: :mod:`~agriland_scale.publish.tiles`),
maps and quicklooks from overviews, the cluster report, field polygons, the STAC catalog and
the report, each part with its progress; :func:`publish_stage` is the stage's function in
:data:`~agriland_scale.pipeline.stages.STAGE_FUNCTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from agriland_scale.cluster.report import write_cluster_products
from agriland_scale.files import atomic_path
from agriland_scale.layout import COG_DIR
from agriland_scale.pipeline.context import RunContext
from agriland_scale.publish.cog import PRODUCT_VARIABLES
from agriland_scale.publish.figures import quicklooks
from agriland_scale.publish.mosaic import mosaic_zones
from agriland_scale.publish.stac import write_stac
from agriland_scale.publish.tiles import CogJob, cog_jobs, write_vrt, write_window
from agriland_scale.publish.vector import write_fields
from agriland_scale.store import open_product

__all__ = ["publish_stage"]


def _files_task(draw: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, bytes]:
    """Run ``draw(*args, out_dir, **kwargs)`` in a temporary folder of a worker; return its files.

    The pictures and tables of the publish stage are drawn on the workers, which may share no
    filesystem with this process: they come back as ``{path relative to OUT: bytes}``.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="agriland-publish-") as d:
        draw(*args, d, **kwargs)
        return {
            str(f.relative_to(d)).replace("\\", "/"): f.read_bytes()
            for f in sorted(Path(d).rglob("*"))
            if f.is_file()
        }


def _cluster_products(store: Any, k: int, seed: int, out_dir: str, *, zone: str) -> None:
    write_cluster_products(store, out_dir, k, seed, zone=zone)


def _write_cogs(ctx: RunContext, k: int, multi: bool, mosaic: bool = False) -> Callable[[], list[str]]:
    """Submit every zone's cluster map (``k`` clusters), probability and mask COGs to the workers.

    One task a COG (``publish-cog-PRODUCT-...``, :func:`~agriland_scale.publish.tiles.write_window`
    in :func:`_files_task`): a product that fits one output tile (``publish.tile_px``) is one
    COG, a larger one one COG a tile of the zone's grid. Returns the wait: it writes each
    COG into ``OUT/cog`` as its task finishes (progress ``publish COGs``), then a VRT per
    tiled product, and returns the files of ``OUT/cog`` it wrote (relative to OUT). With
    ``multi``, file names start with the zone; with ``mosaic``, the store's ``mosaic``
    probability is ``mosaic_probability`` (tiled likewise). Files of an earlier layout of the same
    product (one COG, or tiles of another size) are removed.
    """
    from uuid import uuid4

    from distributed import as_completed

    tile_px, out, cogs = ctx.cfg.publish.tile_px, ctx.out, ctx.out / COG_DIR
    jobs: list[CogJob] = []
    for name, z in ctx.zones().items():
        tag = f"{name}_" if multi else ""
        for product, (group, var) in PRODUCT_VARIABLES.items():
            h, w = open_product(ctx.store, z["prefix"] + group)[var].shape  # metadata only
            jobs += cog_jobs(tag + product, product, z["prefix"] + group, h, w, tile_px)
    if mosaic:
        h, w = open_product(ctx.store, "mosaic")["probability"].shape
        jobs += cog_jobs("mosaic_probability", "probability", "mosaic", h, w, tile_px)
    for stem in {j.stem for j in jobs}:  # another layout of the same product, from an earlier publish
        mine = {out / j.rel for j in jobs if j.stem == stem}
        old = [cogs / f"{stem}.tif", cogs / f"{stem}.vrt", *(cogs / stem).glob(f"{stem}_r*_c*.tif")]
        for f in old:
            if f not in mine:
                f.unlink(missing_ok=True)
        if (cogs / stem).is_dir() and not any((cogs / stem).iterdir()):
            (cogs / stem).rmdir()
    run = uuid4().hex[:8]
    futures = {
        ctx.client.submit(
            _files_task,
            write_window,
            ctx.store,
            j.group,
            j.product,
            k,
            None if j.tile is None else (j.tile.y0, j.tile.y1, j.tile.x0, j.tile.x1),
            j.rel,
            key=f"publish-cog-{j.product.replace('_', '-')}-{run}{i:06x}",
            pure=False,
        ): j
        for i, j in enumerate(jobs)
    }

    def wait() -> list[str]:
        written = []
        ctx.progress("publish COGs", 0, len(futures))
        for done, fut in enumerate(as_completed(futures), 1):
            for rel, data in fut.result().items():  # a failed COG fails the stage, with its own error
                with atomic_path(out / rel) as tmp:
                    tmp.write_bytes(data)
                written.append(rel)
            fut.release()
            ctx.progress("publish COGs", done, len(futures))
        for stem in sorted({j.stem for j in jobs if j.tile is not None}):
            tiles = [(j.rel.split("/", 1)[1], j.tile) for j in jobs if j.stem == stem and j.tile]
            write_vrt(cogs / f"{stem}.vrt", tiles)
            written.append(f"{COG_DIR}/{stem}.vrt")
            ctx.say(f"publish: {stem} in {len(tiles)} tiles of {tile_px} px, cog/{stem}.vrt over them")
        return written

    return wait


def publish_stage(ctx: RunContext) -> None:
    """Write the COGs, quicklooks, cluster report, field polygons, mosaic and STAC of the run.

    The workers do the work, in parallel: the cluster pictures (gallery, t-SNE map:
    matplotlib), the COGs (one task a COG or output tile, :func:`_write_cogs`), the overviews
    the report's maps are drawn from (:attr:`.RunContext.report_figures`, whose first three
    make the quicklook) and the field polygons, block by block; this process draws the maps
    from the overviews and writes the files as they come back (workers may share no
    filesystem with it).
    """
    from functools import partial
    from uuid import uuid4

    cfg, out, store = ctx.cfg, ctx.out, ctx.store
    zones = ctx.zones()
    multi = len(ctx.record["zones"]) > 1
    cogs = out / COG_DIR
    pictures = [
        ctx.client.submit(
            _files_task,
            _cluster_products,
            store,
            cfg.cluster.k,
            cfg.seed,
            zone=name if multi else "",
            key=f"publish-pictures-{uuid4().hex}",
            pure=False,
        )
        for name in zones
    ]
    groups, seg_by_zone = [], {}
    for name, z in zones.items():
        pre = z["prefix"]
        seg_by_zone[name] = open_product(store, pre + "segmentation")
        groups += [pre + g for g in ("cube", "patches", "embeddings", "clusters", "segmentation")]
    if cfg.cube.mosaic_crs:  # every zone in one CRS, reprojected chunk by chunk on the workers
        mosaic = mosaic_zones(
            seg_by_zone, cfg.cube.mosaic_crs, cfg.cube.mosaic_resolution, max_pixels=cfg.cube.max_pixels
        )
        ctx.products.write_blocks(
            mosaic,
            "mosaic",
            ("y", "x"),
            ctx.client,
            block=cfg.runtime.block_px,
            label="publish mosaic",
            progress=ctx.progress,
            max_tasks=cfg.runtime.wave_tasks,
        )
        groups.append("mosaic")
    written = _write_cogs(ctx, cfg.cluster.k, multi, mosaic=bool(cfg.cube.mosaic_crs))
    for i, (name, z) in enumerate(zones.items()):
        ctx.progress("publish maps", i, len(zones))
        ctx.report_figures[z["prefix"]] = quicklooks(
            store,
            z["prefix"],
            quicklook=out / f"quicklook{'_' + name if multi else ''}.png",
            client=ctx.client,
        )
    ctx.progress("publish maps", len(zones), len(zones))
    cog_files = written()
    if cfg.segment.vectorize:
        for name, seg in seg_by_zone.items():
            tag = f"{name}_" if multi else ""
            n = write_fields(  # None: refused (an AgrilandWarning), the mask is too large
                seg["mask"],
                out / "vector" / f"{tag}fields.parquet",
                min_area_m2=cfg.segment.min_field_area_m2,
                max_pixels=cfg.publish.vector_max_pixels,
                client=ctx.client,
                progress=partial(ctx.progress, f"publish fields {name}"),
            )
            ctx.record.setdefault("vector", {})[name] = (
                {"path": f"vector/{tag}fields.parquet", "polygons": n}
                if n is not None
                else {"refused": f"{seg['mask'].size:,} pixels > publish.vector_max_pixels"}
            )
    for files in ctx.client.gather(pictures):  # a failed picture fails the stage, with its own error
        for rel, data in files.items():
            with atomic_path(out / rel) as tmp:
                tmp.write_bytes(data)
    ctx.record["products"] = {
        "zarr": ctx.products.location,
        "groups": groups,
        # one file a product and zone: its COG, or the VRT over its tiles (cog/NAME/NAME_rRRR_cCCC.tif)
        "cogs": sorted(ctx.where(f"{COG_DIR}/{x.name}") for x in [*cogs.glob("*.tif"), *cogs.glob("*.vrt")]),
        "cog_tiles": sum(1 for rel in cog_files if "/" in rel[len(COG_DIR) + 1 :]),
        "report": ctx.where("report.html"),
        "stac": ctx.where("stac/collection.json"),
    }
    ctx.folder.save()
    write_stac(out)


# the work of each stage, in pipeline order (agriland_scale.layout.STAGES)
