import pytest
import requests

from agriland_scale.config.schema import SearchConfig
from agriland_scale.errors import NoItemsFound, STACServerError, UnknownCollection
from agriland_scale.search.stac import local_stac_api, search_items


def test_search_finds_the_real_item(items):
    assert [i.id for i in items] == ["S2_L1C_18S_virginia_demo_window"]
    href = items[0].assets["red"].href
    assert href.startswith("file:///") and href.endswith("B04.tif")


def test_server_is_real_and_stops(demo_cfg):
    with local_stac_api(demo_cfg.search.catalog) as url:
        assert url.startswith("http://127.0.0.1:")
        conf = requests.get(url + "/conformance", timeout=5).json()["conformsTo"]
        assert any("item-search" in c for c in conf)
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/", timeout=2)


def test_search_errors(demo_cfg):
    s = demo_cfg.search
    with local_stac_api(s.catalog) as url:
        with pytest.raises(UnknownCollection, match="sentinel-2-l2a"):
            search_items(s.model_copy(update={"collections": ["sentinel-2-l2a"]}), url)
        with pytest.raises(NoItemsFound, match="widen search.bbox"):
            search_items(s.model_copy(update={"bbox": (10.0, 45.0, 10.1, 45.1)}), url)
        with pytest.raises(NoItemsFound):
            search_items(s.model_copy(update={"datetime": "2020-01-01/2020-12-31"}), url)
        # the server has no Query extension: cloud cover is filtered on the client
        assert search_items(s.model_copy(update={"max_cloud_cover": 0.0}), url)


def test_api_that_does_not_answer():
    cfg = SearchConfig(api="http://127.0.0.1:9", collections=["x"], bbox=(0, 0, 1, 1))
    with pytest.raises(STACServerError, match="does not answer"):
        search_items(cfg, cfg.api)


def test_describe_search_estimates_without_loading(items, demo_cfg):
    from agriland_scale.cube.describe import describe_search
    from agriland_scale.search.items import item_epsg

    info = describe_search(items, demo_cfg.cube.bands, demo_cfg.search.bbox, 10)
    assert info["items"][0]["epsg"] == 32618 == item_epsg(items[0])
    zone = info["zones"]["EPSG:32618"]
    assert zone["shape"] == [1024, 1024] and zone["pixels"] == 1024 * 1024
    assert zone["source_bytes"] == 1024 * 1024 * 4 * 2


def test_projection_v2_and_tiles():
    import pystac

    from agriland_scale.search.items import item_epsg
    from agriland_scale.search.stac import item_tile

    item = pystac.Item(
        "x", None, None, "2020-01-01T00:00:00Z", {"proj:code": "EPSG:32629", "grid:code": "MGRS-29RKH"}
    )
    assert item_epsg(item) == 32629 and item_tile(item) == "29RKH"


@pytest.mark.parametrize(
    "props, item_id, tile",
    [
        ({"s2:mgrs_tile": "29RKH"}, "S2A_MSIL2A_20230101T110441_R094_T29RKH_20230101T140000", "29RKH"),  # PC
        ({"grid:code": "MGRS-18SVG"}, "S2B_18SVG_20230101_0_L2A", "18SVG"),  # Earth Search v1
        ({"mgrs:utm_zone": 33, "mgrs:latitude_band": "U", "mgrs:grid_square": "WP"}, "x", "33UWP"),  # v1 mgrs
        (
            {"sentinel:utm_zone": 9, "sentinel:latitude_band": "U", "sentinel:grid_square": "WP"},
            "y",
            "09UWP",
        ),  # v0
        ({}, "S2B_18SVG_20230101_0_L2A", "18SVG"),  # only the id says
        ({}, "S2A_MSIL1C_20150627T155106_N0204_R054_T18SVG_20150627T155107", "18SVG"),
        ({}, "my-own-item", None),
    ],
)
def test_tile_of_every_api_flavour(props, item_id, tile):
    import pystac

    from agriland_scale.search.stac import item_tile

    item = pystac.Item(item_id, None, None, "2020-01-01T00:00:00Z", props)
    assert item_tile(item) == tile
