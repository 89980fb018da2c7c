"""Bad pipeline files, overrides, bboxes and input files: each gives a short, actionable error."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
import yaml

from agriland_scale import load_config
from agriland_scale.config.files import check_input_files
from agriland_scale.config.region import read_region_file
from agriland_scale.config.schema import check_bbox
from agriland_scale.errors import ConfigError, CorruptInput, RegionError

from .conftest import DEMO_YAML

SHORT = 2000  # no message may dump a huge value


def _demo() -> dict:
    return yaml.safe_load(DEMO_YAML.read_text())


def _write(tmp_path, data: dict, name: str = "p.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _bomb(levels: int = 9, width: int = 9) -> str:
    """The 'billion laughs': each level repeats the previous one ``width`` times."""
    lines = ["a0: &a0 [" + ", ".join(['"x"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _polygon_fc() -> dict:
    ring = [[-75.7, 37.62], [-75.58, 37.62], [-75.58, 37.71], [-75.7, 37.71], [-75.7, 37.62]]
    return {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
        ],
    }


# --- 1. size limits and YAML aliases -------------------------------------------------------


@pytest.mark.parametrize("where", ["alone", "in the demo pipeline", "as a value"])
def test_yaml_alias_bomb_is_refused_quickly(tmp_path, where):
    text = {
        "alone": _bomb(),
        "in the demo pipeline": DEMO_YAML.read_text() + _bomb().replace("a0:", "x-a0:"),
        "as a value": _bomb() + "name: *a8\n",
    }[where]
    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    assert len(text.splitlines()) < 60
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(
            ConfigError,
            match=r"bomb\.yaml uses YAML aliases that expand to more than "
            r"100,000 values",
        ) as err:
            load_config(p)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 50 * 2**20
    assert len(str(err.value)) < SHORT


def test_recursive_alias_is_refused(tmp_path):
    p = tmp_path / "rec.yaml"
    p.write_text(DEMO_YAML.read_text() + "x-loop: &loop [*loop]\n")
    with pytest.raises(ConfigError, match=r"rec\.yaml uses a YAML alias inside its own anchor"):
        load_config(p)


def test_deep_nesting_is_refused_quickly(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("name: " + "[" * 20_000 + "]" * 20_000 + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"deep\.yaml nests \[lists\] or \{mappings\} more than 64 deep"):
        load_config(p)
    assert time.perf_counter() - t0 < 1.0


def test_anchors_and_aliases_still_work(tmp_path):
    text = DEMO_YAML.read_text()
    text = text.replace(
        "cube:\n  bands: [red, green, blue, nir]", "cube:\n  bands: &cube_bands [red, green, blue, nir]"
    )
    text = text.replace("embed:\n  bands: [red, green, blue]", "embed:\n  bands: &rgb [red, green, blue]")
    text = text.replace(
        "segment:\n  encoder: plain\n  weights: none\n  bands: [red, green, blue]",
        "segment:\n  encoder: plain\n  weights: none\n  bands: *rgb",
    )
    assert text.count("*rgb") == 1 and "&cube_bands" in text
    p = tmp_path / "anchors.yaml"
    p.write_text(text)
    cfg = load_config(p)
    assert cfg.segment.bands == cfg.embed.bands == ["red", "green", "blue"]


def test_pipeline_file_over_1_mib_is_refused(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text(DEMO_YAML.read_text() + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml is 1\.0 MiB: a pipeline file is a few KiB") as err:
        load_config(p)
    assert len(str(err.value)) < SHORT


# --- 2. error messages stay short ----------------------------------------------------------


def test_missing_key_does_not_dump_the_section(tmp_path):
    data = _demo()
    del data["search"]["collections"]
    data["search"]["datetime"] = "2015-06-01/2016-07-01" + " " * 5000
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    msg = str(err.value)
    assert "  - search.collections: missing: add it (see the README's pipeline-file reference)" in msg
    assert "found" not in msg and "catalog" not in msg
    assert len(msg) < 300


def test_huge_value_is_cut(tmp_path):
    data = _demo()
    data["cube"]["resolution"] = "ten" * 10_000
    msg = r"cube\.resolution: Input should be a valid number.*\(found 'tententen"
    with pytest.raises(ConfigError, match=msg) as err:
        load_config(_write(tmp_path, data))
    msg = str(err.value)
    assert "..." in msg and len(msg) < 400


def test_huge_list_value_is_cut(tmp_path):
    data = _demo()
    data["cube"]["bands"] = ["red"] * 5000
    with pytest.raises(ConfigError, match=r"cube\.bands: bands .* name a band twice \(\['red'\]\)") as err:
        load_config(_write(tmp_path, data))
    assert len(str(err.value)) < 600


def test_many_errors_are_capped(tmp_path):
    data = _demo()
    data["search"]["collections"] = list(range(500))
    with pytest.raises(ConfigError, match=r"search\.collections\.0: Input should be a valid string") as err:
        load_config(_write(tmp_path, data))
    msg = str(err.value)
    assert "and 480 more errors" in msg
    assert len(msg) < SHORT


# --- 3. not a YAML file --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 10, b"\x89PNG\r\n\x1a\n" + bytes(100), b"name: x\x00\x00\n"],
    ids=["all-bytes", "png", "nul"],
)
def test_binary_pipeline_file(tmp_path, content):
    p = tmp_path / "image.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=r"pipeline file .*image\.yaml is not a text YAML file") as err:
        load_config(p)
    assert len(str(err.value)) < 300


def test_pipeline_path_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=rf"pipeline file {tmp_path} is a folder: give the path of a "):
        load_config(tmp_path)


# --- 4. overrides --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, msg",
    [
        (
            "embed.trian.epochs",
            (
                r"override 'embed\.trian\.epochs': no such key 'trian' in section 'embed' "
                r"\(did you mean 'train'\?\); valid keys there: bands, .*train, weights"
            ),
        ),
        (
            "nosuch.key",
            (
                r"override 'nosuch\.key': no such key 'nosuch' at the top level; valid keys there: "
                r"cluster, cube, embed, name, output, patches, publish, runtime, search, seed, segment"
            ),
        ),
        ("seed.x", r"override 'seed\.x': 'seed' is a value \(42\), not a section"),
        (
            "cluster.kk",
            r"override 'cluster\.kk': no such key 'kk' in section 'cluster' \(did you mean 'k'\?\)",
        ),
    ],
)
def test_override_unknown_key(demo_cfg, key, msg):
    with pytest.raises(ConfigError, match=msg):
        demo_cfg.with_overrides(**{key: 1})
    with pytest.raises(ConfigError, match=msg):
        load_config(DEMO_YAML, **{key: 1})


@pytest.mark.parametrize(
    "key, value, msg",
    [
        (
            "embed.train.epochs",
            -1,
            (
                r"invalid override embed\.train\.epochs:\n  - embed\.train\.epochs: Input "
                r"should be greater than or equal to 0 \(found -1\)"
            ),
        ),
        (
            "cube.chunk",
            100,
            (
                r"invalid override cube\.chunk:\n.*cube\.chunk \(100\) must be a multiple of "
                r"patches\.stride"
            ),
        ),
        ("search.bbox", [179, 10, -179, 11], r"invalid override search\.bbox:\n.*antimeridian"),
        (
            "cube.read_chunk",
            300,
            r"invalid override cube\.read_chunk:\n.*cube\.read_chunk \(300\) must be 'auto' "
            r"or a multiple of cube\.chunk \(256\)",
        ),
        ("name", "x" * 100_000, None),
    ],
)
def test_override_invalid_value(demo_cfg, key, value, msg):
    if msg is None:  # a valid value: no error, however long
        assert demo_cfg.with_overrides(**{key: value}).name == value
        return
    with pytest.raises(ConfigError, match=msg) as err:
        demo_cfg.with_overrides(**{key: value})
    assert len(str(err.value)) < SHORT
    with pytest.raises(ConfigError, match=msg.replace(":\\n", r" of pipeline file .*demo\.yaml:\n", 1)):
        load_config(DEMO_YAML, **{key: value})


def test_override_alias_bomb_value_is_refused(demo_cfg):
    value = ["x"] * 9
    for _ in range(8):
        value = [value] * 9  # 9 ** 9 strings when expanded, 81 distinct lists
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"override 'search\.collections': its value expands to more than"):
        demo_cfg.with_overrides(**{"search.collections": value})
    assert time.perf_counter() - t0 < 1.0


# --- 5. bbox -------------------------------------------------------------------------------


def test_bbox_across_the_antimeridian():
    with pytest.raises(RegionError) as err:
        check_bbox([179, 10, -179, 11])
    msg = str(err.value)
    assert "seems to cross the antimeridian" in msg and "not supported" in msg
    assert "two runs, with bbox [179, 10, 180, 11] and [-180, 10, -179, 11]" in msg
    assert "Did you mean" not in msg and "[-179, 10, 179, 11]" not in msg


def test_bbox_across_the_antimeridian_in_a_pipeline(tmp_path):
    data = _demo()
    data["search"]["bbox"] = [179.5, -17.5, -179.5, -16.5]
    msg = (
        r"search\.bbox: bbox \[179\.5, -17\.5, -179\.5, -16\.5\] .*antimeridian.*"
        r"\[179\.5, -17\.5, 180, -16\.5\] and \[-180, -17\.5, -179\.5, -16\.5\]"
    )
    with pytest.raises(ConfigError, match=msg):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize(
    "bbox, fix",
    [
        ([10, 50, 9, 51], "[9, 50, 10, 51]"),
        ([10, 51, 11, 50], "[10, 50, 11, 51]"),
        ([-75.58, 37.62, -75.70, 37.71], "[-75.7, 37.62, -75.58, 37.71]"),
    ],
)
def test_swapped_bbox_keeps_the_swap_hint(bbox, fix):
    with pytest.raises(RegionError, match="min >= max") as err:
        check_bbox(bbox)
    assert f"Did you mean {fix}?" in str(err.value)
    assert "antimeridian" not in str(err.value)


# --- 6. check_input_files ------------------------------------------------------------------


def test_demo_input_files_are_fine(demo_cfg):
    check_input_files(demo_cfg)


def _region_cfg(demo_cfg, path):
    return demo_cfg.with_overrides(**{"search.bbox": None, "search.region": str(path)})


def test_input_region_ok_and_missing(demo_cfg, tmp_path):
    good = tmp_path / "region.geojson"
    good.write_text(json.dumps(_polygon_fc()))
    check_input_files(_region_cfg(demo_cfg, good))
    with pytest.raises(RegionError, match=r"region file .*nope\.geojson does not exist: fix search\.region"):
        check_input_files(_region_cfg(demo_cfg, tmp_path / "nope.geojson"))


def test_input_region_junk(demo_cfg, tmp_path):
    junk = tmp_path / "region.geojson"
    junk.write_text("hello")
    with pytest.raises(CorruptInput, match=r"cannot read region file .*region\.geojson .*give a GeoJSON"):
        check_input_files(_region_cfg(demo_cfg, junk))


def test_input_catalog(demo_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"search\.catalog: folder .*nocat does not exist: give the folder"):
        check_input_files(demo_cfg.with_overrides(**{"search.catalog": str(tmp_path / "nocat")}))
    with pytest.raises(ConfigError, match=r"search\.catalog: folder .* has no collection\.json"):
        check_input_files(demo_cfg.with_overrides(**{"search.catalog": str(tmp_path)}))
    (tmp_path / "collection.json").write_text("{not json")
    with pytest.raises(CorruptInput, match=r"search\.catalog: .*collection\.json is not a STAC collection"):
        check_input_files(demo_cfg.with_overrides(**{"search.catalog": str(tmp_path)}))
    (tmp_path / "collection.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"search\.catalog: folder .* holds no item\*\.json files"):
        check_input_files(demo_cfg.with_overrides(**{"search.catalog": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"search\.catalog: .*collection\.json is a file, not a folder"):
        check_input_files(demo_cfg.with_overrides(**{"search.catalog": str(tmp_path / "collection.json")}))
    # a remote API: the catalog is not read
    check_input_files(
        demo_cfg.with_overrides(
            **{"search.api": "https://example.invalid/stac", "search.catalog": str(tmp_path / "nocat")}
        )
    )


def test_input_labels(demo_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"segment\.labels: labels file .*nolabels\.geojson does not exist"):
        check_input_files(demo_cfg.with_overrides(**{"segment.labels": str(tmp_path / "nolabels.geojson")}))
    with pytest.raises(ConfigError, match=r"segment\.labels: labels file .* is a folder, not a file"):
        check_input_files(demo_cfg.with_overrides(**{"segment.labels": str(tmp_path)}))


@pytest.mark.parametrize("section", ["embed", "segment"])
def test_input_models_and_weights(demo_cfg, tmp_path, section):
    model = tmp_path / "m.keras"
    missing = rf"{section}\.model: model file .*m\.keras does not exist: give the \.keras file written by"
    with pytest.raises(ConfigError, match=missing):
        check_input_files(demo_cfg.with_overrides(**{f"{section}.model": str(model)}))
    model.write_bytes(b"PK")
    with pytest.raises(CorruptInput, match=rf"{section}\.model: model .*m\.keras has no metadata sidecar"):
        check_input_files(demo_cfg.with_overrides(**{f"{section}.model": str(model)}))
    (tmp_path / "m.keras.json").write_text("{}")
    check_input_files(demo_cfg.with_overrides(**{f"{section}.model": str(model)}))
    check_input_files(demo_cfg.with_overrides(**{f"{section}.model": "s3://bucket/m.keras"}))
    missing = (
        rf"{section}\.weights: weights file .*w\.weights\.h5 does not exist: "
        r"give a \.keras or \.weights\.h5 file, 'imagenet' or 'none'"
    )
    with pytest.raises(ConfigError, match=missing):
        check_input_files(demo_cfg.with_overrides(**{f"{section}.weights": str(tmp_path / "w.weights.h5")}))
    check_input_files(demo_cfg.with_overrides(**{f"{section}.weights": "imagenet"}))


# --- 7. region files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, exc, msg",
    [
        ("missing.geojson", None, RegionError, r"region file .*missing\.geojson does not exist: fix search"),
        ("junk.txt", "hello\n", CorruptInput, r"cannot read region file .*junk\.txt \(.*not a geodata file"),
        (
            "points.geojson",
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {},
                        "geometry": {"type": "Point", "coordinates": [1, 2]},
                    }
                ],
            },
            RegionError,
            r"region file .*points\.geojson holds no polygons \(found \['Point'\]\)",
        ),
        (
            "empty.geojson",
            {"type": "FeatureCollection", "features": []},
            RegionError,
            r"region file .*empty\.geojson holds no features",
        ),
        (
            "null.geojson",
            {
                "type": "FeatureCollection",
                "features": [{"type": "Feature", "properties": {}, "geometry": None}],
            },
            RegionError,
            r"region file .*null\.geojson holds no geometry",
        ),
        ("folder", "DIR", RegionError, r"region file .*folder is a folder: give a GeoJSON"),
    ],
)
def test_bad_region_files(tmp_path, name, content, exc, msg):
    p = tmp_path / name
    if content == "DIR":
        p.mkdir()
    elif isinstance(content, str):
        p.write_text(content)
    elif content is not None:
        p.write_text(json.dumps(content))
    with pytest.raises(exc, match=msg) as err:
        read_region_file(p)
    assert "search.region" in str(err.value)
    assert len(str(err.value)) < 500


def test_input_files_checked_only_for_the_stages_that_read_them(demo_cfg, tmp_path):
    """A resumed run is not refused for a file only a finished stage read (labels moved away
    after the U-Net was trained, a local catalogue gone after the cube)."""
    from agriland_scale.config.files import check_input_files

    moved = demo_cfg.with_overrides(
        **{"segment.labels": str(tmp_path / "moved.geojson"), "search.catalog": str(tmp_path / "gone")}
    )
    check_input_files(moved, {"embeddings", "clusters", "publish"})
    with pytest.raises(ConfigError, match="segment.labels"):
        check_input_files(moved, {"segmentation"})
    with pytest.raises(ConfigError, match="search.catalog"):
        check_input_files(moved, {"cube"})
