"""Typed run configuration, loaded from a pipeline YAML file.

One tree of frozen pydantic models; unknown keys and wrong types are refused with a
:class:`~agriland_scale.errors.ConfigError` that names the key path, the value found and
what is accepted. Defaults reproduce the seed method (see ``DESIGN.md`` §1) wherever that is
affordable; the demo pipeline shortens the training schedules and says so.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import reprlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, CorruptInput, RegionError

__all__ = [
    "CAETrainConfig",
    "ClusterConfig",
    "CubeConfig",
    "DECConfig",
    "EmbedConfig",
    "PatchConfig",
    "RunConfig",
    "RuntimeConfig",
    "SearchConfig",
    "SegmentConfig",
    "UNetTrainConfig",
    "check_bbox",
    "check_input_files",
    "load_config",
    "resolve_path",
]

# a pipeline file is a few KiB of YAML: refuse what cannot be one before parsing it
MAX_PIPELINE_BYTES = 1 << 20
# values (scalars, lists, mappings) a pipeline file or an override may expand to, aliases
# followed: a few nested YAML aliases ("billion laughs") expand to billions otherwise
MAX_PIPELINE_VALUES = 100_000
# flow collections ([...], {...}) nested deeper than this are refused before parsing (PyYAML's
# scanner slows down with the square of the depth); a pipeline file nests three or four
MAX_FLOW_DEPTH = 64
# at most this many characters of a value found are echoed in a message
_SHOW = 100
# at most this many validation errors are listed
_MAX_ERRORS = 20
_REFERENCE = "see the README's pipeline-file reference"

_repr = reprlib.Repr()  # bounded work and length whatever the value's size
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = _SHOW + 20
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = _repr.maxarray = 8
_repr.maxdict = 5
_repr.maxlong = 40


def _cut(text: str, limit: int = _SHOW) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any, limit: int = _SHOW) -> str:
    """repr of ``value`` in at most ``limit`` characters (never builds a huge repr)."""
    try:
        return _cut(_repr.repr(value), limit)
    except Exception:  # noqa: BLE001 - e.g. an int too large to convert: name its type only
        return f"<{type(value).__name__}>"


def _children_of_node(node: yaml.Node) -> Iterable[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return ()


def _children_of_value(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        return [v for pair in value.items() for v in pair]
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    return ()


class _Cyclic(Exception):
    pass


def _expanded_size(root: Any, children: Callable[[Any], Iterable[Any]], limit: int) -> tuple[int, int]:
    """(values ``root`` expands to when shared parts are copied, capped at ``limit + 1``;
    distinct values). Memoised over the object graph: linear in distinct values, never in
    the expanded size. Raises :class:`_Cyclic` for a structure that contains itself."""
    memo: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        obj, done = stack.pop()
        key = id(obj)
        if done:
            memo[key] = min(limit + 1, 1 + sum(memo[id(c)] for c in children(obj)))
            visiting.discard(key)
            continue
        if key in memo:
            continue
        if key in visiting:  # reached again from inside itself
            raise _Cyclic
        visiting.add(key)
        stack.append((obj, True))
        stack.extend((c, False) for c in children(obj) if id(c) not in memo)
    return memo[id(root)], len(memo)


def _canonical_bands(v: list[str]) -> list[str]:
    from .items import canonical_band

    out = [canonical_band(b) for b in v]
    if len(set(out)) != len(out):
        twice = sorted(b for b, n in Counter(out).items() if n > 1)
        raise ValueError(f"bands {_short(v)} name a band twice ({_short(twice)}): list each band once")
    return out


# Sentinel-2 band names: common names (red) or band ids (B04), stored as common names
Bands = Annotated[list[str], AfterValidator(_canonical_bands)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchConfig(_Model):
    """Where and what to search.

    ``api`` is a STAC API URL, or ``local`` to serve the ``catalog`` folder (a
    ``collection.json`` plus ``item*.json`` files) on 127.0.0.1 for the run's duration.
    The region is either ``bbox`` (min lon, min lat, max lon, max lat) in degrees,
    EPSG:4326, or ``region``: a GeoJSON / GeoPackage / GeoParquet file of polygons in any
    CRS (searched with ``intersects``; pixels outside the polygons are nodata).
    ``sign``: ``planetary-computer`` signs asset hrefs with the ``planetary-computer``
    package (``pip install agriland-scale[pc]``).
    """

    api: str = "local"
    catalog: str | None = None
    collections: list[str] = Field(min_length=1)
    bbox: tuple[float, float, float, float] | None = None
    region: str | None = None
    sign: Literal["none", "planetary-computer"] = "none"
    datetime: str | None = None
    max_cloud_cover: float | None = Field(default=None, ge=0, le=100)
    limit: int = Field(default=100, ge=1)

    @field_validator("bbox", mode="before")
    @classmethod
    def _four_numbers(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) != 4:
            raise ValueError(f"bbox must have 4 numbers (min lon, min lat, max lon, max lat), got "
                             f"{len(v)}: {_short(list(v))}")
        return v

    @field_validator("bbox")
    @classmethod
    def _check_bbox(cls, v: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if v is not None:
            check_bbox(v)
        return v

    @model_validator(mode="after")
    def _local_needs_catalog(self) -> SearchConfig:
        if (self.bbox is None) == (self.region is None):
            raise ValueError("give exactly one of search.bbox (lon/lat) and search.region "
                             "(a GeoJSON/GeoParquet file of polygons)")
        if self.api == "local" and not self.catalog:
            raise ValueError("search.api is 'local' but search.catalog is not set: give the folder "
                             "with collection.json and item json files, or an API URL in search.api")
        return self


def _num(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _box(b: Iterable[float]) -> str:
    return "[" + ", ".join(_num(v) for v in b) + "]"


def check_bbox(bbox: tuple[float, float, float, float] | list[float]) -> None:
    """Refuse a lon/lat bbox that is swapped, out of range, or looks projected (metres)."""
    order = "(min lon, min lat, max lon, max lat) in degrees, EPSG:4326"
    try:
        n = len(bbox)
    except TypeError:
        n = -1
    if n != 4:
        raise RegionError(f"bbox must have 4 numbers {order}, got {_short(bbox)}")
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise RegionError(f"bbox {_short(bbox)} must hold 4 numbers {order}") from None
    b = _box((x0, y0, x1, y1))
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise RegionError(f"bbox {b} holds a value that is not a finite number: give 4 numbers {order}")
    if any(abs(v) > 180 for v in (x0, x1)) or any(abs(v) > 90 for v in (y0, y1)):
        raise RegionError(
            f"bbox {b} is outside -180..180 / -90..90: it must be lon/lat degrees "
            "(EPSG:4326) in the order (min lon, min lat, max lon, max lat); projected "
            "coordinates (metres) are not accepted here")
    if x0 == x1 or y0 == y1:
        raise RegionError(f"bbox {b} has min >= max: it has no width or no height; give a box "
                          f"{order} with min < max")
    if x0 > x1 or y0 > y1:
        ylo, yhi = min(y0, y1), max(y0, y1)
        if x0 - x1 > 180:  # swapping would give a box around most of the globe
            parts = [p for p in ((x0, ylo, 180.0, yhi), (-180.0, ylo, x1, yhi)) if p[2] > p[0]]
            runs = " and ".join(_box(p) for p in parts)
            raise RegionError(
                f"bbox {b} has min lon > max lon ({_num(x0)} > {_num(x1)}): it seems to cross the "
                "antimeridian (180 degrees), which is not supported. "
                + (f"Split it in two runs, with bbox {runs}" if len(parts) > 1 else f"Use bbox {runs}")
                + f"; the order is {order}")
        raise RegionError(
            f"bbox {b} has min >= max: the order is (min lon, min lat, max lon, max lat). "
            f"Did you mean {_box((min(x0, x1), ylo, max(x0, x1), yhi))}?")


class CubeConfig(_Model):
    """How scenes become a cube: bands, grid, cloud masking and compositing.

    ``bands`` are Sentinel-2 band names, common (``red``) or ids (``B04``): both resolve to the
    item's asset whatever key its API uses. ``resolution`` is in metres of the items' native
    UTM CRS (20 m / 60 m bands are resampled bilinearly, classes like SCL by nearest);
    ``chunk`` in pixels must be a multiple of the patch stride so that chunks align to patches.

    ``cloud_mask`` chooses the pixel cloud mask: ``auto`` (default) masks with SCL when every
    item carries an SCL asset (L2A) and leaves the items unmasked otherwise (L1C); ``scl``
    requires SCL on every item; ``s2cloudless`` runs the s2cloudless model on the L1C
    top-of-atmosphere bands (``pip install agriland-scale[s2cloudless]``); ``none`` masks
    nodata only. ``true`` / ``false`` of older pipeline files mean ``auto`` / ``none``.

    SCL (L2A): pixels whose ``scl`` class is in ``scl_mask_classes`` are dropped
    (default: 0 no data, 1 saturated/defective, 3 cloud shadow, 8/9 cloud medium/high
    probability, 10 thin cirrus), the mask optionally grown by ``scl_dilation_m`` metres.

    s2cloudless (L1C): the model reads bands B01, B02, B04, B05, B08, B8A, B09, B10, B11 and
    B12 as TOA reflectance (DN / 10000, less the 0.1 offset of processing baseline 04.00)
    averaged onto a grid of ``s2cloudless_resolution`` metres (default 160 m, the
    resolution it was trained at; a whole multiple of ``resolution`` that divides ``chunk``,
    so that one chunk of the cube maps to whole processing pixels). A pixel is cloud where
    its cloud probability (0..1), averaged over a disk of ``s2cloudless_average_over``
    processing pixels radius, exceeds ``s2cloudless_threshold``; the mask is then grown by a
    disk of ``s2cloudless_dilation_size`` processing pixels (0 skips either step). Defaults
    are the s2cloudless ones: 0.4, 4 and 2 (i.e. 640 m and 320 m at 160 m). The mask is
    repeated onto the cube grid. It flags clouds, not their shadows.

    ``composite``: per-pixel median (default), mean, first or last of the clear observations;
    ``clear_count`` keeps how many there were. ``on_bad_asset``: ``fail`` on an asset that
    cannot be read, or ``skip`` its item with a warning (recorded in run.json).
    """

    bands: Bands = Field(default_factory=lambda: ["red", "green", "blue", "nir"], min_length=1)
    resolution: float = Field(default=10.0, gt=0)
    chunk: int = Field(default=256, ge=64)
    composite: Literal["median", "mean", "first", "last"] = "median"
    cloud_mask: Literal["auto", "scl", "s2cloudless", "none"] = "auto"
    scl_band: str = "scl"
    scl_mask_classes: list[int] = Field(default_factory=lambda: [0, 1, 3, 8, 9, 10])
    scl_dilation_m: float = Field(default=0.0, ge=0)
    s2cloudless_threshold: float = Field(default=0.4, gt=0, lt=1)
    s2cloudless_average_over: int = Field(default=4, ge=0)
    s2cloudless_dilation_size: int = Field(default=2, ge=0)
    s2cloudless_resolution: float = Field(default=160.0, gt=0)
    check_assets: bool = True
    on_bad_asset: Literal["fail", "skip"] = "fail"
    mosaic_crs: str | None = None
    mosaic_resolution: float | None = Field(default=None, gt=0)

    @field_validator("cloud_mask", mode="before")
    @classmethod
    def _cloud_mask_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pipeline files written before the masks had names
            return "auto" if v else "none"
        return v

    @model_validator(mode="after")
    def _s2cloudless_grid(self) -> CubeConfig:
        if self.cloud_mask != "s2cloudless":
            return self
        factor = self.s2cloudless_resolution / self.resolution
        k = round(factor)
        if k < 1 or abs(factor - k) > 1e-6 or self.chunk % k:
            fits = [self.resolution * d for d in range(1, self.chunk + 1) if self.chunk % d == 0]
            near = sorted(fits, key=lambda r: abs(r - self.s2cloudless_resolution))[:3]
            raise ValueError(
                f"cube.s2cloudless_resolution ({self.s2cloudless_resolution:g} m) must be a whole "
                f"multiple of cube.resolution ({self.resolution:g} m) that divides cube.chunk "
                f"({self.chunk} px), so that each chunk maps to whole processing pixels: try "
                f"{near[0]:g} m" + (f" (or {', '.join(f'{r:g}' for r in near[1:])} m)" if near[1:] else ""))
        return self


class PatchConfig(_Model):
    """The patch grid: ``size`` and ``stride`` in pixels (stride <= size)."""

    size: int = Field(default=256, ge=32)
    stride: int = Field(default=256, ge=1)
    min_valid_fraction: float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _stride(self) -> PatchConfig:
        if self.stride > self.size:
            raise ValueError(f"patches.stride ({self.stride}) must be <= patches.size ({self.size})")
        return self


class CAETrainConfig(_Model):
    """Self-supervised CAE training schedule (seed: 200 epochs x 20 steps, batch 16, Adam 1e-3)."""

    epochs: int = Field(default=200, ge=0)
    steps_per_epoch: int = Field(default=20, ge=1)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    augment: bool = True


class EmbedConfig(_Model):
    """The CAE encoder: bands it reads, weights, head and batching.

    ``weights``: ``imagenet`` (Keras cache, needs network once), a path to a ``.keras`` or
    ``.weights.h5`` file, or ``none``. ``head``: ``flatten`` is the seed's
    Flatten(8x8x2048) -> Dense 4096 -> Dense 100 (~537 M weights); ``gap`` replaces the Flatten
    by global average pooling (2048 -> 4096 -> 100, ~9 M weights in the head).
    ``reflectance_max`` maps reflectance [0, reflectance_max] to model input [0, 1].
    ``model``: an encoder trained before (``models/encoder.keras`` of ``agriland train-cae``
    or of another run): the CAE is then not trained, and its bands, normalisation and patch
    size must match. ``mixed_precision``: embed in float16 with float32 weights when the
    cluster's workers advertise a ``GPU`` resource (ignored on CPU workers, where float16 is
    slower); embeddings stay float32 on disk.
    """

    model: str | None = None
    bands: Bands = Field(default_factory=lambda: ["red", "green", "blue"], min_length=1)
    weights: str = "imagenet"
    head: Literal["flatten", "gap"] = "flatten"
    embedding_dim: int = Field(default=100, ge=2)
    dense_units: int = Field(default=4096, ge=8)
    reflectance_max: float = Field(default=0.3, gt=0)
    batch_size: int = Field(default=16, ge=1)
    mixed_precision: bool = False
    train: CAETrainConfig = CAETrainConfig()


class DECConfig(_Model):
    """DEC refinement (Xie et al. 2016): SGD lr 0.01 momentum 0.9, alpha 1, tol 0.1 %."""

    max_iter: int = Field(default=10_000, ge=0)
    update_interval: int = Field(default=100, ge=1)
    tol: float = Field(default=0.001, ge=0)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    alpha: float = Field(default=1.0, gt=0)


class ClusterConfig(_Model):
    """Initial k-means (MiniBatchKMeans) and DEC refinement.

    Both stream the stored embeddings: k-means restarts and DEC run on a seeded sample of at
    most ``sample_size`` patches, k-means is refined with ``partial_fit`` over every patch, and
    every patch is then assigned (memory: one chunk of embeddings plus the sample).
    """

    k: int = Field(default=100, ge=2)
    sample_size: int = Field(default=10_000, ge=16)
    n_init: int = Field(default=20, ge=1)
    kmeans_batch_size: int = Field(default=1024, ge=16)
    dec: DECConfig = DECConfig()


class UNetTrainConfig(_Model):
    """U-Net training (seed: BCE, Adam 1e-4, batch 16, 50 epochs, patience 9, x15 augment).

    ``loss``: ``bce`` (binary cross-entropy, the seed's), ``dice`` (soft Dice) or ``bce+dice``;
    all over labelled pixels only.
    """

    epochs: int = Field(default=50, ge=0)
    loss: Literal["bce", "dice", "bce+dice"] = "bce"
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0)
    augment_factor: int = Field(default=15, ge=0)
    patience: int = Field(default=9, ge=1)
    validation: Literal["east", "west", "north", "south"] = "east"
    validation_fraction: float = Field(default=0.25, gt=0, lt=1)


class SegmentConfig(_Model):
    """U-Net segmentation: encoder, weights, labels, windows and threshold.

    ``labels``: a GeoJSON file of polygons with a ``class`` property (``arable`` = 1, anything
    else = 0; pixels outside every polygon are ignored in training). ``window`` and
    ``overlap`` are in pixels; windows are blended with a smooth weight. ``model``: a U-Net
    trained before (``agriland train-unet`` or another run): no training then, and labels
    are optional.
    """

    model: str | None = None
    encoder: Literal["plain", "resnet50", "inceptionv3"] = "inceptionv3"
    weights: str = "imagenet"
    bands: Bands = Field(default_factory=lambda: ["red", "green", "blue"], min_length=1)
    reflectance_max: float = Field(default=0.3, gt=0)
    labels: str | None = None
    positive_classes: list[str] = Field(default_factory=lambda: ["arable"])
    window: int = Field(default=256, ge=32)
    overlap: int = Field(default=64, ge=0)
    threshold: float = Field(default=0.5, gt=0, lt=1)
    batch_size: int = Field(default=8, ge=1)
    # field polygons from the mask as GeoParquet (DIR/vector/fields.parquet); smaller ones dropped
    vectorize: bool = False
    min_field_area_m2: float = Field(default=0.0, ge=0)
    train: UNetTrainConfig = UNetTrainConfig()

    @model_validator(mode="after")
    def _overlap(self) -> SegmentConfig:
        if self.overlap >= self.window // 2:
            raise ValueError(f"segment.overlap ({self.overlap}) must be less than half the window "
                             f"({self.window}); try {self.window // 4}")
        return self


class RuntimeConfig(_Model):
    """Dask runtime: a LocalCluster by default, or an existing scheduler's address.

    ``dashboard_address``: where the LocalCluster's dashboard listens, on the loopback
    interface by default (reach a remote one with ``ssh -L 8787:127.0.0.1:8787 HOST``);
    ``":8787"`` opens it to the network on purpose.
    """

    scheduler: str | None = None
    n_workers: int = Field(default=1, ge=1)
    threads_per_worker: int = Field(default=2, ge=1)
    memory_limit: str = "12GiB"
    dashboard_address: str = "127.0.0.1:8787"


class RunConfig(_Model):
    """A whole run: one pipeline file."""

    name: str = "agriland-run"
    seed: int = 0
    search: SearchConfig
    cube: CubeConfig = CubeConfig()
    patches: PatchConfig = PatchConfig()
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    segment: SegmentConfig = SegmentConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        for section in ("embed", "segment"):
            missing = [b for b in getattr(self, section).bands if b not in self.cube.bands]
            if missing:
                raise ValueError(f"{section}.bands {_short(missing)} are not in cube.bands "
                                 f"{_short(self.cube.bands)}: add them to cube.bands")
        if self.cube.chunk % self.patches.stride:
            raise ValueError(f"cube.chunk ({self.cube.chunk}) must be a multiple of "
                             f"patches.stride ({self.patches.stride}) so chunks align to patches")
        return self

    def with_overrides(self, **changes: Any) -> RunConfig:
        """Return a copy with dotted-key overrides, e.g. ``{"embed.train.epochs": 1}``.

        Raises :class:`ConfigError` naming the key for an unknown key, or for a value that
        makes the configuration invalid.
        """
        return _apply_overrides(self, changes)


def _did_you_mean(word: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _apply_overrides(cfg: RunConfig, changes: dict[str, Any], source: str | None = None) -> RunConfig:
    data = cfg.model_dump()
    for dotted, value in changes.items():
        key = _cut(str(dotted))
        parts = str(dotted).split(".")
        node: Any = data
        for i, part in enumerate(parts):
            where = ".".join(parts[:i])
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override '{key}': '{_cut(where)}' is a value ({_short(node)}), not a section with "
                    f"keys: set it whole, e.g. '{_cut(where)}=VALUE' ({_REFERENCE})")
            if part not in node:
                level = f"in section '{_cut(where)}'" if where else "at the top level"
                raise ConfigError(
                    f"override '{key}': no such key '{_cut(part, 40)}' {level}"
                    f"{_did_you_mean(part, node)}; valid keys there: {', '.join(sorted(node))}")
            if i < len(parts) - 1:
                node = node[part]
        try:
            size, _ = _expanded_size(value, _children_of_value, MAX_PIPELINE_VALUES)
        except _Cyclic:
            raise ConfigError(f"override '{key}': its value contains itself: give a plain value") from None
        if size > MAX_PIPELINE_VALUES:
            raise ConfigError(f"override '{key}': its value expands to more than {MAX_PIPELINE_VALUES:,} "
                              f"values: give a plain value ({_REFERENCE})")
        node[parts[-1]] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        keys = ", ".join(_cut(str(k)) for k in changes)
        head = f"invalid override {keys}" + (f" of {source}" if source else "") + ":"
        raise ConfigError(_format_errors(e, header=head)) from None


def _section_keys(loc: tuple) -> list[str]:
    """Keys accepted in the section at ``loc`` (a pydantic error location), if it is one."""
    model: Any = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str = "", *, header: str | None = None) -> str:
    """One line per error (at most ``_MAX_ERRORS``), each naming the key; values echoed are
    cut to about ``_SHOW`` characters."""
    lines = [header or f"invalid pipeline file {source}:"]
    errors = err.errors(include_url=False)
    for e in errors[:_MAX_ERRORS]:
        loc = tuple(e["loc"])
        path = _cut(".".join(_cut(str(p), 40) for p in loc)) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = _did_you_mean(str(loc[-1]), _section_keys(loc[:-1])) if loc else ""
            lines.append(f"  - unknown key '{path}'{hint}: remove it or check its spelling ({_REFERENCE})")
        elif e["type"] == "missing":
            lines.append(f"  - {path}: missing: add it ({_REFERENCE})")
        else:
            msg = _cut(e["msg"].removeprefix("Value error, "), 400)
            found = e.get("input")
            # a section's own check (its message names the values) gets the section as input
            lines.append(f"  - {path}: {msg}"
                         + ("" if isinstance(found, dict) else f" (found {_short(found)})"))
    if len(errors) > _MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - _MAX_ERRORS} more errors: fix the ones above first")
    return "\n".join(lines)


def _read_pipeline_text(path: Path) -> str:
    """The text of a pipeline file, refusing folders, huge files and binary files."""
    if path.is_dir():
        raise ConfigError(f"pipeline file {path} is a folder: give the path of a pipeline YAML file "
                          "(e.g. pipelines/demo.yaml)")
    try:
        with open(path, "rb") as f:  # bounded read: also safe on a device or a huge file
            data = f.read(MAX_PIPELINE_BYTES + 1)
            size = max(len(data), path.stat().st_size) if path.is_file() else len(data)
    except FileNotFoundError:
        raise ConfigError(f"pipeline file {path} does not exist: check the path "
                          "(agriland_scale/data/demo.yaml is an example pipeline file)") from None
    except OSError as e:
        raise ConfigError(f"cannot read pipeline file {path} ({e.strerror or type(e).__name__}): "
                          "check its permissions") from None
    if size > MAX_PIPELINE_BYTES:
        mb = "more than 1" if size == MAX_PIPELINE_BYTES + 1 else f"{size / 2**20:.1f}"
        raise ConfigError(f"pipeline file {path} is {mb} MiB: a pipeline file is a few KiB of YAML "
                          f"and at most {MAX_PIPELINE_BYTES // 2**20} MiB is read; check that this is "
                          "the right file")
    try:
        text = data.decode("utf-8-sig")
        if "\x00" in text:
            raise ValueError("NUL byte")
    except ValueError:  # UnicodeDecodeError too
        raise ConfigError(f"pipeline file {path} is not a text YAML file (it holds bytes that are not "
                          "UTF-8 text): give the pipeline's .yaml file, saved as UTF-8 text") from None
    return text


def _flow_depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` in ``text`` (an upper bound: quoted ones count too)."""
    depth = deepest = 0
    for c in re.sub(r"[^\[\]{}]+", "", text):
        depth = depth + 1 if c in "[{" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest


def _parse_yaml(text: str, path: Path) -> Any:
    """Safe-load YAML, refusing aliases that expand to more than ``MAX_PIPELINE_VALUES``."""
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise ConfigError(f"pipeline file {path} nests [lists] or {{mappings}} more than {MAX_FLOW_DEPTH} "
                          f"deep: a pipeline file has sections of keys ({_REFERENCE})")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()  # composed: aliases are shared nodes, still cheap
        if node is None:
            return None
        try:
            size, distinct = _expanded_size(node, _children_of_node, MAX_PIPELINE_VALUES)
        except _Cyclic:
            raise ConfigError(f"pipeline file {path} uses a YAML alias inside its own anchor (a structure "
                              "that contains itself): remove that alias") from None
        if size > MAX_PIPELINE_VALUES:
            what = ("uses YAML aliases that expand to" if distinct <= MAX_PIPELINE_VALUES else "holds")
            raise ConfigError(f"pipeline file {path} {what} more than {MAX_PIPELINE_VALUES:,} values: a "
                              "pipeline needs a few dozen; write the values out, or share only small "
                              "parts with anchors (&name) and aliases (*name)")
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline file {path} is not valid YAML: {_cut(str(e), 600)}") from None
    except RecursionError:
        raise ConfigError(f"pipeline file {path} nests lists or mappings too deeply: a pipeline "
                          f"file has sections of keys ({_REFERENCE})") from None
    except (ValueError, TypeError, OverflowError) as e:  # a scalar the constructor cannot build
        raise ConfigError(f"pipeline file {path} holds a value YAML cannot read ({_cut(str(e))}): "
                          "fix or quote it") from None
    finally:
        loader.dispose()


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Load and validate a pipeline YAML file.

    Relative paths in ``search.catalog`` and ``segment.labels`` are resolved against the
    file's folder; ``builtin:NAME`` points at data shipped inside the package. Files over
    1 MiB, binary files and YAML aliases expanding to more than 100,000 values are refused.
    """
    path = Path(path)
    raw = _parse_yaml(_read_pipeline_text(path), path)
    if not isinstance(raw, dict):
        found = "is empty" if raw is None else f"holds a {type(raw).__name__}, not a mapping"
        raise ConfigError(f"pipeline file {path} {found}: it must hold a mapping of sections "
                          f"(search, cube, ...) ({_REFERENCE}; agriland_scale/data/demo.yaml is an example)")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None
    if overrides:
        cfg = _apply_overrides(cfg, overrides, f"pipeline file {path}")
    resolved = _resolved_paths(cfg, path.parent)
    return cfg.with_overrides(**resolved) if resolved else cfg


def resolve_path(value: str, base: Path) -> Path:
    """Resolve ``builtin:NAME`` (package data) or a path relative to ``base``."""
    if value.startswith("builtin:"):
        return Path(__file__).parent / "data" / value.removeprefix("builtin:")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _resolved_paths(cfg: RunConfig, base: Path) -> dict[str, str]:
    out = {}
    for key, value in (("search.catalog", cfg.search.catalog), ("search.region", cfg.search.region)):
        if value and not value.startswith("builtin:"):
            r = str(resolve_path(value, base))
            if r != value:
                out[key] = r
    for key, value in (("segment.labels", cfg.segment.labels), ("embed.weights", cfg.embed.weights),
                       ("segment.weights", cfg.segment.weights), ("embed.model", cfg.embed.model),
                       ("segment.model", cfg.segment.model)):
        if value and value not in ("imagenet", "none") and not value.startswith("builtin:"):
            r = str(resolve_path(value, base))
            if r != value:
                out[key] = r
    return out


def _is_url(value: str) -> bool:
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
        raise CorruptInput(f"{key}: cannot read {what} {p} ({e.strerror or type(e).__name__}): "
                           "check its permissions") from None
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
    from .region import read_region_file

    def reads(*names: str) -> bool:
        return stages is None or bool(stages & set(names))

    s = cfg.search
    if reads("search", "cube") and s.api == "local" and s.catalog and not _is_url(s.catalog):
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
            raise CorruptInput(f"search.catalog: {coll} is not a STAC collection JSON ({_cut(str(e))}): "
                               "fix or replace it") from None
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
        if section.model and not _is_url(section.model):
            fix = (f"give the .keras file written by '{trained_by}' (a run's models/"
                   f"{'encoder' if name == 'embed' else 'unet'}.keras), or remove {name}.model to train one")
            p = _local_file(f"{name}.model", section.model, "model file", fix)
            side = Path(str(p) + ".json")
            if not side.is_file():
                raise CorruptInput(f"{name}.model: model {p} has no metadata sidecar {side}: it was not "
                                   f"saved by agriland-scale; retrain it with '{trained_by}' or write "
                                   "the sidecar")
        elif (section.weights not in ("imagenet", "none") and not _is_url(section.weights)
              and reads("cae" if name == "embed" else "unet")):
            # initial weights of a model trained by the run (not read when a model is given)
            _local_file(f"{name}.weights", section.weights, "weights file",
                        "give a .keras or .weights.h5 file, 'imagenet' or 'none'")
    if cfg.segment.labels and not _is_url(cfg.segment.labels) and reads("unet", "segmentation"):
        _local_file("segment.labels", cfg.segment.labels, "labels file",
                    "give a GeoJSON of polygons with a 'class' property, a .tif label mask or a VIA "
                    "project JSON, or remove segment.labels when segment.model is set")
