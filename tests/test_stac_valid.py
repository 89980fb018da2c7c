"""The STAC a run writes is valid: every JSON file under ``OUT/stac/`` and the MLM items
beside the models (``OUT/models/*.stac.json``) against the official STAC schema of its type
(Item, Collection, Catalog) and the schema of every extension in its ``stac_extensions``.

Offline: the schemas come from ``tests/data/stac-schemas/`` (official files, see its
README) and from pystac (the STAC core and GeoJSON schemas it ships). A schema URL with no
local copy fails the test, naming the URL; ``UNAVAILABLE`` lists the one known gap.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from agriland_scale.publish.stac import SENTINEL_LICENSE_URL, write_stac

SCHEMA_DIR = Path(__file__).resolve().parent / "data" / "stac-schemas"
CLASSIFICATION_V110 = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"


def _without_output_classes(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for out in (doc.get("properties") or {}).get("mlm:output") or []:
        out.pop("classification:classes", None)
    return doc


# Schemas that no package offers (see the README's "Known gap"): URL -> (what refers to it,
# the document without the fields that reach it). A document that reaches one is validated
# in full without those fields, and the test ends as xfail naming the URL.
UNAVAILABLE: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    CLASSIFICATION_V110: (
        "mlm:output[].classification:classes (MLM 1.4.0 refers to it)",
        _without_output_classes,
    ),
}


class MissingSchema(LookupError):
    """A schema URL with no local copy."""


class SchemaGap(LookupError):
    """A schema URL listed in UNAVAILABLE."""

    def __init__(self, url: str):
        super().__init__(url)
        self.url = url


def _retrieve(uri: str):
    raise MissingSchema(
        f"no local copy of the schema {uri}: add the official file as "
        f"tests/data/stac-schemas/{uri.split('://', 1)[-1].split('#')[0]} "
        "(see the README there)"
    )


@cache
def _registry():
    from pystac.validation.local_validator import get_local_schema_cache
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    schemas = dict(get_local_schema_cache())  # STAC core (the version pystac writes) and GeoJSON
    for path in sorted(SCHEMA_DIR.rglob("*.json")):
        schemas["https://" + path.relative_to(SCHEMA_DIR).as_posix()] = json.loads(path.read_text())
    return Registry(retrieve=_retrieve).with_resources(
        (url, Resource.from_contents(s, default_specification=DRAFT7)) for url, s in schemas.items()
    )


def schema_urls(doc: dict[str, Any]) -> list[str]:
    """The core schema of the document's type and version, then its extensions' schemas."""
    kind = {"Feature": "item", "Collection": "collection", "Catalog": "catalog"}.get(doc.get("type"))
    assert kind, f"not a STAC Item, Collection or Catalog: type {doc.get('type')!r}"
    core = f"https://schemas.stacspec.org/v{doc['stac_version']}/{kind}-spec/json-schema/{kind}.json"
    return [core, *doc.get("stac_extensions", [])]


def _deepest(err):
    """The error deepest in the document among ``err`` and those below it (oneOf, anyOf)."""
    leaves = [_deepest(c) for c in err.context or []]
    return max(leaves, key=lambda e: len(e.absolute_path), default=err)


def stac_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema error of the document ([] when valid).

    Raises MissingSchema for a schema (or a schema it refers to) with no local copy, and
    SchemaGap for one listed in UNAVAILABLE.
    """
    from jsonschema import Draft7Validator
    from referencing.exceptions import Unresolvable

    errors = []
    for url in schema_urls(doc):
        try:
            found = list(Draft7Validator({"$ref": url}, registry=_registry()).iter_errors(doc))
        except Unresolvable as e:
            ref = str(getattr(e, "ref", "") or e)
            base = ref.split("#")[0]
            if base in UNAVAILABLE:
                raise SchemaGap(base) from e
            cause = e.__cause__ if isinstance(e.__cause__, MissingSchema) else None
            raise MissingSchema(
                str(cause)
                if cause
                else f"{url} refers to {ref}, which cannot be "
                f"resolved offline ({e}): add its schema to tests/data/stac-schemas"
            ) from e
        for err in found:  # below a oneOf/anyOf, the deepest error names the field
            leaf = _deepest(err)
            errors.append(f"{url}: {leaf.json_path}: {leaf.message[:300]}")
    return errors


def validate_files(paths: list[Path]) -> list[str]:
    """Assert that every file is valid; returns the gaps met (UNAVAILABLE schemas), if any."""
    assert paths, "no STAC file to validate"
    gaps, failures = [], {}
    for path in paths:
        doc = json.loads(path.read_text())
        try:
            errors = stac_errors(doc)
        except SchemaGap as gap:
            what, strip = UNAVAILABLE[gap.url]
            gaps.append(
                f"{path.name}: {what} not validated: {gap.url} is missing from tests/data/stac-schemas"
            )
            errors = stac_errors(strip(doc))  # all the rest must be valid
        if errors:
            failures[str(path)] = errors
    assert not failures, json.dumps(failures, indent=1)
    return gaps


