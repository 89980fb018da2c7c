"""The run: its stages and what they depend on, the output folder's layout, and its record.

One place answers "where does a run keep X" and "what does stage S need": the runner, the
CLI, ``inspect``, the report and the STAC writer all read these names. An output folder::

    OUT/run.json            the run's record (:class:`RunRecord`): config, stage status,
                            timings, files each stage wrote, zones
    OUT/items.json          the STAC items the search found
    OUT/agriland.icechunk/  every product, one Zarr group each (per zone prefix ``utm18n/``
                            when the region spans zones), in an Icechunk repository: versioned,
                            never half-written (:mod:`agriland_scale.store`)
    OUT/cog/                GeoTIFF (COG) copies for GIS users
    OUT/models/             trained models and their metadata sidecars
    OUT/logs/               run and worker logs, the Dask performance report
    OUT/.agriland.lock      held by the process writing the run
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, cast

from agriland_scale.errors import ConfigError, CorruptInput, OutputError

__all__ = [
    "COG_DIR",
    "COG_NAMES",
    "DEPENDS",
    "GROUPS",
    "ITEMS",
    "LOCK_NAME",
    "LOGS_DIR",
    "MODEL_STAGES",
    "MODELS_DIR",
    "PARTIAL_DIR",
    "RECORD",
    "STAGES",
    "STAGE_FILES",
    "STAGE_SETTINGS",
    "STAGE_TABLE",
    "STORE",
    "RunRecord",
    "Stage",
    "dependents",
    "load_items",
    "load_run_record",
    "local_folder",
    "read_record",
    "stages_needed",
    "zone_name",
    "zones_of",
]

STORE = "agriland.icechunk"
RECORD = "run.json"
ITEMS = "items.json"
COG_DIR = "cog"
MODELS_DIR = "models"
LOGS_DIR = "logs"
PARTIAL_DIR = ".partial"
LOCK_NAME = ".agriland.lock"
# the COGs the publish stage writes for each zone (``OUT/cog/[ZONE_]NAME.tif``)
COG_NAMES = ("cluster_map", "probability", "mask")


_OBJECT_STORES = {
    "s3": "Amazon S3 or an S3-compatible server",
    "gs": "Google Cloud Storage",
    "gcs": "Google Cloud Storage",
    "az": "Azure Blob Storage",
    "abfs": "Azure Blob Storage",
    "abfss": "Azure Blob Storage",
    "http": "an HTTP server",
    "https": "an HTTP server",
}


def local_folder(location: str | Path) -> Path:
    """Return the local folder a run lives in, from a path or a ``file://`` URL (absolute, ``~`` expanded).

    Parameters
    ----------
    location : str or Path
        ``OUT`` as the user gave it (``--out``, ``agriland inspect RUN``, ``open_run``).

    Returns
    -------
    Path
        The folder, resolved.

    Raises
    ------
    OutputError
        ``location`` is an object-storage URL (``s3://``, ``gs://``, ``az://``: callers that
        accept one handle it before) or a URL of another kind.
    """
    text = str(location)
    url = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", text)
    if url:
        scheme, rest = url.groups()
        if scheme.lower() == "file":
            return Path(rest).expanduser().resolve()
        if scheme.lower() in ("s3", "gs", "gcs", "az", "abfs", "abfss"):
            raise OutputError(
                f"{text} is on {_OBJECT_STORES[scheme.lower()]}, and this takes a local folder: give a folder "
                "here (a run on object storage is read with `agriland inspect URL`, `agriland export URL "
                "--zarr DEST` or agriland_scale.open_run(URL))"
            )
        raise OutputError(
            f"{text}: '{scheme}://' is not a supported location; use a local folder (or file://), "
            "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"
        )
    return Path(text).expanduser().resolve()


class RunRecord(TypedDict, total=False):
    """``OUT/run.json``: what a run did and wrote (written after every stage, also on failure).

    Keys appear as stages finish; a reader must expect any of them to be missing.
    """

    config: dict[str, Any]
    stages: dict[str, str]  # stage -> status, as the runner writes it (done, failed, interrupted, running)
    timings_s: dict[str, float]
    files: dict[str, list[str]]
    pending_removal: list[str]
    inputs: dict[str, Any]
    cube: dict[str, Any]
    cube_computed_by: (
        str  # "the cluster", or the worker in the agriland process while the workers loaded models
    )
    zones: dict[str, dict[str, Any]]
    products: dict[str, Any]
    versions: dict[str, str]
    performance_report: str
    started: str
    finished: str
    error: str
    attempts: int
    dashboard: str
    scheduler: str
    gpu: bool
    precision: dict[
        str, str
    ]  # model stage -> Keras dtype policy of its predictions (float32, mixed_bfloat16)
    patches: dict[str, Any]
    cae: dict[str, Any]
    clusters: dict[str, Any]
    unet: dict[str, Any]
    vector: dict[str, Any]
    store: dict[str, Any]  # the product store: location, commits and their seconds (this invocation)
    location: str  # the folder, or the object-storage URL (s3://...) the run lives at


def stages_needed(until: str | None) -> list[str]:
    """Stages to run to produce ``until`` (all when ``None``), in pipeline order."""
    if until is None:
        return list(STAGES)
    if until not in STAGES:
        raise ConfigError(f"unknown stage '{until}': choose one of {', '.join(STAGES)}")
    need, todo = set(), [until]
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(DEPENDS[s])
    return [s for s in STAGES if s in need]


def dependents(stages: Iterable[str]) -> set[str]:
    """``stages`` and every stage that reads their outputs, directly or not."""
    out = set(stages)
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"unknown stage '{s}' for --force: choose one of {', '.join(STAGES)}")
    changed = True
    while changed:
        changed = False
        for s, deps in DEPENDS.items():
            if s not in out and out & set(deps):
                out.add(s)
                changed = True
    return out


def zone_name(epsg: int) -> str:
    """``32618`` -> ``utm18n``, ``32733`` -> ``utm33s``, others ``epsgNNNN``."""
    if 32601 <= epsg <= 32660:
        return f"utm{epsg - 32600:02d}n"
    if 32701 <= epsg <= 32760:
        return f"utm{epsg - 32700:02d}s"
    return f"epsg{epsg}"


def read_record(out: Path) -> RunRecord | None:
    """``OUT/run.json`` as a dict, ``None`` when the folder has none.

    Raises
    ------
    OutputError
        run.json exists but cannot be read as a JSON object. The message is the same for
        ``agriland run`` and ``agriland inspect``: the record lists what the run wrote, so
        without it nothing in the folder can be told apart from a user's files.
    """
    path = out / "run.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        rec, why = None, f"{type(e).__name__}: {e}"
    else:
        why = f"it holds a JSON {type(rec).__name__}, not an object"
    if not isinstance(rec, dict):
        raise OutputError(
            f"{path} is damaged ({why[:200]}). It is the record of what the run in {out} wrote, so "
            "agriland cannot resume it or tell its files from others: restore run.json (from a "
            "backup), or move that folder away and run again into a new --out folder"
        )
    return cast(RunRecord, rec)


def load_run_record(out_dir: str | Path) -> RunRecord:
    """Read ``OUT/run.json``, the record every run writes (also when a stage fails).

    Raises
    ------
    CorruptInput
        ``out_dir`` is not a folder, or has no ``run.json`` (not an agriland run).
    OutputError
        Its ``run.json`` is damaged (not a JSON object).
    """
    out = local_folder(out_dir)
    if not out.is_dir():
        raise CorruptInput(f"{out} is not a folder: pass the --out folder of an agriland run")
    record = read_record(out)  # a damaged run.json: the same advice as `agriland run` gives
    if record is None:
        raise CorruptInput(
            f"{out} holds no run.json, so it is not the output folder of an agriland "
            "run: pass the folder given as --out to 'agriland run' / 'agriland demo'"
        )
    return record


def load_items(out_dir: str | Path) -> list[dict[str, Any]]:
    """Read the STAC items (as dicts) the run used, from ``OUT/items.json``; [] when absent.

    Parameters
    ----------
    out_dir : str or Path
        The run's output folder (``OUT``).

    Returns
    -------
    list of dict
        The ``features`` of ``items.json`` (STAC Item dicts, EPSG:4326 geometries).

    Raises
    ------
    CorruptInput
        ``items.json`` exists but is not a GeoJSON FeatureCollection.
    """
    path = Path(out_dir) / "items.json"
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptInput(f"{path} is not valid JSON ({e}): re-run the search stage") from e
    features = doc.get("features") if isinstance(doc, dict) else None
    if not isinstance(features, list):
        raise CorruptInput(
            f"{path} is not a FeatureCollection of STAC items (no 'features' list): re-run the search stage"
        )
    return features


def zones_of(record: RunRecord) -> dict[str, dict[str, Any]]:
    """Return the run's UTM zones with a cube: ``{name: {prefix, crs, shape, transform, bounds, ...}}``.

    A single-zone run keeps the plain store layout (prefix ``""``; its name is ``""`` when
    run.json predates zones); a multi-zone run has one prefix a zone (``utm18n/``). Zones left
    out because they had no clear pixel are skipped. Empty when no cube was written.

    Parameters
    ----------
    record : RunRecord
        The run's ``run.json`` as loaded by :func:`load_run_record`.

    Returns
    -------
    dict
        Zone name -> zone record (``prefix``, ``crs``, ``shape`` (rows, cols), ``transform``
        and ``bounds`` in the zone's UTM CRS, ...).
    """
    zones = {name: z for name, z in (record.get("zones") or {}).items() if not z.get("empty")}
    if zones:
        return zones
    cube = record.get("cube")
    return {"": {"prefix": "", **cube}} if cube else {}


# config keys (or sections) whose values a stage's outputs depend on
CAE_KEYS = (
    "embed.model",
    "embed.bands",
    "embed.weights",
    "embed.head",
    "embed.embedding_dim",
    "embed.dense_units",
    "embed.reflectance_max",
    "embed.train",
    "patches.size",
    "seed",
)


UNET_KEYS = (
    "segment.model",
    "segment.encoder",
    "segment.weights",
    "segment.bands",
    "segment.reflectance_max",
    "segment.labels",
    "segment.positive_classes",
    "segment.window",
    "segment.train",
    "seed",
)


class Stage(NamedTuple):
    """One row of :data:`STAGE_TABLE`: everything the package says about a stage, in one place."""

    name: str
    reads: tuple[str, ...]  # the stages whose outputs it reads (``--force`` redoes their dependents)
    group: str | None  # the product group it writes in the store (per zone), if any
    settings: tuple[str, ...]  # config keys or sections its outputs depend on (a change redoes it)
    model: bool  # trains or applies a model (TensorFlow, unless runtime.engine spares it)
    files: tuple[str, ...]  # what it writes in OUT besides the store (fnmatch patterns, relative)
    summary: str  # what it does, in a line


# the pipeline's stages, in the order a run executes them: the runner, the CLI, preflight,
# ``inspect``, the report and the output-folder bookkeeping read them from here
STAGE_TABLE: tuple[Stage, ...] = (
    Stage(
        "search",
        (),
        None,
        ("search",),
        False,
        ("items.json",),
        "STAC search: the items of the region and dates",
    ),
    Stage(
        "cube",
        ("search",),
        "cube",
        ("cube",),
        False,
        (),
        "cloud-masked median composite, chunked, per UTM zone",
    ),
    Stage(
        "patches",
        ("cube",),
        "patches",
        ("patches",),
        False,
        (),
        "the patch grid and each patch's valid fraction",
    ),
    Stage(
        "cae",
        ("patches",),
        None,
        CAE_KEYS,
        True,
        ("models/cae.*", "models/encoder.*"),
        "trains the convolutional autoencoder (or takes embed.model)",
    ),
    Stage(
        "embeddings", ("cae",), "embeddings", ("embed",), True, (), "one embedding a patch (the CAE encoder)"
    ),
    Stage(
        "clusters",
        ("embeddings",),
        "clusters",
        ("cluster", "seed"),
        False,
        (),
        "streaming k-means, then DEC: a cluster and soft assignments a patch",
    ),
    Stage(
        "unet",
        ("cube",),
        None,
        UNET_KEYS,
        True,
        ("models/unet.*",),
        "trains the U-Net (or takes segment.model)",
    ),
    Stage(
        "segmentation",
        ("unet",),
        "segmentation",
        ("segment",),
        True,
        (),
        "agricultural-land probability and mask, overlapping windows blended",
    ),
    Stage(
        "publish",
        ("clusters", "segmentation"),
        None,
        ("publish",),
        False,
        (
            "report.html",
            "quicklook*.png",
            "cog/*cluster_map.tif",
            "cog/*probability.tif",
            "cog/*mask.tif",
            "cog/*cluster_map.vrt",
            "cog/*probability.vrt",
            "cog/*mask.vrt",
            "cog/*cluster_map/*.tif",
            "cog/*probability/*.tif",
            "cog/*mask/*.tif",
            "clusters/*.png",
            "clusters/*.csv",
            "clusters/*/*.png",
            "clusters/*/*.csv",
            "stac/*.json",
            "stac/*/*.json",
            "vector/*fields.parquet",
        ),
        "COGs, maps, cluster report, field polygons, STAC and the report",
    ),
)
STAGES = tuple(s.name for s in STAGE_TABLE)
# the stages whose tasks train or apply a model on the workers
MODEL_STAGES = frozenset(s.name for s in STAGE_TABLE if s.model)
# what each stage reads
DEPENDS: dict[str, tuple[str, ...]] = {s.name: s.reads for s in STAGE_TABLE}
# the product group a stage writes (per zone)
GROUPS = {s.name: s.group for s in STAGE_TABLE if s.group}
# config keys (or sections) whose values each stage's outputs depend on
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {s.name: s.settings for s in STAGE_TABLE}
# the files stages write in OUT (fnmatch, relative): see pipeline.outdir.OUTPUT_PATTERNS
STAGE_FILES = tuple(pattern for s in STAGE_TABLE for pattern in s.files)


_PACKAGES = [
    "agriland-scale",
    "numpy",
    "xarray",
    "rioxarray",
    "dask",
    "distributed",
    "zarr",
    "pystac-client",
    "odc-stac",
    "tensorflow-cpu",
    "tensorflow",
    "keras",
    "scikit-learn",
    "rasterio",
    "rustac",
]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out
