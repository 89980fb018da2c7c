"""Typed run configuration, loaded from a pipeline YAML file.

One tree of frozen pydantic models; unknown keys and wrong types are refused with a
:class:`~agriland_scale.errors.ConfigError` that names the key path, the value found and
what is accepted. Defaults reproduce the seed method (see ``DESIGN.md`` §1) wherever that is
affordable; the demo pipeline shortens the training schedules and says so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agriland_scale.config.bands import Bands, ReflectanceMax, check_reflectance_max
from agriland_scale.config.base import StrictModel
from agriland_scale.config.checks import (
    MAX_PIPELINE_VALUES,
    REFERENCE,
    Cyclic,
    children_of_value,
    cut,
    did_you_mean,
    expanded_size,
    format_errors,
    short,
)
from agriland_scale.config.region import check_bbox
from agriland_scale.config.runtime import OutputConfig, RuntimeConfig
from agriland_scale.errors import ConfigError

__all__ = [
    "CAETrainConfig",
    "ClusterConfig",
    "CubeConfig",
    "DECConfig",
    "EmbedConfig",
    "OutputConfig",
    "PatchConfig",
    "PublishConfig",
    "RunConfig",
    "RuntimeConfig",
    "SearchConfig",
    "SegmentConfig",
    "UNetTrainConfig",
    "check_bbox",
]


_Model = StrictModel  # every section: unknown keys refused, frozen


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
            raise ValueError(
                f"bbox must have 4 numbers (min lon, min lat, max lon, max lat), got "
                f"{len(v)}: {short(list(v))}"
            )
        return v

    @field_validator("bbox")
    @classmethod
    def _check_bbox(
        cls, v: tuple[float, float, float, float] | None
    ) -> tuple[float, float, float, float] | None:
        if v is not None:
            check_bbox(v)
        return v

    @model_validator(mode="after")
    def _local_needs_catalog(self) -> SearchConfig:
        if (self.bbox is None) == (self.region is None):
            raise ValueError(
                "give exactly one of search.bbox (lon/lat) and search.region "
                "(a GeoJSON/GeoParquet file of polygons)"
            )
        if self.api == "local" and not self.catalog:
            raise ValueError(
                "search.api is 'local' but search.catalog is not set: give the folder "
                "with collection.json and item json files, or an API URL in search.api"
            )
        return self


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

    ``chunk`` (px) is the stored chunk, aligned to the patch grid. ``read_chunk``: the side
    of the chunks the cube is read, masked and composited in (a multiple of ``chunk``);
    ``auto`` (default) takes the largest up to 1024 px whose task holds at most 128 MiB of
    bands x dates (fewer, larger tasks); it is also the cube's unit of resume.

    ``composite``: per-pixel median (default), mean, first or last of the clear observations;
    ``clear_count`` keeps how many there were. ``on_bad_asset``: ``fail`` on an asset that
    cannot be read, or ``skip`` its item with a warning (recorded in run.json).

    ``max_pixels``: the largest grid (pixels a band, a UTM zone) a run builds; a larger one
    is refused before its graph is planned, with its size (default 5e10: about 40 Sentinel-2
    tiles of 110 km at 10 m; a mistaken ``resolution`` of centimetres asks for 10^12 and more).

    ``storage``: how reflectance is stored. ``int16`` (default) packs it in half digital
    numbers (CF ``scale_factor`` = half the bands' DN scale; readers decode it to float32):
    median, first and last composites are exact, a mean is rounded to half a DN (at most
    2.5e-5 reflectance for the usual 1e-4 scale); values are clipped to +-32767 half DNs
    (+-1.638 reflectance). ``float32`` stores the composite as computed. Bands with
    different scales are always stored as float32.
    """

    bands: Bands = Field(default_factory=lambda: ["red", "green", "blue", "nir"], min_length=1)
    resolution: float = Field(default=10.0, gt=0)
    chunk: int = Field(default=256, ge=64)
    read_chunk: Literal["auto"] | int = "auto"
    composite: Literal["median", "mean", "first", "last"] = "median"
    storage: Literal["int16", "float32"] = "int16"
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
    max_pixels: float = Field(default=5e10, gt=0)

    @field_validator("cloud_mask", mode="before")
    @classmethod
    def _cloud_mask_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pipeline files written before the masks had names
            return "auto" if v else "none"
        return v

    @model_validator(mode="after")
    def _read_chunk(self) -> CubeConfig:
        rc = self.read_chunk
        if rc != "auto" and (rc < self.chunk or rc % self.chunk):
            raise ValueError(
                f"cube.read_chunk ({rc}) must be 'auto' or a multiple of cube.chunk ({self.chunk}), "
                f"e.g. {self.chunk} or {4 * self.chunk}"
            )
        return self

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
                f"{near[0]:g} m" + (f" (or {', '.join(f'{r:g}' for r in near[1:])} m)" if near[1:] else "")
            )
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
    ``reflectance_max`` maps reflectance [0, reflectance_max] to model input [0, 1], per band:
    one number for every band, ``auto`` (default: the per-band values of
    :data:`~agriland_scale.config.bands.DEFAULT_REFLECTANCE_MAX`, 0.3 for the visible bands
    as in the seed, 0.5 for NIR, 0.4 / 0.3 for SWIR 1.6 / 2.2 um, from the demo scene's 99.5th
    percentiles), a mapping band -> number (bands left out take those defaults) or a list, one
    number a band in order. ``model``: an encoder trained before (``models/encoder.keras`` of ``agriland train-cae``
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
    reflectance_max: ReflectanceMax = "auto"
    batch_size: int = Field(default=16, ge=1)
    mixed_precision: bool = False
    train: CAETrainConfig = CAETrainConfig()

    @model_validator(mode="after")
    def _reflectance_max(self) -> EmbedConfig:
        check_reflectance_max(self.reflectance_max, self.bands, "embed.reflectance_max")
        return self


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
    are optional. ``reflectance_max``: per band, as for :class:`EmbedConfig`.

    ``threshold``: the probability (0..1) from which a pixel is agricultural in the mask. Not
    set (``null``, the default): the threshold chosen after training on the validation strip
    (the one of 0.05, 0.10 ... 0.95 with the highest IoU, recorded in the model's sidecar, in
    run.json and in the report), or 0.5 for a model whose sidecar has none. A number set here
    wins over it.
    """

    model: str | None = None
    encoder: Literal["plain", "resnet50", "inceptionv3"] = "inceptionv3"
    weights: str = "imagenet"
    bands: Bands = Field(default_factory=lambda: ["red", "green", "blue"], min_length=1)
    reflectance_max: ReflectanceMax = "auto"
    labels: str | None = None
    positive_classes: list[str] = Field(default_factory=lambda: ["arable"])
    window: int = Field(default=256, ge=32)
    overlap: int = Field(default=64, ge=0)
    # windows the U-Net predicts on, px: "auto" picks, per region, the size (a multiple of 32
    # from the training window up to 1024) that predicts the fewest pixels; an int fixes it;
    # null keeps the training window. Larger than ``window`` needs a plain or ResNet-50 U-Net.
    inference_window: Literal["auto"] | int | None = "auto"
    threshold: float | None = Field(default=None, gt=0, lt=1)
    batch_size: int = Field(default=8, ge=1)
    # column bands (px, best a multiple of runtime.block_px) written one after the other: the
    # windows across a band's edge are predicted once a band (a few % more predictions), so
    # that a worker holds the overlapping windows of a band's width, not the region's; 0: none
    band_px: int = Field(default=8192, ge=0)
    # field polygons from the mask as GeoParquet (DIR/vector/fields.parquet); smaller ones dropped
    vectorize: bool = False
    min_field_area_m2: float = Field(default=0.0, ge=0)
    train: UNetTrainConfig = UNetTrainConfig()

    @model_validator(mode="after")
    def _overlap(self) -> SegmentConfig:
        check_reflectance_max(self.reflectance_max, self.bands, "segment.reflectance_max")
        if self.overlap >= self.window // 2:
            raise ValueError(
                f"segment.overlap ({self.overlap}) must be less than half the window "
                f"({self.window}); try {self.window // 4}"
            )
        iw = self.inference_window
        if isinstance(iw, int) and (iw < self.window or iw % 32):
            raise ValueError(
                f"segment.inference_window ({iw}) must be a multiple of 32 and at least "
                f"segment.window ({self.window}): try {max(self.window, 32 * round(iw / 32))}"
            )
        return self


class PublishConfig(_Model):
    """How the publish stage lays out its files at region scale.

    ``tile_px``: a raster product larger than this many pixels a side leaves as one COG per
    output tile of the zone's fixed grid (``tile_px`` a side, from the raster's top-left
    corner; a multiple of the COGs' 512 px blocks) with a GDAL VRT over them
    (``cog/[ZONE_]NAME.vrt``, tiles in ``cog/[ZONE_]NAME/``) and a STAC item per tile; a
    smaller one stays one COG (``cog/[ZONE_]NAME.tif``). ``vector_max_pixels``: the largest
    mask (pixels, of one zone) vectorised into field polygons (``segment.vectorize``): the
    workers vectorise it block by block, but every polygon goes through the client into one
    GeoParquet file, so a larger zone is refused with a warning and no file (about two full
    Sentinel-2 tiles by default).
    """

    tile_px: int = Field(default=4096, ge=512, multiple_of=512)
    vector_max_pixels: int = Field(default=250_000_000, ge=1)


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
    publish: PublishConfig = PublishConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        for section in ("embed", "segment"):
            missing = [b for b in getattr(self, section).bands if b not in self.cube.bands]
            if missing:
                raise ValueError(
                    f"{section}.bands {short(missing)} are not in cube.bands "
                    f"{short(self.cube.bands)}: add them to cube.bands"
                )
        if self.cube.chunk % self.patches.stride:
            raise ValueError(
                f"cube.chunk ({self.cube.chunk}) must be a multiple of "
                f"patches.stride ({self.patches.stride}) so chunks align to patches"
            )
        return self

    def with_overrides(self, **changes: Any) -> RunConfig:
        """Return a copy with dotted-key overrides, e.g. ``{"embed.train.epochs": 1}``.

        Raises :class:`ConfigError` naming the key for an unknown key, or for a value that
        makes the configuration invalid.
        """
        return apply_overrides(self, changes)


# sections whose keys are not fixed by the schema: an override may add one
_FREE_FORM = {"output.storage_options"}


def apply_overrides(cfg: RunConfig, changes: dict[str, Any], source: str | None = None) -> RunConfig:
    data = cfg.model_dump()
    # the credentials are left out of every dump (run.json never holds them), not out of the config
    data.setdefault("output", {})["storage_options"] = dict(cfg.output.storage_options)
    for dotted, value in changes.items():
        key = cut(str(dotted))
        parts = str(dotted).split(".")
        node: Any = data
        for i, part in enumerate(parts):
            where = ".".join(parts[:i])
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override '{key}': '{cut(where)}' is a value ({short(node)}), not a section with "
                    f"keys: set it whole, e.g. '{cut(where)}=VALUE' ({REFERENCE})"
                )
            if part not in node and not (where in _FREE_FORM and i == len(parts) - 1):
                level = f"in section '{cut(where)}'" if where else "at the top level"
                raise ConfigError(
                    f"override '{key}': no such key '{cut(part, 40)}' {level}"
                    f"{did_you_mean(part, node)}; valid keys there: {', '.join(sorted(node))}"
                )
            if i < len(parts) - 1:
                node = node[part]
        try:
            size, _ = expanded_size(value, children_of_value, MAX_PIPELINE_VALUES)
        except Cyclic:
            raise ConfigError(f"override '{key}': its value contains itself: give a plain value") from None
        if size > MAX_PIPELINE_VALUES:
            raise ConfigError(
                f"override '{key}': its value expands to more than {MAX_PIPELINE_VALUES:,} "
                f"values: give a plain value ({REFERENCE})"
            )
        node[parts[-1]] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        keys = ", ".join(cut(str(k)) for k in changes)
        head = f"invalid override {keys}" + (f" of {source}" if source else "") + ":"
        raise ConfigError(format_errors(e, RunConfig, header=head)) from None
