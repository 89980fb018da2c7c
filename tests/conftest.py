"""Shared fixtures: the embedded real Sentinel-2 window, served by a real local STAC API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agriland_scale import load_config  # noqa: E402
from agriland_scale.config import RunConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "agriland_scale" / "data"
DEMO_YAML = DATA / "demo.yaml"
VIRGINIA = DATA / "virginia"
# the embedded window's grid (EPSG:32618): top-left corner and size at 10 m
ORIGIN_X, ORIGIN_Y, SIZE = 438290.0, 4174340.0, 1024


@pytest.fixture(scope="session")
def demo_cfg() -> RunConfig:
    return load_config(DEMO_YAML)


@pytest.fixture(scope="session")
def items(demo_cfg):
    from agriland_scale.stac import local_stac_api, search_items

    with local_stac_api(demo_cfg.search.catalog) as url:
        return search_items(demo_cfg.search, url)


@pytest.fixture(scope="session")
def cube_store(tmp_path_factory, demo_cfg, items) -> str:
    """The demo cube written to a real Zarr store (single-threaded dask, no cluster)."""
    import dask

    from agriland_scale.cube import load_cube
    from agriland_scale.publish import write_group

    store = str(tmp_path_factory.mktemp("cube") / "agriland.zarr")
    with dask.config.set(scheduler="synchronous"):
        write_group(load_cube(items, demo_cfg.cube, demo_cfg.search.bbox), store, "cube")
    return store


@pytest.fixture(scope="session")
def cube(cube_store):
    from agriland_scale.cube import open_cube

    return open_cube(cube_store)
