"""Publish: write products as groups of one Zarr store, COGs for GIS users, and run.json."""

from __future__ import annotations

import json
import logging
import platform
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

__all__ = ["open_product", "package_versions", "write_cog", "write_group", "write_json"]

log = logging.getLogger(__name__)

_PACKAGES = ["agriland-scale", "numpy", "xarray", "rioxarray", "dask", "distributed", "zarr",
             "pystac-client", "odc-stac", "tensorflow-cpu", "tensorflow", "keras", "scikit-learn",
             "rasterio", "rustac"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


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


def open_product(store: str | Path, group: str) -> xr.Dataset:
    """Open one product group lazily with its CRS (``spatial_ref`` as a coordinate)."""
    return xr.open_zarr(store, group=group, decode_coords="all", consolidated=False)


def write_cog(da: xr.DataArray, path: str | Path, *, nodata: float | int | None) -> None:
    """Write a 2-D georeferenced array as a Cloud-Optimized GeoTIFF with overviews."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = da.load()
    if nodata is not None:
        arr = arr.rio.write_nodata(nodata, encoded=False)
    arr.attrs.pop("_FillValue", None)
    arr.encoding = {}
    arr.rio.to_raster(path, driver="COG", compress="DEFLATE", overview_resampling="nearest"
                      if np.issubdtype(arr.dtype, np.integer) else "average")


def write_json(obj: dict[str, Any], path: str | Path) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
