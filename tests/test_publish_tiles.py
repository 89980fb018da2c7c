"""Publish at region scale: tiled COGs + a VRT per product, written by Dask workers, STAC items
per output tile, maps from overviews made chunk by chunk, field polygons per block.

Synthetic products written into a real Zarr store (the groups and encodings the segmentation
and cluster stages write), a real ``distributed.Client`` in this process; small output tiles
(512 px) so that a raster of 700 x 1300 px is cut into 2 x 3 tiles in seconds.
"""

from __future__ import annotations

import json
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import xarray as xr

from agriland_scale.errors import AgrilandWarning
from agriland_scale.publish.cog import write_product_cog
from agriland_scale.publish.tiles import tile_grid, tile_of, tiled_products
from agriland_scale.store import open_cube, open_product, write_georef, write_group

CRS = "EPSG:32618"
H, W, TILE = 700, 1300, 512  # 2 x 3 output tiles, the last row and column cut short
K = 5


def _grid(h: int, w: int, res: float = 10.0) -> dict[str, np.ndarray]:
    return {"y": 4_200_000 - res * (np.arange(h) + 0.5), "x": 300_000 + res * (np.arange(w) + 0.5)}


def _probability(h: int, w: int, chunk: int):
    import dask.array as da

    yy = da.arange(h, chunks=chunk, dtype="float32")[:, None]
    xx = da.arange(w, chunks=chunk, dtype="float32")[None, :]
    p = (da.sin(xx / 37.0) * da.cos(yy / 53.0) + 1) / 2
    return da.where((yy < 40) & (xx < 300), np.float32(np.nan), p).astype("float32")  # a nodata corner


