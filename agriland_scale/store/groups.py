"""The run's Zarr store: its repository, versions, readers, and georeferenced groups.

Every product of a run is one group of one Zarr (v3) store kept by Icechunk, a
transactional storage engine for Zarr: ``OUT/agriland.icechunk`` on local disk, or a prefix
of a bucket (``s3://``, ``gs://``, ``az://``). The branch ``main`` holds only complete
products; every change to it is one commit (a version), so a reader opens a consistent
snapshot and earlier versions stay readable (:func:`history`, ``open_run(..., version=)``).
:mod:`agriland_scale.store.resume` writes it.

A spatial group is on a (y, x) grid in the zone's CRS with a CF grid mapping
(``spatial_ref``), so that ``xarray.open_zarr(store, group=..., decode_coords="all")`` and
rioxarray find its CRS; ``agriland export OUT --zarr DEST`` (:func:`export_zarr`) copies the
products to a plain Zarr store for tools that cannot read Icechunk.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr

from agriland_scale.errors import CorruptInput
from agriland_scale.files import short_error
from agriland_scale.layout import STORE, local_folder
from agriland_scale.store.checksums import with_checksums
from agriland_scale.store.repo import (  # the repository's API, also here for the readers of groups
    _URL,
    ICECHUNK_MEDIA_TYPE,
    history,
    is_repo,
    main_version,
    open_repo,
    reader,
    repo_storage,
    store_location,
)

__all__ = [
    "CF_CONVENTIONS",
    "CLUSTER_IDS",
    "ICECHUNK_MEDIA_TYPE",
    "StoreLike",
    "fast_compressors",
    "gdal_crs",
    "has_group",
    "history",
    "is_repo",
    "main_version",
    "open_cube",
    "open_product",
    "open_repo",
    "open_run",
    "product_groups",
    "reader",
    "repo_storage",
    "run_relative",
    "store_location",
    "try_open_product",
    "with_checksums",
    "write_georef",
    "write_group",
]

# a product store as the functions below take it: an opened Zarr store (an Icechunk
# session's store, pickled to workers), a run folder or its store, or a plain Zarr path
StoreLike = Any


def fast_compressors() -> tuple[Any, ...]:
    """Return the Zarr compressors of the cube's arrays: Blosc LZ4 with bit shuffle.

    The cube is written once and read by every later stage. On the Virginia cube (int16 half
    digital numbers, 4 bands, 256 px chunks) Blosc LZ4 with bit shuffle encodes 8x and
    decodes 4x faster than Zarr's default (Zstd, level 0), and is no bigger (measured with
    numcodecs on 1024 x 1024 px x 4 bands: 8.5 against 69.5 ms to encode, 4.0 against 15.6 ms
    to decode, 66.5 % against 69.7 % of the raw size; the whole cube's reflectance: 17.93
    against 18.07 MiB, written in 0.20 against 0.71 s).
    """
    from zarr.codecs import BloscCodec

    return (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),)


def _as_store(store: StoreLike) -> Any:
    """Resolve a path naming a run or its Icechunk store to a reader; other values pass through."""
    if isinstance(store, (str, Path)):
        text = str(store)
        loc = store_location(text)
        if is_repo(loc):
            return reader(loc)
        if not _URL.match(text) and Path(text, STORE).is_dir():  # a run folder whose store is empty
            raise CorruptInput(f"{text}: the run's product store holds nothing readable yet")
        return text
    return store


def has_group(store: StoreLike, group: str) -> bool:
    """Tell whether ``group`` exists in ``store`` (an opened store, a run or a Zarr path)."""
    try:
        zarr.open_group(_as_store(store), path=group, mode="r")
    except (FileNotFoundError, KeyError, ValueError, CorruptInput, zarr.errors.GroupNotFoundError):
        return False
    except Exception:  # noqa: BLE001 - any other reading problem: not a readable group
        return False
    return True


log = logging.getLogger(__name__)


def _xy_attrs(crs) -> tuple[dict, dict]:
    """CF attributes of the x and y coordinates for ``crs`` (a pyproj/rasterio CRS)."""
    from pyproj import CRS

    c = CRS.from_user_input(crs)
    if c.is_geographic:
        return (
            {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"},
            {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"},
        )
    unit = c.axis_info[0].unit_name if c.axis_info else "metre"
    unit = {"metre": "m", "meter": "m", "foot": "ft", "US survey foot": "US_survey_foot"}.get(unit, unit)
    return (
        {
            "standard_name": "projection_x_coordinate",
            "long_name": "x coordinate of projection",
            "units": unit,
            "axis": "X",
        },
        {
            "standard_name": "projection_y_coordinate",
            "long_name": "y coordinate of projection",
            "units": unit,
            "axis": "Y",
        },
    )


# the CF version the products follow: every product group's global ``Conventions``
CF_CONVENTIONS = "CF-1.10"


def gdal_crs(crs: Any) -> dict[str, Any]:
    """Return GDAL's ``_CRS`` attribute for ``crs`` (anything pyproj accepts).

    GDAL's Zarr driver reads an array's CRS from its ``_CRS`` attribute (``.zattrs`` in Zarr
    v2, ``attributes`` in v3), a dict with ``wkt`` (WKT2 2019), ``projjson`` and, for an EPSG
    CRS, ``url`` (the OGC URL of the code). Every GDAL with a Zarr driver finds it (Debian 12's
    GDAL 3.6, that of QGIS 3.22, included), where only newer ones read the CF ``grid_mapping``
    (GDAL 3.10 does, 3.6 does not).
    """
    from pyproj import CRS

    c = CRS.from_user_input(crs)
    out: dict[str, Any] = {"wkt": c.to_wkt(), "projjson": c.to_json_dict()}
    epsg = c.to_epsg()
    if epsg is not None:
        out["url"] = f"http://www.opengis.net/def/crs/EPSG/0/{epsg}"
    return out


def _is_remote(location: str | Path) -> bool:
    """Tell whether ``location`` is a URL other than ``file://`` (no path of this machine)."""
    return _URL.match(str(location)) is not None and not str(location).lower().startswith("file://")


