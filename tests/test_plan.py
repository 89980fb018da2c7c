"""``agriland plan``: what a run will do, from metadata only (no pixel read, no Dask graph)."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from agriland_scale.cli import main
from agriland_scale.config.load import load_config
from agriland_scale.errors import ConfigError
from agriland_scale.layout import STAGES
from agriland_scale.patches import patch_grid
from agriland_scale.pipeline.plan import format_plan, plan_run
from agriland_scale.pipeline.preflight import preflight
from agriland_scale.pipeline.throughput import parse_throughput
from agriland_scale.search.stac import region_of

from .conftest import DEMO_YAML, VIRGINIA

TILE = 10980  # a full Sentinel-2 tile at 10 m, px a side
STEP = TILE * 10.0  # its width in metres: tiles are adjacent


def _no_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make building any Dask array or odc-stac load fail: a plan must need neither."""
    import dask.array
    import odc.stac

    def refuse(*args, **kwargs):
        raise AssertionError("a plan built a Dask array or called odc.stac.load")

    monkeypatch.setattr(dask.array.core.Array, "__new__", refuse)
    monkeypatch.setattr(odc.stac, "load", refuse)


def test_demo_plan_matches_the_lazy_cube(demo_cfg, items, monkeypatch):
    from agriland_scale.cube.load import load_zone_cubes

    cubes = load_zone_cubes(items, demo_cfg.cube, region_of(demo_cfg.search), encoded=True)  # lazy: no read
    _no_graph(monkeypatch)
    plan = plan_run(demo_cfg)
    assert plan["items"] == len(items) and plan["tiles"] == 1 and list(plan["zones"]) == ["utm18n"]
    z = plan["zones"]["utm18n"]
    cube = cubes[32618]
    assert z["shape"] == [cube.sizes["y"], cube.sizes["x"]]
    assert z["pixels"] == cube.sizes["y"] * cube.sizes["x"]
    assert z["transform"] == pytest.approx(list(cube.rio.transform())[:6])
    rows, cols = patch_grid(cube.sizes["y"], cube.sizes["x"], demo_cfg.patches.size, demo_cfg.patches.stride)
    assert (
        z["patches"]
        == {"count": len(rows) * len(cols), "grid": [len(rows), len(cols)]}
        == {
            "count": 49,
            "grid": [7, 7],
        }
    )
    assert z["read_chunk"] == cube["reflectance"].data.chunksize[1]
    assert set(plan["stages"]) == set(STAGES)
    for stage in STAGES[1:]:
        assert plan["stages"][stage]["seconds"] >= 0 and plan["stages"][stage]["source"]
    assert plan["stages"]["cube"]["source"].startswith("bench/results/")
    assert plan["store"]["bytes"]["cube"] == 1024 * 1024 * (4 * 2 + 2)  # int16 reflectance + uint16 count
    text = format_plan(plan)
    assert "utm18n" in text and "1,024 x 1,024" in text and "uncompressed upper bound" in text