def _end(gaps: list[str]) -> None:
    if gaps:
        pytest.xfail("; ".join(gaps))


# --- a small real run folder: the demo's search, its cube, three COGs made from it --------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, items, cube_store):
    """A run folder as the publish stage sees it when it writes the catalogue (publish is
    still 'running' in run.json), with real items, cube, COGs and Zarr store."""
    import numpy as np

    from agriland_scale.publish.cog import write_cog
    from agriland_scale.store import export_zarr, open_cube
    from agriland_scale.store.resume import Products

    out = tmp_path_factory.mktemp("stac-run")
    Products(out).write(open_cube(cube_store), "cube")
    (out / "items.json").write_text(
        json.dumps({"type": "FeatureCollection", "features": [i.to_dict() for i in items]})
    )
    cube = open_cube(out)
    nir = cube["reflectance"].sel(band="nir").load()
    prob = (nir / float(nir.max())).clip(0, 1).astype("float32")
    write_cog(prob, out / "cog" / "probability.tif", nodata=255, scale=1 / 254)
    write_cog((prob > 0.5).astype("uint8"), out / "cog" / "mask.tif", nodata=255)
    write_cog(
        (prob.coarsen(y=32, x=32).mean() * 5).astype("int16"), out / "cog" / "cluster_map.tif", nodata=-1
    )
    stages = ("search", "cube", "patches", "cae", "embeddings", "clusters", "unet", "segmentation")
    (out / "run.json").write_text(
        json.dumps(
            {
                "config": {"name": "stac-check", "search": {"datetime": "2015-06-01/2016-07-01"}},
                "started": "2025-05-01T10:00:00+0000",
                "stages": {**{s: "done" for s in stages}, "publish": "running"},
                "versions": {"agriland_scale": "test"},
                "cube": {
                    "shape": {d: int(cube.sizes[d]) for d in ("band", "y", "x")},
                    "crs": str(cube.rio.crs),
                    "transform": [float(v) for v in list(cube.rio.transform())[:6]],
                    "bounds": [float(v) for v in cube.rio.bounds()],
                },
            }
        )
    )
    assert np.isfinite(prob.values).any()
    export_zarr(out, out / "plain.zarr")  # a plain Zarr export: assets with xarray:open_kwargs
    return out, write_stac(out)


def test_catalogue_of_a_run_is_valid(small_run):
    out, coll_path = small_run
    files = sorted((out / "stac").rglob("*.json"))
    # the collection, 3 COG items, the Zarr item and the copy of the source item
    assert len(files) == 6 and coll_path in files
    assert validate_files(files) == []
    coll = json.loads(coll_path.read_text())
    assert coll["agriland:stages"] and "publish" not in coll["agriland:stages"]
    assert "running" not in json.dumps(coll)
    assert coll["license"] == "other"  # not an SPDX id: the licence is linked
    assert [lk["href"] for lk in coll["links"] if lk["rel"] == "license"] == [SENTINEL_LICENSE_URL]
    (source,) = (out / "stac" / "sources").glob("*.json")
    src = json.loads(source.read_text())
    # the local API the run read is gone: no link to it, so no collection field either
    assert "collection" not in src and not any("127.0.0.1" in lk["href"] for lk in src["links"])
    used = {u for f in files for u in json.loads(f.read_text()).get("stac_extensions", [])}
    assert {
        "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
        "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        "https://stac-extensions.github.io/xarray-assets/v1.0.0/schema.json",
    } <= used


def test_source_copy_keeps_a_lasting_collection_link(small_run, tmp_path):
    out, _ = small_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("stac"))
    fc = json.loads((run / "items.json").read_text())
    api = "https://stac.example.org/collections/demo"
    for f in fc["features"]:
        f["collection"] = "demo"
        f["links"] = [lk for lk in f["links"] if lk["rel"] != "collection"] + [
            {"rel": "collection", "href": api, "type": "application/json"}
        ]
    (run / "items.json").write_text(json.dumps(fc))
    write_stac(run)
    (source,) = (run / "stac" / "sources").glob("*.json")
    src = json.loads(source.read_text())
    assert src["collection"] == "demo"
    assert {"rel": "collection", "href": api, "type": "application/json"} in src["links"]
    assert validate_files([source]) == []