def run_relative(path: str | Path, *runs: str | Path) -> str:
    """Return ``path`` as a product attribute names it: relative to the run, never a machine path.

    ``runs`` are the run's folder (or its working copy) and URL. A file inside one of them is
    named relative to it (``models/unet.keras``); a URL outside them (``s3://``...) is kept;
    a local file outside them (a path or ``file://`` URL) is named by its file name alone: the
    folders of the machine that made the run are no part of the product.
    """
    text = str(path)
    for run in runs:
        root = str(run).rstrip("/")
        if root and text.startswith(root + "/"):
            return text[len(root) + 1 :]
    if _is_remote(text):
        return text
    local = local_folder(text)
    for run in runs:
        if str(run) and not _is_remote(run):
            try:
                return local.relative_to(local_folder(run)).as_posix()
            except ValueError:
                pass
    return local.name


def _declared_fill(var: xr.DataArray):
    """Return the CF ``_FillValue`` a variable will be written with (encoding first), or None."""
    for where in (var.encoding, var.attrs):
        if "_FillValue" in where:
            return where["_FillValue"]
    return None


def write_georef(ds: xr.Dataset, crs: int | str) -> xr.Dataset:
    """Attach CRS and GeoTransform as a ``spatial_ref`` coordinate (CF grid mapping).

    Also the CF attributes of x/y, and nodata that agrees between CF and Zarr:

    - every variable on (y, x) carries ``grid_mapping: spatial_ref`` (GDAL, CF readers) and
      lists ``spatial_ref`` in its ``coordinates``, so that a plain ``xr.open_zarr`` (without
      ``decode_coords="all"``) keeps ``spatial_ref`` a coordinate and rioxarray finds the CRS;
    - x/y get ``standard_name``, ``long_name``, ``units`` (as the CRS says: ``m`` for a
      projected CRS in metres) and ``axis``, and no ``_FillValue``;
    - a variable declaring a CF ``_FillValue`` is written with that value as its Zarr
      ``fill_value`` too; an integer variable declaring none gets its dtype's maximum as Zarr
      ``fill_value`` (a reader that takes the Zarr fill value as nodata, as GDAL does, then
      hides no valid value, e.g. a ``clear_count`` of 0), unless a ``fill_value`` is set.
    - the global attribute ``Conventions`` says :data:`CF_CONVENTIONS`;
    - a scalar coordinate whose CF ``bounds`` variable is not in ``ds`` is dropped: the cube's
      ``time`` (the composite's time, with ``time_bounds``), which every variable made on the
      cube's x/y coordinates inherits, is the cube's alone.

    Parameters
    ----------
    ds : xarray.Dataset
        Variables on ``(y, x)`` (or with leading dims), coordinates at pixel centres.
    crs : int or str
        The CRS (an EPSG code or anything rioxarray accepts).

    Returns
    -------
    xarray.Dataset
        A georeferenced copy of ``ds``.
    """
    inherited = [
        name
        for name, c in ds.coords.items()
        if c.ndim == 0 and (c.attrs.get("bounds") or c.encoding.get("bounds")) not in (None, *ds.variables)
    ]
    ds = ds.drop_vars(inherited)
    ds = ds.rio.write_crs(crs)
    ds = ds.rio.write_transform(ds.rio.transform(recalc=True))
    ds.attrs["Conventions"] = CF_CONVENTIONS
    gm = ds.rio.grid_mapping
    xd, yd = ds.rio.x_dim, ds.rio.y_dim
    x_attrs, y_attrs = _xy_attrs(ds.rio.crs)
    for dim, attrs in ((xd, x_attrs), (yd, y_attrs)):
        keep = {k: v for k, v in ds[dim].attrs.items() if k not in ("_FillValue", "units")}
        ds[dim].attrs = keep | attrs
        ds[dim].encoding["_FillValue"] = None
    non_dim = [str(c) for c in ds.coords if c not in ds.dims]
    for name in ds.data_vars:
        var = ds[name]
        var.attrs.pop("grid_mapping", None)
        if {xd, yd} <= set(var.dims):
            var.encoding["grid_mapping"] = gm
            var.attrs.pop("coordinates", None)
            var.encoding["coordinates"] = " ".join(
                sorted(c for c in non_dim if set(ds[c].dims) <= set(var.dims))
            )
        else:
            var.encoding.pop("grid_mapping", None)
        fill = _declared_fill(var)
        dtype = np.dtype(var.encoding.get("dtype", var.dtype))
        if fill is not None:
            var.encoding["fill_value"] = dtype.type(fill)
        elif dtype.kind in "iu" and "fill_value" not in var.encoding:
            var.encoding["fill_value"] = np.iinfo(dtype).max
    return ds