def write_products(path: Path, h: int = H, w: int = W, chunk: int = 256) -> str:
    """A store with the groups publish reads: cube (reflectance), clusters, segmentation."""
    import dask.array as da

    prob = _probability(h, w, chunk)
    mask = da.where(da.isnan(prob), 255, (prob >= 0.5).astype("uint8")).astype("uint8")
    seg = xr.Dataset({"probability": (("y", "x"), prob), "mask": (("y", "x"), mask)}, coords=_grid(h, w))
    seg["probability"].encoding.update(
        dtype="uint8",
        scale_factor=np.float32(1 / 254),
        add_offset=np.float32(0),
        _FillValue=np.uint8(255),
        fill_value=np.uint8(255),
        chunks=(chunk, chunk),
    )
    seg["mask"].encoding.update(_FillValue=np.uint8(255), fill_value=np.uint8(255), chunks=(chunk, chunk))
    write_group(write_georef(seg, CRS), str(path), "segmentation")
    refl = da.stack([prob * 0.2 + 0.01 * b for b in range(3)]).astype("float32").rechunk((3, chunk, chunk))
    cube = xr.Dataset(
        {"reflectance": (("band", "y", "x"), refl)},
        coords={"band": np.array(["red", "green", "blue"], dtype=object), **_grid(h, w)},
    )
    cube["reflectance"].encoding.update(chunks=(3, chunk, chunk))
    write_group(write_georef(cube, CRS), str(path), "cube")
    ch, cw = -(-h // 32), -(-w // 32)
    ids = (np.arange(ch * cw).reshape(ch, cw) % K).astype("int16")
    ids[0, :3] = -1
    cl = xr.Dataset({"cluster_map": (("y", "x"), ids)}, coords=_grid(ch, cw, 320.0))
    cl = cl.assign_coords(cluster=np.arange(K))
    cl["cluster_map"].encoding.update(_FillValue=np.int16(-1), fill_value=np.int16(-1))
    write_group(write_georef(cl, CRS), str(path), "clusters")
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return write_products(tmp_path_factory.mktemp("tiles") / "products.zarr")


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        yield c


@pytest.fixture(scope="module")
def published(store, client, tmp_path_factory):
    """``_write_cogs`` of the publish stage, on the workers, with 512 px output tiles."""
    from agriland_scale.pipeline.publishing import _write_cogs

    out = tmp_path_factory.mktemp("out")
    seen: list[tuple] = []
    ctx = SimpleNamespace(
        cfg=SimpleNamespace(publish=SimpleNamespace(tile_px=TILE)),
        out=out,
        store=store,
        client=client,
        zones=lambda: {"": {"prefix": ""}},
        progress=lambda *a: seen.append(a),
        say=print,
    )
    (out / "cog").mkdir()
    (out / "cog" / "mask.tif").write_bytes(b"an earlier publish's one-file COG")
    written = _write_cogs(ctx, K, False)()
    return out, written, seen


def test_tile_grid_covers_the_raster_exactly():
    tiles = tile_grid(H, W, TILE)
    assert [(t.row, t.col) for t in tiles] == [(r, c) for r in range(2) for c in range(3)]
    cover = np.zeros((H, W), dtype=int)
    for t in tiles:
        cover[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert (cover == 1).all()
    assert tile_grid(512, 512, 512) == tile_grid(1, 1, 512)[:0] + [tile_grid(512, 512, 512)[0]]
    assert len(tile_grid(512, 512, 512)) == 1 and len(tile_grid(513, 10, 512)) == 2
    assert tile_of("cog/mask/mask_r002_c010.tif") == ("mask", 2, 10) and tile_of("cog/mask.tif") is None


def test_large_products_leave_as_tiled_cogs_and_a_vrt_that_equal_the_raster(published, store, tmp_path):
    out, written, seen = published
    cog = out / "cog"
    assert sorted(tiled_products(cog)) == ["mask", "probability"]
    for product in ("probability", "mask"):
        tiles = tiled_products(cog)[product]
        assert [(r, c) for _, r, c in tiles] == [(r, c) for r in range(2) for c in range(3)]
        assert not (cog / f"{product}.tif").exists()  # the earlier one-file mask COG is gone
        # the VRT reads back as the one-file COG of the whole raster would: pixels and metadata
        whole = tmp_path / f"{product}.tif"
        # as publish wrote it before tiles: from the dask-backed product, on this process
        write_product_cog(open_product(store, "segmentation")[product], whole, product, k=K)
        with rasterio.open(cog / f"{product}.vrt") as vrt, rasterio.open(whole) as ref:
            assert (vrt.width, vrt.height) == (W, H) and vrt.crs == ref.crs
            assert vrt.transform.almost_equals(ref.transform)
            np.testing.assert_array_equal(vrt.read(1), ref.read(1))
            assert (vrt.dtypes, vrt.nodata, vrt.scales) == (ref.dtypes, ref.nodata, ref.scales)
            assert (vrt.descriptions, vrt.units) == (ref.descriptions, ref.units)
            if product == "mask":
                assert vrt.colormap(1) == ref.colormap(1)
            # an overview through the VRT (GDAL reads the tiles' own overviews)
            assert vrt.read(1, out_shape=(H // 4, W // 4)).shape == (H // 4, W // 4)
        for path, r, c in tiles:  # each tile a valid COG on its own, in its place
            t = tile_grid(H, W, TILE)[r * 3 + c]
            with rasterio.open(path) as src:
                assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
                assert src.block_shapes[0] == (min(512, src.height), 512) or src.block_shapes[0] == (512, 512)
                assert (src.height, src.width) == (t.y1 - t.y0, t.x1 - t.x0)
                assert src.transform.almost_equals(ref.transform @ ref.transform.translation(t.x0, t.y0))
                if src.height > 512 or src.width > 512:
                    assert src.overviews(1)
    # the cluster map (one pixel a patch) fits one tile: one COG, as for every small run
    assert (cog / "cluster_map.tif").is_file() and not (cog / "cluster_map.vrt").exists()
    assert "cog/probability.vrt" in written and "cog/probability/probability_r001_c002.tif" in written
    assert seen[0] == ("publish COGs", 0, 13) and seen[-1] == ("publish COGs", 13, 13)


def test_cog_tasks_are_named_by_stage(published, client):
    """The dashboard reads by stage: the tasks' key prefixes say ``publish-cog-PRODUCT``."""
    prefixes = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert {"publish-cog-probability", "publish-cog-mask", "publish-cog-cluster-map"} <= prefixes


def test_a_stac_item_per_output_tile(published, tmp_path):
    from agriland_scale.publish.stac import write_stac
    from tests.test_stac_valid import validate_files

    out, _, _ = published
    with rasterio.open(out / "cog" / "probability.vrt") as src:
        cube = {"crs": CRS, "shape": [H, W], "transform": list(src.transform)[:6], "bounds": list(src.bounds)}
    record = {
        "config": {"name": "tiles", "search": {"datetime": "2024-05-01/2024-06-30"}},
        "stages": {"publish": "done"},
        "cube": cube,
    }
    (out / "run.json").write_text(json.dumps(record))
    coll = write_stac(out)
    items = {p.parent.name: json.loads(p.read_text()) for p in coll.parent.glob("*/*.json")}
    tiles = {k: v for k, v in items.items() if "agriland:tile" in v["properties"]}
    assert len(tiles) == 12 and "tiles-cluster_map" in items
    it = items["tiles-probability_r001_c002"]
    assert it["properties"]["agriland:tile"] == {
        "product": "probability",
        "row": 1,
        "col": 2,
        "vrt": "cog/probability.vrt",
    }
    with rasterio.open(out / "cog" / "probability" / "probability_r001_c002.tif") as src:
        assert it["properties"]["proj:shape"] == [src.height, src.width]
        assert it["properties"]["proj:bbox"] == pytest.approx(list(src.bounds))
    href = coll.parent / "tiles-probability_r001_c002" / it["assets"]["cog"]["href"]
    assert href.resolve() == (out / "cog" / "probability" / "probability_r001_c002.tif").resolve()
    # the tiles' footprints (lon/lat) together cover the product's, each its own
    bbox = np.array([v["bbox"] for k, v in tiles.items() if k.startswith("tiles-probability")])
    assert len(np.unique(bbox, axis=0)) == 6
    doc = json.loads(coll.read_text())
    assert doc["assets"]["probability-vrt"]["href"] == "../cog/probability.vrt"
    assert validate_files(sorted(coll.parent.rglob("*.json"))) == []


def test_maps_are_drawn_from_overviews_not_whole_rasters(store, tmp_path):
    """A 4096 x 6144 region in 512 px chunks: its mask read whole would take 96 MiB (float32),
    its reflectance 288 MiB; the maps and the mask's counts take less than 40 MiB
    (Python-tracked allocations, numpy's included: a piece of 1024 px being read and the
    figures; one task at a time here, a worker multiplies that by its threads), and the
    counts are those of the whole mask. (Measured: 27 MiB at 2048 x 3072, 30 MiB here.)"""
    import dask

    from agriland_scale.publish.figures import product_maps

    product_maps(store)  # matplotlib's imports and fonts, not the maps' memory
    h, w = 4096, 6144
    path = write_products(tmp_path / "big.zarr", h, w, chunk=512)
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="synchronous"):
            maps = product_maps(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [alt for _, alt, _ in maps] == [
        "RGB composite",
        "cluster map over composite",
        "probability over composite",
        "agricultural land mask",
    ]
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    mask = open_cube(path, "segmentation")["mask"]
    arable, valid = int((mask == 1).sum()), int(mask.notnull().sum())
    assert f"Mask: {arable:,} pixels of 10 × 10 m" in maps[3][2] and f"{valid:,} valid pixels" in maps[3][2]


def test_maps_on_the_workers_equal_maps_drawn_here(store, client):
    from agriland_scale.publish.figures import product_maps

    assert product_maps(store, client=client) == product_maps(store)
    prefixes = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert {"publish-map-rgb", "publish-map-probability", "publish-map-mask-counts"} <= prefixes


def test_overviews_window_by_window_equal_the_whole_rasters_every_nth_pixel(store):
    """Windows (200 px) that cut the stored chunks (256 px) and a step (7) that cuts both."""
    from agriland_scale.publish.overview import Count, Thin, compute_overviews

    got = compute_overviews(
        store,
        {
            "rgb": Thin("cube", "reflectance", H, W, 7, ("blue", "red")),
            "mask": Thin("segmentation", "mask", H, W, 7),
            "n": Count("segmentation", "mask", H, W, 1),
        },
        window=200,
    )
    cube, seg = open_cube(store, "cube"), open_cube(store, "segmentation")
    refl = cube["reflectance"].sel(band=["blue", "red"])[:, ::7, ::7].values
    np.testing.assert_array_equal(got["rgb"], refl)
    np.testing.assert_array_equal(got["mask"], seg["mask"][::7, ::7].values)
    assert got["n"] == (int((seg["mask"] == 1).sum()), int(seg["mask"].notnull().sum()))


def test_field_polygons_on_the_workers_and_refused_above_the_limit(store, client, tmp_path):
    from agriland_scale.publish.vector import vectorize_mask, write_fields

    mask = open_cube(store, "segmentation")["mask"].fillna(255).astype("uint8")
    here = vectorize_mask(mask, block=4096)
    seen: list[tuple[int, int]] = []
    there = vectorize_mask(mask, block=200, client=client, progress=lambda d, t: seen.append((d, t)))
    assert len(here) == len(there) > 10 and seen[-1] == (28, 28)
    np.testing.assert_allclose(np.sort(here["area_m2"]), np.sort(there["area_m2"]))
    np.testing.assert_allclose(here["area_m2"].sum(), int((mask == 1).sum()) * 100.0)
    (tmp_path / "fields.parquet").write_bytes(b"old")
    with pytest.warns(AgrilandWarning, match="more than publish.vector_max_pixels"):
        assert write_fields(mask, tmp_path / "fields.parquet", max_pixels=1000) is None
    assert not (tmp_path / "fields.parquet").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AgrilandWarning)
        assert write_fields(mask, tmp_path / "fields.parquet", max_pixels=H * W) == len(here)
