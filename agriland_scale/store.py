"""The run's Zarr store: write a group with its georeferencing, open a group, consolidate.

Every product of a run is one group of one Zarr (v3) store, ``OUT/agriland.zarr``. A spatial
group is on a (y, x) grid in the zone's CRS with a CF grid mapping (``spatial_ref``), so that
``xarray.open_zarr(..., decode_coords="all")``, rioxarray and GDAL find its CRS.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from agriland_scale.errors import CorruptInput
from agriland_scale.layout import local_folder

__all__ = ["CLUSTER_IDS", "consolidate", "open_cube", "open_product", "open_run", "try_open_product", "write_georef", "write_group"]

log = logging.getLogger(__name__)


def _xy_attrs(crs) -> tuple[dict, dict]:
    """CF attributes of the x and y coordinates for ``crs`` (a pyproj/rasterio CRS)."""
    from pyproj import CRS

    c = CRS.from_user_input(crs)
    if c.is_geographic:
        return ({"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east",
                 "axis": "X"},
                {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north",
                 "axis": "Y"})
    unit = c.axis_info[0].unit_name if c.axis_info else "metre"
    unit = {"metre": "m", "meter": "m", "foot": "ft", "US survey foot": "US_survey_foot"}.get(unit, unit)
    return ({"standard_name": "projection_x_coordinate", "long_name": "x coordinate of projection",
             "units": unit, "axis": "X"},
            {"standard_name": "projection_y_coordinate", "long_name": "y coordinate of projection",
             "units": unit, "axis": "Y"})


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
    ds = ds.rio.write_crs(crs)
    ds = ds.rio.write_transform(ds.rio.transform(recalc=True))
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
                sorted(c for c in non_dim if set(ds[c].dims) <= set(var.dims)))
        else:
            var.encoding.pop("grid_mapping", None)
        fill = _declared_fill(var)
        dtype = np.dtype(var.encoding.get("dtype", var.dtype))
        if fill is not None:
            var.encoding["fill_value"] = dtype.type(fill)
        elif dtype.kind in "iu" and "fill_value" not in var.encoding:
            var.encoding["fill_value"] = np.iinfo(dtype).max
    return ds


def open_cube(store: str | Path, group: str = "cube", *, dask: bool = True) -> xr.Dataset:
    """Open the cube group of an output Zarr store with its CRS, lazily.

    ``dask=False`` gives lazily indexed arrays without dask (what tasks running on a worker
    use: slicing reads just those Zarr chunks, with no nested graph sent to the scheduler).
    """
    try:
        ds = xr.open_dataset(store, engine="zarr", group=group, decode_coords="all",
                             consolidated=False, chunks={} if dask else None, cache=False)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise CorruptInput(f"cannot open group '{group}' of {store}: {e}; rerun the cube stage "
                           "(agriland run ... --force cube)") from None
    if ds.rio.crs is None:
        raise CorruptInput(f"group '{group}' of {store} has no CRS: the store was not written by "
                           "agriland-scale or is damaged")
    # the store lists its arrays in no fixed order: reflectance first, so that the dataset's
    # dimensions read (band, y, x) on every run
    order = [v for v in ("reflectance",) if v in ds.data_vars]
    ds = ds[order + sorted(str(v) for v in ds.data_vars if v not in order)]
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
        if var.dtype == "float64" and "scale_factor" in var.encoding and packed.kind in "iu" \
                and packed.itemsize <= 2 and var.chunks is not None:
            encoding = dict(var.encoding)
            ds[name] = var.astype("float32")
            ds[name].encoding = encoding
    return ds


def write_group(ds: xr.Dataset, store: str | Path, group: str) -> None:
    """Write ``ds`` as ``group`` of the Zarr (v3) store, replacing an older version of it.

    Dask-backed variables are computed by the active Dask client while writing.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
        ds.to_zarr(store, group=group, mode="w", zarr_format=3, consolidated=False)


def consolidate(store: str | Path) -> None:
    """Consolidate the metadata of the whole store (one read opens every group)."""
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(str(store))


# integer category ids whose CF _FillValue (-1) open_product leaves unmasked
CLUSTER_IDS = ("labels", "kmeans_labels", "cluster_map")


def open_product(store: str | Path, group: str) -> xr.Dataset:
    """Open one product group lazily with its CRS (``spatial_ref`` as a coordinate).

    CF decoding as ``xr.open_zarr`` does (a probability stored as scaled uint8 reads as float
    with NaN for nodata), except for the cluster ids (:data:`CLUSTER_IDS`): they stay int16 with
    -1 where no cluster, their ``_FillValue`` kept in ``attrs`` (``.rio.nodata`` gives it).

    Parameters
    ----------
    store : str or Path
        The run's Zarr store (``OUT/agriland.zarr``).
    group : str
        The product group, e.g. ``"segmentation"``.

    Returns
    -------
    xarray.Dataset
        Dask-backed, chunked as stored.
    """
    ds = xr.open_zarr(store, group=group, decode_coords="all", consolidated=False,
                      mask_and_scale={v: False for v in CLUSTER_IDS})  # type: ignore[arg-type]
    return _packed_as_float32(ds)


def try_open_product(store: str | Path, group: str) -> xr.Dataset | None:
    """Open a product group as :func:`open_product` does, or None when it was not written.

    A group that exists but cannot be read (half-written, damaged) is logged and gives None:
    what reports and quicklooks use to show the rest of a run.
    """
    if not (Path(store) / group / "zarr.json").is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return open_product(store, group)
    except Exception as e:  # a half-written group: show the rest of the run
        log.warning("cannot open group %s of %s: %s", group, store, e)
        return None


def open_run(out_dir: str | Path) -> xr.DataTree:
    """Open every product of a run as one :class:`xarray.DataTree`, lazily, each with its CRS.

    Parameters
    ----------
    out_dir : str or Path
        The run's output folder (``--out``), or its Zarr store ``OUT/agriland.zarr``.

    Returns
    -------
    xarray.DataTree
        One node a product group (``/cube``, ``/segmentation``, ... or ``/utm18n/cube`` per
        zone), opened as :func:`open_product` does: a ``spatial_ref`` coordinate on every
        spatial group (``tree["segmentation"].ds.rio.crs``), cluster ids kept as int16.

    Raises
    ------
    CorruptInput
        ``out_dir`` holds no agriland store.
    """
    import zarr

    path = local_folder(out_dir)
    store = path if (path / "zarr.json").is_file() else path / "agriland.zarr"
    if not (store / "zarr.json").is_file():
        raise CorruptInput(f"{out_dir} holds no agriland.zarr store: pass the --out folder of an agriland "
                           "run (or its agriland.zarr)")
    root = zarr.open_group(str(store), mode="r")
    groups = sorted(name for name, node in root.members(max_depth=None)
                    if isinstance(node, zarr.Group) and any(True for _ in node.arrays()))
    return xr.DataTree.from_dict({"/" + g: open_product(store, g) for g in groups})