def open_cube(store: StoreLike, group: str = "cube", *, dask: bool = True) -> xr.Dataset:
    """Open the cube group of a run's store with its CRS, lazily.

    ``store`` is an opened Zarr store (a reader, :func:`reader`), a run folder or URL, or a
    plain Zarr path. ``dask=False`` gives lazily indexed arrays without dask (what tasks
    running on a worker use: slicing reads just those Zarr chunks, with no nested graph sent
    to the scheduler).
    """
    try:
        ds = xr.open_dataset(
            _as_store(store),
            engine="zarr",
            group=group,
            decode_coords="all",
            consolidated=False,
            chunks={} if dask else None,
            cache=False,
        )
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError) as e:
        raise CorruptInput(
            f"cannot open group '{group}' of {store}: {e}; rerun the cube stage "
            "(agriland run ... --force cube)"
        ) from None
    if ds.rio.crs is None:
        raise CorruptInput(
            f"group '{group}' of {store} has no CRS: the store was not written by "
            "agriland-scale or is damaged"
        )
    # the store lists its arrays in no fixed order: reflectance first, so that the dataset's
    # dimensions read (band, y, x) on every run
    order = [v for v in ("reflectance",) if v in ds.data_vars]
    listed = ds[order + sorted(str(v) for v in ds.data_vars if v not in order)]
    ds = listed.assign_coords({k: c for k, c in ds.coords.items() if k not in listed.coords})  # time_bounds
    return _packed_as_float32(ds) if dask else ds


def _packed_as_float32(ds: xr.Dataset) -> xr.Dataset:
    """Decode packed 16-bit variables (CF ``scale_factor``) to float32, lazily.

    xarray decodes them to float64, because a Zarr attribute cannot say that the scale is a
    float32; 16-bit integers times a float32 scale need no more. Only for dask-backed data
    (workers' lazily indexed arrays are cast where they are read, a window at a time).
    """
    for name in list(ds.data_vars):
        var = ds[name]
        packed = np.dtype(var.encoding.get("dtype", var.dtype))
        if (
            var.dtype == "float64"
            and "scale_factor" in var.encoding
            and packed.kind in "iu"
            and packed.itemsize <= 2
            and var.chunks is not None
        ):
            encoding = dict(var.encoding)
            ds[name] = var.astype("float32")
            ds[name].encoding = encoding
    return ds