def test_validation_catches_errors_and_missing_schemas(small_run):
    out, coll_path = small_run
    (source,) = (out / "stac" / "sources").glob("*.json")
    src = json.loads(source.read_text())
    # what the catalogue had before: a collection field without a collection link
    assert any("collection" in e for e in stac_errors(src | {"collection": "agriland-demo-virginia"}))
    item_path = next(p for p in (out / "stac").rglob("*.json") if p.parent.name.endswith("-mask"))
    item = json.loads(item_path.read_text())
    bad = copy.deepcopy(item)
    bad["properties"]["proj:shape"] = ["1024", 1024]  # extension schema: integers
    assert any("projection" in e and "proj:shape" in e for e in stac_errors(bad))
    coll = json.loads(coll_path.read_text())
    assert stac_errors(coll | {"license": "Copernicus Sentinel data"})  # not an SPDX-like id
    # a schema with no local copy fails, naming the URL to add
    url = "https://stac-extensions.github.io/sat/v1.0.0/schema.json"
    with pytest.raises(MissingSchema, match="sat/v1.0.0/schema.json"):
        stac_errors(item | {"stac_extensions": [*item["stac_extensions"], url]})
    with pytest.raises(MissingSchema, match="v1.0.0/item-spec"):
        stac_errors(item | {"stac_version": "1.0.0"})


def test_mlm_items_are_valid(tmp_path):
    """The MLM items of both models, with the outputs the training writes (train.py)."""
    from agriland_scale.models.mlm import write_mlm_item

    meta = {
        "bands": ["red", "green", "blue"],
        "normalisation": {"reflectance_max": 0.3},
        "patch_size": 64,
        "initial_weights": "imagenet",
        "training_region": "virginia",
        "epochs": 1,
        "steps_per_epoch": 2,
        "batch_size": 4,
        "learning_rate": 0.001,
        "seed": 0,
    }
    bbox = [-75.70, 37.62, -75.58, 37.71]
    encoder = write_mlm_item(
        tmp_path / "encoder.keras",
        meta | {"model": "cae_encoder", "task": "embedding", "head": "dense"},
        bbox_lonlat=bbox,
        n_params=12345,
        output={
            "name": "embedding",
            "tasks": ["embedding"],
            "result": {"shape": [-1, 32], "dim_order": ["batch", "embedding"], "data_type": "float32"},
        },
    )
    unet = write_mlm_item(
        tmp_path / "unet.keras",
        meta | {"model": "unet", "task": "segmentation", "encoder": "resnet50"},
        bbox_lonlat=bbox,
        n_params=12345,
        output={
            "name": "agricultural land probability",
            "tasks": ["semantic-segmentation"],
            "result": {
                "shape": [-1, 64, 64, 1],
                "dim_order": ["batch", "height", "width", "channel"],
                "data_type": "float32",
            },
            "classification:classes": [{"value": 0, "name": "other"}, {"value": 1, "name": "agricultural"}],
            "post_processing_function": None,
        },
    )
    # per-band normalisation (issue 33): one value_scaling a band, in the input's band order
    per_band = {"red": 0.3, "green": 0.3, "blue": 0.3, "nir": 0.5}
    unet4 = write_mlm_item(
        tmp_path / "unet4.keras",
        meta
        | {"model": "unet", "task": "segmentation", "encoder": "plain", "bands": list(per_band)}
        | {"normalisation": {"reflectance_max": per_band}},
        bbox_lonlat=bbox,
        n_params=12345,
        output={
            "name": "agricultural land probability",
            "tasks": ["semantic-segmentation"],
            "result": {"shape": [-1, 64, 64, 1], "dim_order": ["batch", "height", "width", "channel"]}
            | {"data_type": "float32"},
        },
    )
    scaling = json.loads(unet4.read_text())["properties"]["mlm:input"][0]["value_scaling"]
    assert [v["maximum"] for v in scaling] == list(per_band.values())
    assert json.loads(encoder.read_text())["properties"]["mlm:tasks"] == ["similarity-search"]
    assert json.loads(unet.read_text())["properties"]["mlm:tasks"] == ["semantic-segmentation"]
    _end(validate_files([encoder, unet, unet4]))


# --- slow: the real demo run ---------------------------------------------------------------------


@pytest.mark.slow
def test_demo_run_stac_is_valid(demo_run):
    _, out, _ = demo_run
    out = Path(out)
    files = sorted((out / "stac").rglob("*.json"))
    assert out / "stac" / "collection.json" in files and len(files) >= 5
    gaps = validate_files(files)
    assert gaps == []
    coll = json.loads((out / "stac" / "collection.json").read_text())
    assert "running" not in json.dumps(coll["agriland:stages"])
    models = sorted((out / "models").glob("*.stac.json"))
    assert {p.name for p in models} >= {"encoder.keras.stac.json", "unet.keras.stac.json"}
    _end(validate_files(models))
