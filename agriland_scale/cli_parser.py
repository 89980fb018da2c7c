"""The ``agriland`` command's argument parser.

Every subcommand with a description, examples and every argument explained
(``agriland SUBCOMMAND --help``), as rio and stac-client do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agriland_scale import __version__
from agriland_scale.layout import STAGES

__all__ = ["build_parser"]


_RAW = argparse.RawDescriptionHelpFormatter


_EPILOG = """\
examples:
  agriland demo --out demo-out
  agriland run pipelines/demo.yaml --out runs/va -v
  agriland run pipelines/demo.yaml --out runs/va | jq .timings_s
  agriland SUBCOMMAND --help

Results go to stdout (JSON, tables, paths), progress and messages to stderr; -q leaves
errors only there. Exit status: 0 done, 2 an error the message explains, 1 an unexpected
one (rerun with --debug), 130/143 interrupted (rerunning continues where it stopped).

shell completion (optional): pip install argcomplete, then add to ~/.bashrc
  eval "$(register-python-argcomplete agriland)"
(zsh: run `autoload -U bashcompinit && bashcompinit` before it)."""

# subcommand -> (one line for `agriland --help`, description, examples)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": (
        "run the whole pipeline on the embedded demo region (offline)",
        "Run the whole pipeline on the embedded demo region (a Sentinel-2 L1C window in Virginia),\n"
        "offline: a local STAC server, the Zarr cube, 256 px patches, CAE embeddings, k-means + DEC\n"
        "clusters, U-Net probability mosaics, COGs, report.html and STAC. 2 to 3 minutes on 2 CPU\n"
        "cores that compute bfloat16 (AMX, AVX512-BF16), about 4 without. Rerunning the same\n"
        "command continues an unfinished run.",
        "  agriland demo --out demo-out\n  agriland demo --out demo-out --set embed.train.epochs=1 -v",
    ),
    "run": (
        "run a pipeline file (continues an unfinished run in --out)",
        "Run a pipeline file (YAML: search, cube, patches, embed, cluster, segment, runtime) into\n"
        "--out, a folder or an object-storage URL. A run that stopped continues where it stopped;\n"
        "--force STAGE redoes a stage and what depends on it, --until STAGE stops after it. The\n"
        "result (stages, timings, products) is printed as JSON on stdout.",
        "  agriland run pipelines/demo.yaml --out runs/va\n"
        "  agriland run pipelines/earth-search.yaml --out s3://BUCKET/runs/va --until clusters",
    ),
    "train-cae": (
        "train the convolutional autoencoder on a region's patches",
        "Train the convolutional autoencoder (CAE) on a region's patches: the pipeline up to its\n"
        "CAE stage. Prints the encoder's path; embed other regions with it by setting\n"
        "embed.model: PATH in their pipeline files.",
        "  agriland train-cae pipelines/demo.yaml --out runs/cae --set embed.train.epochs=5",
    ),
    "train-unet": (
        "train the U-Net on a region's labels (VIA, GeoJSON, raster)",
        "Train the U-Net on a region's labels (segment.labels: a VIA project, GeoJSON polygons or a\n"
        "raster mask): the pipeline up to its U-Net stage. Prints the model's path and its\n"
        "validation metrics; map other regions with it by setting segment.model: PATH.",
        "  agriland train-unet pipelines/demo.yaml --out runs/unet\n"
        "  agriland train-unet region.yaml --out runs/unet --set segment.labels=runs/va/labels/via_mask.tif",
    ),
    "search": (
        "list what a run would load, without loading pixels",
        "Search the STAC API of a pipeline file and list what a run would load: the items (id, date,\n"
        "cloud cover, tile, EPSG) and, per UTM zone, the grid, how much it reads and the size of\n"
        "the composite. No pixels are read.",
        "  agriland search pipelines/demo.yaml\n"
        "  agriland search pipelines/earth-search.yaml --json | jq '.items[].id'",
    ),
    "plan": (
        "say what a run will do and cost, before it starts (no pixels read)",
        "Say what a run of a pipeline file will do, before it starts: the items, MGRS tiles, UTM\n"
        "zones, the cube's grid and pixels per zone, the patches, the approximate tasks of each\n"
        "stage, the store's size (uncompressed: an upper bound) and a time per stage for N workers.\n"
        "It runs the checks `agriland run` runs first and the STAC search, then only arithmetic on\n"
        "the items' metadata: no pixel is read and no Dask graph built (seconds for 100 tiles).\n"
        "Times come from a throughput per stage: --throughput, else the timings of earlier runs\n"
        "(--measured RUN), else built-in values measured on a 2-core CPU (each names its source).",
        "  agriland plan pipelines/demo.yaml\n"
        "  agriland plan region.yaml --workers 8 --measured runs/va --json | jq .total_s\n"
        "  agriland plan region.yaml --throughput segmentation=400000 --set cube.resolution=20",
    ),
    "validate": (
        "check a pipeline file and name the wrong key",
        "Check a pipeline file: every key and value against the schema, and that the files it\n"
        "names exist. Prints the pipeline's name on stdout; on an error, names the wrong key, the\n"
        "value found and the accepted values (exit 2).",
        "  agriland validate pipelines/earth-search.yaml",
    ),
    "inspect": (
        "summarise a run folder: region, items, products, stages",
        "Summarise a run (a folder or an object-storage URL): its region, items, products and\n"
        "stages with their timings; with --history, the versions of its product store.",
        "  agriland inspect runs/va\n"
        "  agriland inspect s3://BUCKET/runs/va --json | jq .stages\n"
        "  agriland inspect runs/va --history",
    ),
    "export": (
        "copy a run's products to a plain Zarr store (for tools that cannot read Icechunk, e.g. GDAL)",
        "Copy a run's products (the groups of its Icechunk store) to a plain Zarr store that tools\n"
        "without Icechunk open: xarray, GDAL and QGIS (the CRS as GDAL's _CRS and CF's grid_mapping,\n"
        "consolidated metadata). Prints the new store's path on stdout.",
        "  agriland export runs/va --zarr va.zarr\n"
        "  agriland export runs/va --zarr va-v2.zarr --zarr-format 2    # GDAL < 3.11, QGIS 3.22",
    ),
    "report": (
        "(re)write a run's report.html and STAC catalogue",
        "(Re)write a run's report.html and its STAC catalogue (stac/collection.json) from what the\n"
        "run wrote. Prints their paths.",
        "  agriland report runs/va\n  agriland report s3://BUCKET/runs/va",
    ),
    "export-labels": (
        "write the patches of chosen clusters as a VGG Image Annotator project",
        "Write the patches of the clusters you name arable as a VGG Image Annotator 2 project, to\n"
        "draw the fields on (region attribute 'class' = arable / other); then import-labels turns\n"
        "the saved project into a label mask. The cluster ids are in RUN/clusters/stats.csv and the\n"
        "report. Prints the project's path on stdout.",
        "  agriland export-labels runs/va --clusters 3,7\n"
        "  agriland import-labels runs/va/labels/via/via_project.json runs/va",
    ),
    "import-labels": (
        "turn a saved VIA project into a label mask on the cube grid",
        "Turn a saved VGG Image Annotator project (from export-labels) into a label mask on the\n"
        "run's cube grid: a GeoTIFF with 1 agricultural, 0 other, 255 not drawn. Train on it with\n"
        "segment.labels: MASK. Prints the mask's path on stdout.",
        "  agriland import-labels runs/va/labels/via/via_project.json runs/va\n"
        "  agriland train-unet pipelines/demo.yaml --out runs/unet --set segment.labels=runs/va/labels/via_mask.tif",
    ),
    "cluster": (
        "keep a Dask cluster of warm workers for runs (--scheduler ADDRESS)",
        "Start a Dask cluster on this machine whose workers import TensorFlow and the other\n"
        "libraries once (and load a pipeline's given models), and keep it until Ctrl-C. Runs use it\n"
        "with --scheduler ADDRESS (or runtime.scheduler) and skip the workers' start-up.",
        "  agriland cluster pipelines/demo.yaml --port 8786\n"
        "  agriland run pipelines/demo.yaml --out runs/va --scheduler tcp://127.0.0.1:8786",
    ),
}


def _folder_arg(text: str) -> Path:
    """Parse a local folder argument: a path or ``file://`` URL; any other URL is refused."""
    from agriland_scale.errors import OutputError
    from agriland_scale.layout import local_folder

    try:
        return local_folder(text)
    except OutputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_arg(text: str) -> Path | str:
    """Parse where a run lives: a folder (path or ``file://``), or an object-storage URL (kept as is)."""
    from agriland_scale.errors import OutputError
    from agriland_scale.files import check_object_url, is_object_url

    if not is_object_url(text):
        return _folder_arg(text)
    try:
        return check_object_url(text.rstrip("/"))
    except OutputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _scheduler_arg(text: str) -> str:
    """Parse ``--scheduler``: a Dask scheduler's address, refused before anything is written."""
    from agriland_scale.config.checks import check_scheduler_address

    try:
        return check_scheduler_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cluster_ids(text: str) -> list[int]:
    """``3,7`` -> ``[3, 7]`` for ``export-labels --clusters`` (argparse reports the error)."""
    try:
        ids = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r} is not a list of cluster ids: give numbers separated by commas, e.g. "
            "--clusters 3,7 (the ids are in RUN/clusters/stats.csv and the report)"
        ) from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: give one or more cluster ids >= 0, e.g. 3,7")
    return ids


