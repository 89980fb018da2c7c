"""A run's products copied to a plain Zarr store, for the tools that cannot read Icechunk.

:func:`export_zarr` (``agriland export``): every product group as stored, with GDAL's
``_CRS`` beside CF's grid mapping and consolidated metadata, Zarr v3 or v2.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal, cast

import xarray as xr
import zarr

from agriland_scale.errors import OutputError
from agriland_scale.layout import local_folder
from agriland_scale.store.groups import CF_CONVENTIONS, gdal_crs, product_groups, reader, store_location

__all__ = ["export_zarr"]


def export_zarr(
    out_dir: str | Path,
    dest: str | Path,
    *,
    version: str | None = None,
    zarr_format: int = 3,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Copy a run's products to a plain Zarr store ``dest`` (for tools that cannot read Icechunk).

    Values are copied as stored (packed integers keep their CF ``scale_factor``, fill values
    their ``_FillValue``), with chunks, attributes and the ``spatial_ref`` grid mapping, so
    ``xr.open_zarr(dest, group=G, decode_coords="all")`` reads what :func:`open_product`
    reads. ``zarr_format=2`` writes a Zarr v2 copy (GDAL 3.10 reads v2, not our v3 codecs).

    For the readers outside agriland, every georeferenced array also carries GDAL's ``_CRS``
    attribute (:func:`gdal_crs`: how every GDAL and QGIS finds the CRS, beside CF's
    ``grid_mapping``), every group and the root say ``Conventions`` (:data:`CF_CONVENTIONS`),
    and the metadata is consolidated (Zarr v2's ``.zmetadata``, in the root and in each group;
    zarr-python's consolidated metadata in v3), so that ``xr.open_zarr(dest, group=G)`` opens it
    with one read and no warning, locally or over HTTP. ``_CRS`` is a dict: drop it from a
    variable's ``attrs`` before writing it to netCDF.

    Returns
    -------
    list of str
        The groups copied.

    Raises
    ------
    OutputError
        ``dest`` exists (it is never overwritten: choose a new path).
    """
    dest_path = Path(local_folder(dest))
    if dest_path.exists():
        raise OutputError(
            f"{dest} exists: agriland export writes a new Zarr store and never replaces "
            "one; choose a path that does not exist"
        )
    store = reader(store_location(out_dir), version, storage_options)
    groups = product_groups(store)
    tmp = dest_path.with_name(dest_path.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    for g in groups:
        ds = xr.open_zarr(
            store, group=g, consolidated=False, mask_and_scale=False, decode_times=False, decode_coords="all"
        )
        src = zarr.open_group(store, path=g, mode="r")
        ds.attrs.setdefault("Conventions", CF_CONVENTIONS)
        for name, v in ds.variables.items():
            keep = {
                k: v.encoding[k]
                for k in ("chunks", "dtype", "grid_mapping", "coordinates", "bounds")
                if k in v.encoding
            }
            gm = keep.get("grid_mapping")
            if gm in ds.variables and "crs_wkt" in ds[gm].attrs:  # GDAL's CRS, beside CF's
                v.attrs["_CRS"] = gdal_crs(ds[gm].attrs["crs_wkt"])
            # the fill value as stored, and none where none was declared (xarray would add NaN)
            keep["_FillValue"] = v.attrs.pop("_FillValue", v.encoding.get("_FillValue"))
            if zarr_format == 3 and str(name) in src:  # the Zarr fill value as stored (GDAL's nodata)
                keep["fill_value"] = cast(zarr.Array, src[str(name)]).metadata.fill_value
            v.encoding = keep
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            ds.to_zarr(str(tmp), group=g, mode="w", zarr_format=zarr_format, consolidated=False)
    _finish_export(str(tmp), groups, zarr_format)
    os.replace(tmp, dest_path)  # the copy appears whole
    return groups


def _finish_export(path: str, groups: list[str], zarr_format: int) -> None:
    """Say the root's ``Conventions`` and consolidate the metadata of each group, then of the root."""
    fmt = cast(Literal[2, 3], zarr_format)
    root = zarr.open_group(path, mode="a", zarr_format=fmt)
    root.attrs["Conventions"] = CF_CONVENTIONS
    with warnings.catch_warnings():  # v3: consolidated metadata is zarr-python's, not yet the spec's
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        for g in groups:
            zarr.consolidate_metadata(path, path=g, zarr_format=fmt)
        zarr.consolidate_metadata(path, zarr_format=fmt)