def write_group(ds: xr.Dataset, store: str | Path, group: str) -> None:
    """Write ``ds`` as ``group`` of a plain Zarr (v3) store, replacing an older version of it.

    For scratch stores, tests and benchmarks; a run's products go through its Icechunk store
    (:class:`agriland_scale.store.resume.Products`). Dask-backed variables are computed by
    the active Dask client while writing.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
        ds.to_zarr(store, group=group, mode="w", zarr_format=3, consolidated=False)


# integer category ids whose CF _FillValue (-1) open_product leaves unmasked
CLUSTER_IDS = ("labels", "kmeans_labels", "cluster_map")


def open_product(store: StoreLike, group: str) -> xr.Dataset:
    """Open one product group lazily with its CRS (``spatial_ref`` as a coordinate).

    CF decoding as ``xr.open_zarr`` does (a probability stored as scaled uint8 reads as float
    with NaN for nodata), except for the cluster ids (:data:`CLUSTER_IDS`): they stay int16 with
    -1 where no cluster, their ``_FillValue`` kept in ``attrs`` (``.rio.nodata`` gives it).

    Parameters
    ----------
    store : store-like
        A reader of the run's store (:func:`reader`), the run folder or URL, or a plain Zarr path.
    group : str
        The product group, e.g. ``"segmentation"``.

    Returns
    -------
    xarray.Dataset
        Dask-backed, chunked as stored.
    """
    ds = xr.open_zarr(
        _as_store(store),
        group=group,
        decode_coords="all",
        consolidated=False,
        mask_and_scale={v: False for v in CLUSTER_IDS},
    )  # type: ignore[arg-type]
    return _packed_as_float32(ds)


def try_open_product(store: StoreLike, group: str) -> xr.Dataset | None:
    """Open a product group as :func:`open_product` does, or None when it was not written.

    A group that exists but cannot be read (half-written, damaged) is logged and gives None:
    what reports and quicklooks use to show the rest of a run.
    """
    try:
        store = _as_store(store)
    except CorruptInput:
        return None
    if not has_group(store, group):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return open_product(store, group)
    except Exception as e:  # a half-written group: show the rest of the run
        log.warning("cannot open group %s of %s: %s", group, store, short_error(e))
        return None


def open_run(
    out_dir: str | Path, version: str | None = None, storage_options: dict[str, Any] | None = None
) -> xr.DataTree:
    """Open every product of a run as one :class:`xarray.DataTree`, lazily, each with its CRS.

    Parameters
    ----------
    out_dir : str or Path
        The run's ``--out`` (a folder, ``file://``, ``s3://``, ``gs://`` or ``az://`` URL), or
        its store ``OUT/agriland.icechunk``.
    version : str, optional
        A snapshot id or tag of the store (``agriland inspect OUT --history``); the latest
        products by default.
    storage_options : dict, optional
        Credentials and endpoint for object storage (see :func:`repo_storage`).

    Returns
    -------
    xarray.DataTree
        One node a product group (``/cube``, ``/segmentation``, ... or ``/utm18n/cube`` per
        zone), opened as :func:`open_product` does: a ``spatial_ref`` coordinate on every
        spatial group (``tree["segmentation"].ds.rio.crs``), cluster ids kept as int16.

    Raises
    ------
    CorruptInput
        ``out_dir`` holds no agriland store, or no such version.
    """
    loc = store_location(out_dir)
    if not is_repo(loc, storage_options):
        raise CorruptInput(
            f"{out_dir} holds no agriland product store ({STORE}): pass the --out folder "
            "or URL of an agriland run"
        )
    store = reader(loc, version, storage_options)
    return xr.DataTree.from_dict({"/" + g: open_product(store, g) for g in product_groups(store)})


def product_groups(store: StoreLike) -> list[str]:
    """List the product groups of a store (groups holding arrays), sorted (``utm18n/cube``, ...)."""
    root = zarr.open_group(_as_store(store), mode="r")
    return sorted(
        name
        for name, node in root.members(max_depth=None)
        if isinstance(node, zarr.Group) and any(True for _ in node.arrays())
    )