def _global_flags(p: argparse.ArgumentParser, default: object) -> None:
    """``--debug``, ``-q`` and ``-v``: before the subcommand, and after it (``agriland run P.yaml -q``)."""
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="errors only on stderr: no progress, messages or warnings (results still go to stdout)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="also show the run log's lines (INFO) on stderr",
    )


def _run_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        type=_run_arg,
        help="where the run lives: a folder, or s3://BUCKET/PREFIX (gs://, az:// too)",
    )
    p.add_argument(
        "--scheduler",
        type=_scheduler_arg,
        metavar="ADDRESS",
        help="address of an existing Dask scheduler (tcp://host:8786, e.g. from `agriland cluster`)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace another run in --out (deletes only the files that run wrote)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set embed.train.epochs=1; repeatable",
    )
    p.add_argument(
        "--force",
        action="append",
        metavar="STAGE",
        choices=STAGES,
        help=f"redo STAGE and what depends on it ({', '.join(STAGES)}); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the ``agriland`` argument parser.

    Returns
    -------
    argparse.ArgumentParser
        The parser; ``command`` in its result names the subcommand.
    """
    parser = argparse.ArgumentParser(
        prog="agriland",
        formatter_class=_RAW,
        epilog=_EPILOG,
        description="agriland-scale: find agricultural land in Sentinel-2 imagery at region scale\n"
        "(STAC -> Zarr cube -> CAE + DEC clusters -> U-Net mosaics, on Dask).",
    )
    parser.add_argument(
        "-V",
        "--version",
        action="version",
        version=f"agriland-scale {__version__}",
        help="show the version and exit",
    )
    _global_flags(parser, False)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="SUBCOMMAND",
        title="subcommands (agriland SUBCOMMAND --help for each)",
    )
    p = {}
    for name, (summary, description, examples) in _COMMANDS.items():
        p[name] = sub.add_parser(
            name, help=summary, description=description, formatter_class=_RAW, epilog=f"examples:\n{examples}"
        )
    pipeline = "the pipeline file (YAML), e.g. pipelines/demo.yaml"
    run = "the run: a folder, or its object-storage URL (s3://, gs://, az://)"
    _run_opts(p["demo"])
    for name in ("run", "train-cae", "train-unet"):
        p[name].add_argument("pipeline", type=Path, help=pipeline)
        _run_opts(p[name])
    p["run"].add_argument(
        "--until",
        choices=STAGES,
        metavar="STAGE",
        help="stop after STAGE, e.g. clusters (then label them: export-labels)",
    )
    p["search"].add_argument("pipeline", type=Path, help=pipeline)
    p["search"].add_argument("--json", action="store_true", help="print JSON instead of a table")
    p["plan"].add_argument("pipeline", type=Path, help=pipeline)
    p["plan"].add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value as `run` would, e.g. --set cube.resolution=20; repeatable",
    )
    p["plan"].add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="workers the run will have, each like the one that measured the throughput "
        "(default: runtime.n_workers)",
    )
    p["plan"].add_argument(
        "--throughput",
        action="append",
        metavar="STAGE=PX_PER_S",
        help="a stage's throughput for one worker, in its units a second (see --json's stages.*.units), "
        "e.g. segmentation=400000; repeatable",
    )
    p["plan"].add_argument(
        "--measured",
        action="append",
        type=Path,
        metavar="RUN",
        help="an earlier run's folder on this machine: its run.json's timings give the throughput; repeatable",
    )
    p["plan"].add_argument(
        "--scheduler",
        type=_scheduler_arg,
        metavar="ADDRESS",
        help="the Dask scheduler the run will use: checked that it answers, as `run` does",
    )
    p["plan"].add_argument("--json", action="store_true", help="print JSON instead of a table")
    p["validate"].add_argument("pipeline", type=Path, help=pipeline)
    p["inspect"].add_argument("run", type=_run_arg, help=run)
    p["inspect"].add_argument("--json", action="store_true", help="print JSON instead of text")
    p["inspect"].add_argument(
        "--history",
        action="store_true",
        help="list the versions of the products (each change of the store), newest first",
    )
    p["export"].add_argument("run", type=_run_arg, help=run)
    p["export"].add_argument(
        "--zarr",
        required=True,
        type=_folder_arg,
        metavar="DEST",
        help="the new Zarr store, a local folder (must not exist)",
    )
    p["export"].add_argument(
        "--version", help="a version of `agriland inspect RUN --history` (default: latest)"
    )
    p["export"].add_argument(
        "--zarr-format",
        type=int,
        choices=(2, 3),
        default=3,
        help="Zarr format of the copy: 3 (default), or 2 for GDAL older than 3.11",
    )
    p["report"].add_argument("run", type=_run_arg, help=run)
    p["export-labels"].add_argument(
        "run", type=_run_arg, help="a finished run (folder or object-storage URL)"
    )
    p["export-labels"].add_argument(
        "--clusters",
        required=True,
        type=_cluster_ids,
        metavar="IDS",
        help="the ids of the clusters named arable, separated by commas, e.g. 3,7",
    )
    p["export-labels"].add_argument(
        "--out", type=Path, help="folder for the VIA project (default RUN/labels/via)"
    )
    p["export-labels"].add_argument(
        "--overwrite", action="store_true", help="replace a project that already holds drawn regions"
    )
    p["cluster"].add_argument(
        "pipeline",
        type=Path,
        nargs="?",
        help="a pipeline file: take runtime.* from it, and load its given models",
    )
    p["cluster"].add_argument(
        "--port", type=int, default=8786, help="scheduler port on 127.0.0.1 (0: any free port)"
    )
    p["import-labels"].add_argument(
        "via_json", type=Path, help="the saved VIA project (via_project.json of export-labels)"
    )
    p["import-labels"].add_argument("run", type=_run_arg, help=run)
    p["import-labels"].add_argument("--out", type=Path, help="mask GeoTIFF (default RUN/labels/via_mask.tif)")
    for each in sub.choices.values():  # the global flags also after the command: agriland run P.yaml -q
        _global_flags(each, argparse.SUPPRESS)
    return parser
