"""The local files a pipeline names (catalog, region, labels, models, weights), checked early.

:func:`check_input_files` runs before a run locks or changes anything (and in
``agriland validate``), so a wrong path fails in a second, not after an hour of compute.
"""

from __future__ import annotations

import json
from pathlib import Path

from agriland_scale.config.checks import cut
from agriland_scale.config.region import read_region_file
from agriland_scale.config.schema import RunConfig
from agriland_scale.errors import ConfigError, CorruptInput, RegionError

__all__ = ["check_input_files", "resolve_path"]

# package data named by ``builtin:NAME``
DATA = Path(__file__).resolve().parent.parent / "data"


def resolve_path(value: str, base: Path) -> Path:
    """Resolve ``builtin:NAME`` (package data) or a path relative to ``base``."""
    if value.startswith("builtin:"):
        return DATA / value.removeprefix("builtin:")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def is_url(value: str) -> bool:
    return "://" in value


def _local_file(key: str, value: str, what: str, fix: str) -> Path:
    """``value`` resolved; refuse it unless it is a readable file."""
    p = resolve_path(value, Path.cwd())
    if not p.exists():
        raise ConfigError(f"{key}: {what} {p} does not exist: {fix}")
    if p.is_dir():
        raise ConfigError(f"{key}: {what} {p} is a folder, not a file: {fix}")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise CorruptInput(
            f"{key}: cannot read {what} {p} ({e.strerror or type(e).__name__}): check its permissions"
        ) from None
    return p


def check_input_files(cfg: RunConfig, stages: set[str] | None = None) -> None:
    """Check the local files a run will read, without network and without loading pixels.

    ``search.catalog`` (``api: local``: a folder with ``collection.json`` and ``item*.json``),
    ``search.region`` (a readable file of polygons), ``embed.model`` / ``segment.model`` (a
    model file and its ``.json`` metadata sidecar; URLs are skipped), ``embed.weights`` /
    ``segment.weights`` (a file unless ``imagenet`` or ``none``) and ``segment.labels``.
    Relative paths are read from the current folder (:func:`load_config` has made those of
    a pipeline file absolute). Raises :class:`ConfigError` (a file named is missing),
    :class:`CorruptInput` (it cannot be read) or :class:`RegionError`, each naming the key,
    the path and what to do.

    ``stages``: check only what these stages read (the catalogue and region for ``search`` /
    ``cube``, models and weights for ``cae``/``embeddings``/``unet``/``segmentation``, labels
    for ``unet``/``segmentation``), so that a resumed run is not refused for a file that
    only a finished stage needed; ``None`` checks everything (``agriland validate``).
    """

    def reads(*names: str) -> bool:
        return stages is None or bool(stages & set(names))

    s = cfg.search
    if reads("search", "cube") and s.api == "local" and s.catalog and not is_url(s.catalog):
        cat = resolve_path(s.catalog, Path.cwd())
        what = "give the folder that holds the STAC collection.json and its item*.json files"
        if not cat.exists():
            raise ConfigError(f"search.catalog: folder {cat} does not exist: {what}")
        if not cat.is_dir():
            hint = f" (here: {cat.parent})" if cat.name == "collection.json" else ""
            raise ConfigError(f"search.catalog: {cat} is a file, not a folder: {what}{hint}")
        coll = cat / "collection.json"
        if not coll.is_file():
            raise ConfigError(f"search.catalog: folder {cat} has no collection.json: {what}")
        try:
            if coll.stat().st_size <= 16 * 2**20 and not isinstance(json.loads(coll.read_bytes()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError too
            raise CorruptInput(
                f"search.catalog: {coll} is not a STAC collection JSON ({cut(str(e))}): fix or replace it"
            ) from None
        if next(cat.glob("item*.json"), None) is None:
            raise ConfigError(f"search.catalog: folder {cat} holds no item*.json files: {what}")
    if s.region and reads("search", "cube"):
        try:
            read_region_file(resolve_path(s.region, Path.cwd()))
        except (RegionError, CorruptInput) as e:
            raise type(e)(str(e) if "search.region" in str(e) else f"search.region: {e}") from None
    for section in (cfg.embed, cfg.segment):
        name = "embed" if section is cfg.embed else "segment"
        if not (reads("cae", "embeddings") if name == "embed" else reads("unet", "segmentation")):
            continue
        trained_by = "agriland train-cae" if name == "embed" else "agriland train-unet"
        if section.model and not is_url(section.model):
            fix = (
                f"give the .keras file written by '{trained_by}' (a run's models/"
                f"{'encoder' if name == 'embed' else 'unet'}.keras), or remove {name}.model to train one"
            )
            p = _local_file(f"{name}.model", section.model, "model file", fix)
            side = Path(str(p) + ".json")
            if not side.is_file():
                raise CorruptInput(
                    f"{name}.model: model {p} has no metadata sidecar {side}: it was not "
                    f"saved by agriland-scale; retrain it with '{trained_by}' or write "
                    "the sidecar"
                )
        elif (
            section.weights not in ("imagenet", "none")
            and not is_url(section.weights)
            and reads("cae" if name == "embed" else "unet")
        ):
            # initial weights of a model trained by the run (not read when a model is given)
            _local_file(
                f"{name}.weights",
                section.weights,
                "weights file",
                "give a .keras or .weights.h5 file, 'imagenet' or 'none'",
            )
    if cfg.segment.labels and not is_url(cfg.segment.labels) and reads("unet", "segmentation"):
        _local_file(
            "segment.labels",
            cfg.segment.labels,
            "labels file",
            "give a GeoJSON of polygons with a 'class' property, a .tif label mask or a VIA "
            "project JSON, or remove segment.labels when segment.model is set",
        )
