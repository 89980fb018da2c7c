"""Bad input items, on copies of the real Virginia window: georeferencing that disagrees with
the item's proj:* fields, a corrupt tile inside a COG, an item without any datetime. Each is
named (item, asset, href) with what to do, and ``cube.on_bad_asset: skip`` leaves it out."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import dask
import numpy as np
import pystac
import pytest
import rasterio

from agriland_scale.config.schema import CubeConfig
from agriland_scale.cube.assets import READ_SKIPPED, check_assets
from agriland_scale.cube.load import load_bands, load_cube, load_zone_cubes, read_chunk
from agriland_scale.cube.reads import SkippedReads
from agriland_scale.errors import AgrilandWarning, BlockFailed, CorruptInput
from agriland_scale.search.items import normalize_items
from agriland_scale.search.stac import local_stac_api, search_items

from .conftest import VIRGINIA

BANDS = ["red", "green", "blue", "nir"]
ID = "S2_L1C_18S_virginia_demo_window"


def _copy(tmp_path: Path, name: str = "virginia", edit=None, item_id: str | None = None) -> Path:
    """A copy of the embedded window; ``edit(item_dict)`` changes its item.json."""
    folder = tmp_path / name
    shutil.copytree(VIRGINIA, folder)
    d = json.loads((folder / "item.json").read_text())
    if item_id:
        d["id"] = item_id
    if edit:
        edit(d)
    (folder / "item.json").write_text(json.dumps(d))
    return folder


def _items(*folders: Path) -> list[pystac.Item]:
    return normalize_items([pystac.Item.from_file(str(f / "item.json")) for f in folders], BANDS)


def _compute(obj):
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return obj.compute()


# -- 1. georeferencing that disagrees with the item's proj:* fields -----------------------------
def _shift_5km(d):
    for a in d["assets"].values():
        a["proj:transform"][2] += 5000.0  # 5 km east: half the region would be NaN


def _epsg_32617(d):
    d["properties"]["proj:epsg"] = 32617


def _code_32617(d):
    del d["properties"]["proj:epsg"]
    d["properties"]["proj:code"] = "EPSG:32617"


def _shape(d):
    for a in d["assets"].values():
        a["proj:shape"] = [1024, 1000]


@pytest.mark.parametrize(
    "edit, said",
    [
        (
            _shift_5km,
            (
                r"the item says proj:transform \[10.0, 0.0, 443290.0, 0.0, -10.0, 4174340.0\], "
                r"the file's is \[10.0, 0.0, 438290.0, 0.0, -10.0, 4174340.0\]: corners 5000 m "
                r"\(500 pixels\) apart"
            ),
        ),
        (_epsg_32617, r"the item says EPSG:32617 \(proj:epsg / proj:code\), the file's CRS is EPSG:32618"),
        (_code_32617, r"the item says EPSG:32617 \(proj:epsg / proj:code\), the file's CRS is EPSG:32618"),
        (
            _shape,
            r"the item says proj:shape \[1024, 1000\], the file is \[1024, 1024\] pixels \(height, width\)",
        ),
    ],
    ids=["transform-5km", "proj:epsg", "proj:code", "proj:shape"],
)
def test_georeferencing_mismatch_fails_or_is_skipped(tmp_path, edit, said):
    bad = _copy(tmp_path, "bad", edit, item_id="virginia_bad_grid")
    good = _copy(tmp_path, "good")
    with pytest.raises(CorruptInput) as e:
        check_assets(_items(bad), BANDS, "fail")
    msg = str(e.value)
    assert re.search(
        r"^item virginia_bad_grid: asset 'red' \(\S+/bad/B04.tif\) does not match the item's "
        r"georeferencing: " + said,
        msg,
    ), msg
    assert msg.endswith(
        "4 bad asset(s) in all. Fix the item's proj:* fields (proj:epsg / proj:code, "
        "proj:shape, proj:transform) to match the file, or set cube.on_bad_asset: skip to "
        "leave such items out"
    )
    with pytest.warns(AgrilandWarning) as rec:
        kept, skipped = check_assets(_items(bad, good), BANDS, "skip")
    assert re.match(
        r"skipping item virginia_bad_grid: asset 'red' \(\S+/bad/B04.tif\) does not match the "
        r"item's georeferencing: " + said,
        str(rec[0].message),
    )
    assert len(rec) == 4
    assert [i.id for i in kept] == [ID]
    assert {s["asset"] for s in skipped} == set(BANDS)
    assert {(s["item"], s["problem"]) for s in skipped} == {("virginia_bad_grid", "georeferencing")}
    json.dumps(skipped)  # recorded in run.json


def test_grid_within_tolerance_and_fields_the_item_lacks_pass(tmp_path):
    def nudge(d):  # 1 mm: float rounding in a catalogue, not a shift
        for a in d["assets"].values():
            a["proj:transform"][5] += 0.001
        d["assets"]["red"]["proj:code"] = "EPSG:32618"  # an asset's own CRS field (projection v2)
        del d["assets"]["green"]["proj:shape"]

    kept, bad = check_assets(_items(_copy(tmp_path, edit=nudge)), BANDS, "fail")
    assert len(kept) == 1 and bad == []


# -- 2. a corrupt tile inside a COG --------------------------------------------------------------
def _tile_span(path: Path, row: int, col: int) -> tuple[int, int]:
    with rasterio.open(path) as ds:
        return (
            int(ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1)),
            int(ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1)),
        )


def _zero(path: Path, start: int, n: int) -> None:
    data = bytearray(path.read_bytes())
    data[start : start + n] = bytes(n)  # a hole of zeros, as an interrupted parallel download leaves
    path.write_bytes(bytes(data))


def _reads(path: Path, window=None) -> bool:
    try:
        with rasterio.open(path) as ds:
            ds.read(1, window=window)
        return True
    except rasterio.errors.RasterioIOError:
        return False


def test_hole_in_the_first_tiles_is_found_by_the_probe(tmp_path, demo_cfg):
    bad = _copy(tmp_path, "bad", item_id="virginia_hole")
    good = _copy(tmp_path, "good")
    tif = bad / "B04.tif"
    off1, _ = _tile_span(tif, 0, 1)
    _zero(tif, off1 - 4096, 8192)  # the end of the first tile's data and the start of the second's
    assert not _reads(tif)  # really damaged...
    assert _reads(tif, ((768, 1024), (768, 1024)))  # ...but not in the last block (the old probe passed)
    msg = (
        r"^item virginia_hole: asset 'red' \(\S+/bad/B04.tif\) cannot be read: RasterioIOError: "
        r".*IReadBlock failed.*; 1 bad asset\(s\) in all\. Download the file again or fix the asset's "
        r"href, or set cube.on_bad_asset: skip to leave such items out$"
    )
    with pytest.raises(CorruptInput, match=msg):
        check_assets(_items(bad), BANDS, "fail")
    # skip: the pipeline's cube stage leaves the item out and goes on with the good one
    cfg = CubeConfig(bands=BANDS, on_bad_asset="skip")
    items = [pystac.Item.from_file(str(f / "item.json")) for f in (bad, good)]
    bands = load_bands(items, cfg)
    items = normalize_items(items, bands)
    with pytest.warns(AgrilandWarning, match=r"skipping item virginia_hole: asset 'red' \(\S+B04.tif\) can"):
        items, skipped = check_assets(items, bands, cfg.on_bad_asset)
    assert [i.id for i in items] == [ID] and skipped[0]["problem"] == "unreadable"
    (cube,) = load_zone_cubes(items, cfg, demo_cfg.search.bbox, normalized=True).values()
    red = _compute(cube["reflectance"].sel(band="red").isel(y=slice(0, 256), x=slice(0, 512))).values
    with rasterio.open(VIRGINIA / "B04.tif") as ds:
        np.testing.assert_allclose(red, ds.read(1, window=((0, 256), (0, 512))) * 1e-4, rtol=1e-6)


@pytest.fixture
def middle_tile(tmp_path) -> Path:
    """A copy whose B04 has a damaged tile (row 1, col 1) that is neither the first nor the last
    in the file: only reading it (the cube, or ``check_assets(full=True)``) finds it."""
    folder = _copy(tmp_path, "bad", item_id="virginia_bad_tile")
    tif = folder / "B04.tif"
    off, _ = _tile_span(tif, 1, 1)
    _zero(tif, off, 4096)
    assert not _reads(tif, ((256, 512), (256, 512))) and _reads(tif, ((0, 256), (0, 256)))
    return folder


def test_probe_cost_stays_two_blocks_unless_full(middle_tile):
    items = _items(middle_tile)
    assert check_assets(items, BANDS, "fail") == (items, [])  # documented: not read by the cheap probe
    with pytest.raises(
        CorruptInput,
        match=r"virginia_bad_tile: asset 'red' .*IReadBlock failed at X "
        r"offset 1, Y offset 1",
    ):
        check_assets(items, BANDS, "fail", full=True)


def test_corrupt_tile_in_the_cube_is_named_or_left_out(middle_tile, demo_cfg):
    items = _items(middle_tile)
    cube = load_cube(items, CubeConfig(bands=BANDS), demo_cfg.search.bbox, normalized=True)
    msg = (
        r"^item virginia_bad_tile: asset 'red' \(\S+/bad/B04.tif\) cannot be read \(RasterioIOError: "
        r".*IReadBlock failed.*\) while loading the cube: .*set cube.on_bad_asset: skip"
    )
    with pytest.raises(CorruptInput, match=msg):
        _compute(cube)
    # read in 1024 px chunks (auto): the failed chunk is read again by stored chunk, so only
    # the 256 px tile that cannot be read is left out
    skip = CubeConfig(bands=BANDS, on_bad_asset="skip")
    assert read_chunk(skip, len(items), len(BANDS)) == 1024
    cube = load_cube(items, skip, demo_cfg.search.bbox, normalized=True)
    left_out = r"virginia_bad_tile: asset 'red' .* cannot be read .*'skip', so these pixels of the item"
    with pytest.warns(AgrilandWarning, match=left_out):
        out = _compute(cube)
    refl = out["reflectance"].values
    tile = np.zeros(refl.shape[1:], bool)
    tile[256:512, 256:512] = True
    assert np.isnan(refl[:, tile]).all() and np.isfinite(refl[:, ~tile]).all()
    assert (out["clear_count"].values[tile] == 0).all()


def test_corrupt_tile_on_a_dask_worker_names_the_asset(middle_tile, demo_cfg, tmp_path):
    """On a real (separate-process) worker: the named reader travels with the graph."""
    from agriland_scale.config.schema import RuntimeConfig
    from agriland_scale.pipeline.runtime import dask_client
    from agriland_scale.store.resume import Products

    # blocks of one stored chunk (256 px): the block holding the bad tile is named
    cube = load_cube(
        _items(middle_tile), CubeConfig(bands=BANDS, read_chunk=256), demo_cfg.search.bbox, normalized=True
    )
    rt = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    failed = (
        r"block 1 \(y 256:512\) failed: CorruptInput: item virginia_bad_tile: asset 'red' "
        r"\(\S+/bad/B04.tif\) cannot be read"
    )
    with dask_client(rt) as client, pytest.raises(BlockFailed, match=failed):
        Products(tmp_path / "run").write_blocks(cube, "cube", "y", client)


def test_corrupt_tile_left_out_on_the_cluster_is_recorded_and_said(
    middle_tile, demo_cfg, external_cluster, tmp_path
):
    """``skip`` with damage the probe does not read: the reads fail in the workers' tasks, and the
    run's record (inputs.skipped_assets) and its report name the asset, once, with a count; beside
    it, a second item that the probe leaves out is recorded and said too."""
    from agriland_scale.pipeline.runner import run

    # the catalogue's second item: its B04 damaged in the first tiles, which the probe reads
    hole = _copy(tmp_path, "hole")
    off1, _ = _tile_span(hole / "B04.tif", 0, 1)
    _zero(hole / "B04.tif", off1 - 4096, 8192)
    item = json.loads((hole / "item.json").read_text())
    item["id"] = "virginia_hole"
    for a in item["assets"].values():
        a["href"] = str(hole / a["href"])
    (middle_tile / "item_hole.json").write_text(json.dumps(item))

    cfg = demo_cfg.with_overrides(**{"search.catalog": str(middle_tile), "cube.on_bad_asset": "skip"})
    out, lines = tmp_path / "run", []
    run(cfg, out, scheduler=external_cluster, until="cube", report=lines.append)
    record = json.loads((out / "run.json").read_text())
    assert record["stages"]["cube"] == "done" and record["zones"]["utm18n"]["items"] == ["virginia_bad_tile"]
    probed, skip = record["inputs"]["skipped_assets"]  # one entry for the asset, not one a read
    assert (probed["item"], probed["asset"], probed["problem"]) == ("virginia_hole", "red", "unreadable")
    href = skip.pop("href")
    assert href in (str(middle_tile / "B04.tif"), (middle_tile / "B04.tif").as_uri())  # as GDAL opened it
    assert re.match(r"RasterioIOError: .*IReadBlock failed at X offset 1, Y offset 1", skip.pop("error"))
    # one 1024 px read chunk failed; read again in 256 px chunks, one of them (the tile) is nodata
    assert skip == {
        "item": "virginia_bad_tile",
        "asset": "red",
        "problem": READ_SKIPPED,
        "zone": "utm18n",
        "chunks": 1,
        "blocks": {"0": 1},
    }
    said = [line for line in lines if "skipped" in line]
    assert len(said) == 2, said
    assert re.fullmatch(
        r"cube: skipped item virginia_hole: asset 'red' \(\S+/hole/B04.tif\) cannot be read: "
        r"RasterioIOError: .*IReadBlock failed.* \(cube.on_bad_asset: skip\)",
        said[0],
    ), said
    assert re.fullmatch(
        rf"cube: skipped unreadable parts of item virginia_bad_tile, asset 'red' \({re.escape(href)}\): "
        r"RasterioIOError: .*IReadBlock failed.* — 1 chunk\(s\) left as nodata \(cube.on_bad_asset: skip\)",
        said[1],
    ), said


def test_skipped_reads_of_reused_blocks_keep_the_earlier_count(middle_tile, demo_cfg, external_cluster):
    """Per block: a block an earlier attempt wrote keeps that attempt's count (its reads now, as a
    neighbour, count for nothing); a block computed again counts anew, never twice."""
    from distributed import Client

    skip = CubeConfig(bands=BANDS, on_bad_asset="skip", read_chunk=256)  # 4 blocks of 256 rows
    with Client(external_cluster) as client, SkippedReads(client) as found:
        cube = load_cube(_items(middle_tile), skip, demo_cfg.search.bbox, normalized=True)
        client.compute(cube["clear_count"]).result()
    cubes = {"z": cube}
    (now,) = found.records(cubes, {"z": set()})
    assert (now["item"], now["asset"], now["zone"], now["chunks"], now["blocks"]) == (
        "virginia_bad_tile",
        "red",
        "z",
        1,
        {"1": 1},
    )
    assert found.records(cubes, {"z": {0, 1}}, [now]) == [now]  # block 1 reused: the earlier count
    assert found.records(cubes, {"z": {0}}, [now]) == [now]  # block 1 computed again: counted once
    assert found.records(cubes, {"z": {1}}, []) == []  # reused, with no earlier record: nothing new
    earlier = now | {"blocks": {"1": 1, "3": 2}, "chunks": 3}
    assert found.records(cubes, {"z": {0, 3}}, [earlier])[0]["blocks"] == {"1": 1, "3": 2}
    assert found.records(cubes, {"z": {0}}, [earlier])[0]["blocks"] == {"1": 1}


# -- 3. an item without any datetime -------------------------------------------------------------
def _no_datetime(d):
    for k in ("datetime", "start_datetime", "end_datetime"):
        d["properties"].pop(k, None)


def _no_end(d):
    del d["properties"]["end_datetime"]


@pytest.mark.parametrize(
    "edit, msg",
    [
        (
            _no_datetime,
            (
                rf"^item {ID} \(collection agriland-demo-virginia, from http://127.0.0.1:\d+\) has "
                r"no datetime and no start_datetime: .* Fix the item \(set properties.datetime, or "
                r"start_datetime and end_datetime\) or drop it from the catalog$"
            ),
        ),
        (
            _no_end,
            (
                rf"^item {ID} \(collection agriland-demo-virginia, from http://127.0.0.1:\d+\) is not a valid "
                r"STAC item \(STACError: .*end_datetime.*\): fix the item or drop it from the catalog$"
            ),
        ),
    ],
    ids=["no-datetime", "no-end_datetime"],
)
def test_item_without_datetime_is_named_by_the_search(tmp_path, demo_cfg, edit, msg):
    # rustac serves such an item (datetime: null) and returns it for every datetime range;
    # pystac refuses to parse it
    folder = _copy(tmp_path, edit=edit)
    search = demo_cfg.search.model_copy(update={"catalog": str(folder)})
    with local_stac_api(folder) as url, pytest.raises(CorruptInput, match=msg):
        search_items(search, url)


def test_item_without_datetime_is_refused_by_normalize_items():
    item = pystac.Item.from_file(str(VIRGINIA / "item.json"))
    item.properties.pop("start_datetime")
    item.properties.pop("end_datetime")
    with pytest.raises(CorruptInput, match=rf"^item {ID} has no datetime and no start_datetime: .*drop it"):
        normalize_items([item], BANDS)