def test_plan_cli_json_and_throughput(capsys):
    assert main(["plan", str(DEMO_YAML), "--json", "--workers", "2", "--throughput", "segmentation=1e6"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["workers"] == 2 and plan["patches"] == 49
    seg = plan["stages"]["segmentation"]
    assert seg["source"] == "given (--throughput)"
    assert seg["seconds"] == pytest.approx(1024 * 1024 / 1e6 / 2, abs=0.1)
    with pytest.raises(ConfigError, match="STAGE=PX_PER_S"):
        parse_throughput(["segmentation=fast"])


def test_plan_measured_from_an_earlier_run(tmp_path, demo_cfg):
    rec = {
        "config": json.loads(demo_cfg.model_dump_json()),
        "timings_s": {"cube": 2.0, "segmentation": 8.0},
        "stages": {"cube": "done", "segmentation": "done"},
        "zones": {"utm18n": {"shape": {"band": 4, "y": 1024, "x": 1024}}},
        "inputs": {"items": [{"datetime": "2016-06-10T00:00:00Z"}]},
        "patches": {"count": 49},
    }
    (tmp_path / "run.json").write_text(json.dumps(rec))
    plan = plan_run(demo_cfg, measured=[tmp_path])
    assert plan["stages"]["segmentation"]["throughput"] == pytest.approx(1024 * 1024 / 8.0, rel=1e-3)
    assert plan["stages"]["segmentation"]["seconds"] == pytest.approx(8.0, abs=0.1)
    assert str(tmp_path) in plan["stages"]["cube"]["source"]
    assert plan["stages"]["embeddings"]["source"].startswith("bench/results/")  # not measured there


def _errors(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_config_fails_as_run_does(tmp_path, capsys):
    bad = ["--set", "cube.resolution=oops"]
    code, err = _errors(capsys, ["plan", str(DEMO_YAML), *bad])
    assert code == 2 and "cube.resolution" in err
    assert _errors(capsys, ["run", str(DEMO_YAML), "--out", str(tmp_path / "run"), *bad]) == (code, err)
    # preflight: the U-Net needs labels or a model, refused as run refuses it (same check)
    cfg = load_config(DEMO_YAML, **{"segment.labels": None})
    with pytest.raises(ConfigError) as run_err:
        preflight(cfg, list(STAGES), None, set(), None)
    code, err = _errors(capsys, ["plan", str(DEMO_YAML), "--set", "segment.labels=null"])
    assert code == 2 and err.strip() == f"agriland: error: {run_err.value}"


def _synthetic_catalog(folder, n_side: int, dates: int) -> list[float]:
    """``n_side`` x ``n_side`` adjacent full-size tiles in EPSG:32618, ``dates`` items each.

    Their assets point at the demo's real COGs (never opened: the items carry ``proj:*``).
    Returns the lon/lat bbox of the whole region.
    """
    from pyproj import Transformer

    to_ll = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    demo = json.loads((VIRGINIA / "item.json").read_text())
    folder.mkdir()
    letters = "ABCDEFGHJKLMNPQRSTUV"
    lons, lats = [], []
    for j in range(n_side):
        for i in range(n_side):
            x0, y0 = 300000.0 + i * STEP, 4600000.0 - j * STEP
            ring = [(x0, y0 - STEP), (x0 + STEP, y0 - STEP), (x0 + STEP, y0), (x0, y0), (x0, y0 - STEP)]
            ll = [to_ll.transform(x, y) for x, y in ring]
            lon, lat = [p[0] for p in ll], [p[1] for p in ll]
            lons += lon
            lats += lat
            tile = f"18S{letters[j]}{letters[i]}"
            for d in range(dates):
                assets = {}
                for key, a in demo["assets"].items():
                    a = dict(a)
                    a["href"] = str((VIRGINIA / a["href"]).resolve())
                    a["proj:shape"] = [TILE, TILE]
                    a["proj:transform"] = [10.0, 0.0, x0, 0.0, -10.0, y0]
                    assets[key] = a
                item = {
                    **demo,
                    "id": f"S2A_{tile}_2023060{d + 1}",
                    "collection": "synthetic",
                    "bbox": [min(lon), min(lat), max(lon), max(lat)],
                    "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ll]]},
                    "properties": {
                        **demo["properties"],
                        "datetime": f"2023-06-0{d + 1}T15:50:00Z",
                        "start_datetime": None,
                        "end_datetime": None,
                        "s2:mgrs_tile": tile,
                    },
                    "assets": assets,
                }
                item["properties"] = {k: v for k, v in item["properties"].items() if v is not None}
                (folder / f"item_{tile}_{d}.json").write_text(json.dumps(item))
    bbox = [min(lons), min(lats), max(lons), max(lats)]
    coll = json.loads((VIRGINIA / "collection.json").read_text())
    coll["id"] = "synthetic"
    coll["extent"]["spatial"]["bbox"] = [bbox]
    (folder / "collection.json").write_text(json.dumps(coll))
    return bbox


def test_plan_of_100_full_tiles_in_seconds(tmp_path, monkeypatch):
    bbox = _synthetic_catalog(tmp_path / "catalog", 10, 4)
    doc = yaml.safe_load(DEMO_YAML.read_text())
    doc["search"].update(
        catalog=str(tmp_path / "catalog"),
        collections=["synthetic"],
        bbox=bbox,
        datetime="2023-06-01/2023-06-30",
        limit=500,
    )
    doc["patches"]["stride"] = 256
    path = tmp_path / "region.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    _no_graph(monkeypatch)
    t0 = time.perf_counter()
    plan = plan_run(cfg, workers=4)
    took = time.perf_counter() - t0
    assert took < 30, f"the plan of 100 tiles took {took:.1f} s"
    assert plan["items"] == 400 and plan["tiles"] == 100 and plan["dates"] == 4
    z = plan["zones"]["utm18n"]
    side = 10 * TILE
    assert z["shape"] == [side, side] and plan["pixels"] == side * side
    n = (side - 256) // 256 + 1
    assert plan["patches"] == n * n
    assert z["read_chunk"] == 1024  # follows the 4 dates, not the 400 items
    tasks = plan["stages"]["cube"]["tasks"]
    assert 100 * 100 <= tasks <= 100 * 1000  # linear in the tiles: ~ 118 read chunks a tile
    assert plan["store"]["total_bytes"] > side * side * 10  # cube int16 x 4 bands + count
    print(f"\n100 tiles x 4 dates planned in {took:.1f} s\n{format_plan(plan)}")
