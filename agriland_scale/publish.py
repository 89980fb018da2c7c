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

__all__ = ["mosaic_zones", "open_product", "package_versions", "write_cog", "write_group", "write_json"]

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


def write_cog(da: xr.DataArray, path: str | Path, *, nodata: float | int | None,
              resampling: str | None = None, rows: int = 2048, scale: float | None = None) -> None:
    """Write a 2-D georeferenced array as a Cloud-Optimized GeoTIFF with internal overviews.

    GDAL's COG driver tiles at 512 px and adds overview levels (2, 4, ...) until the smallest
    fits one tile, so a raster wider or taller than 512 px has overviews. ``resampling`` is the
    overview resampling (a GDAL name: ``average``, ``nearest``, ``mode``, ``bilinear``...);
    by default ``average`` for floating-point data (e.g. a probability: nodata pixels are left
    out of the average) and ``nearest`` for integers (masks, cluster ids: no invented values).

    ``scale`` (e.g. ``1 / 254`` for a probability) stores ``round(value / scale)`` as uint8 with
    GDAL's scale metadata (QGIS and rasterio's ``scales`` give the value back), NaN as
    ``nodata`` (which must then be an integer, e.g. 255): a compact COG.

    Bounded memory: ``da`` (lazy is fine) is read ``rows`` rows at a time into a tiled GeoTIFF,
    which GDAL's COG driver then copies (streaming) with overviews. Both files get temporary
    names; the COG is renamed to ``path`` only when complete.
    """
    import rasterio
    import rasterio.shutil
    from rasterio.windows import Window

    from .errors import ConfigError

    allowed = ("nearest", "average", "mode", "bilinear", "cubic", "cubicspline", "lanczos", "rms")
    if resampling is None:
        resampling = "nearest" if np.issubdtype(da.dtype, np.integer) else "average"
    if resampling.lower() not in allowed:
        raise ConfigError(f"overview resampling {resampling!r} is not one of {', '.join(allowed)}")
    if da.ndim != 2:
        raise ValueError(f"write_cog takes a 2-D (y, x) array, got dims {da.dims}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = da.shape
    dtype = str(da.dtype)
    if scale is not None:
        if nodata is None or not float(nodata).is_integer() or not 0 <= nodata <= 255:
            raise ValueError(f"a scaled uint8 COG needs an integer nodata in 0..255, got {nodata!r}")
        dtype = "uint8"
    src = path.with_name(path.stem + ".partial-src.tif")
    tmp = path.with_name(path.stem + ".partial.tif")
    profile = dict(driver="GTiff", height=h, width=w, count=1, dtype=dtype, crs=da.rio.crs,
                   transform=da.rio.transform(), nodata=nodata, tiled=True, blockxsize=512,
                   blockysize=512, compress="ZSTD", zstd_level=1, BIGTIFF="IF_SAFER")
    try:
        with rasterio.open(src, "w", **profile) as dst:
            for y0 in range(0, h, rows):
                part = np.asarray(da[y0:y0 + rows].values)
                if scale is not None:
                    q = np.rint(np.nan_to_num(part, nan=0.0) / scale)
                    part = np.where(np.isnan(part), nodata, np.clip(q, 0, 255 if nodata != 255 else 254))
                    part = part.astype("uint8")
                dst.write(part, 1, window=Window(0, y0, w, part.shape[0]))
            if scale is not None:
                dst.scales, dst.offsets = (float(scale),), (0.0,)
        rasterio.shutil.copy(src, tmp, driver="COG", compress="DEFLATE", overview_resampling=resampling.upper(),
                             BIGTIFF="IF_SAFER")
        tmp.replace(path)
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def mosaic_zones(segs: dict[str, xr.Dataset], crs: str, resolution: float | None,
                 max_pixels: int = 400_000_000) -> xr.Dataset:
    """Reproject every zone's ``probability`` to one ``crs`` at ``resolution`` (units of
    ``crs``) and merge them.

    Bilinear resampling (a probability is continuous); where zones overlap, the first zone
    wins. Loads the zones' probabilities in memory: meant for regions of moderate size; the
    per-zone products stay the reference. Raises :class:`ConfigError` if the mosaic would
    exceed ``max_pixels``.
    """
    from pyproj import CRS
    from rasterio.enums import Resampling
    from rioxarray.merge import merge_arrays

    from .errors import ConfigError

    if resolution is None:
        if CRS.from_user_input(crs).is_geographic:
            raise ConfigError(f"cube.mosaic_crs {crs} is geographic: set cube.mosaic_resolution in "
                              "degrees (e.g. 0.0001)")
        resolution = float(abs(next(iter(segs.values())).rio.transform().a))
    bounds = [s.rio.transform_bounds(crs) for s in segs.values()]
    w = (max(b[2] for b in bounds) - min(b[0] for b in bounds)) / resolution
    h = (max(b[3] for b in bounds) - min(b[1] for b in bounds)) / resolution
    if w * h > max_pixels:
        raise ConfigError(f"the mosaic in {crs} at {resolution:g} would be {w:,.0f} x {h:,.0f} px: "
                          "the zones are far apart. Use the per-zone products, or a coarser "
                          "cube.mosaic_resolution")
    parts = []
    for seg in segs.values():
        prob = seg["probability"].load().rio.write_nodata(np.nan, encoded=False)
        parts.append(prob.rio.reproject(crs, resolution=resolution, resampling=Resampling.bilinear,
                                        nodata=np.nan))
    merged = merge_arrays(parts, nodata=np.nan) if len(parts) > 1 else parts[0]
    merged.attrs = {"long_name": "agricultural land probability, zones reprojected", "units": "1",
                    "zones": list(segs)}
    merged.encoding = {}
    return merged.to_dataset(name="probability")


def write_json(obj: dict[str, Any], path: str | Path) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def write_quicklook(cube: xr.Dataset, clusters: xr.Dataset, seg: xr.Dataset, path: str | Path, *,
                    max_px: int = 2048) -> None:
    """A PNG with the RGB composite, the cluster map and the probability over the composite.

    Rasters are read every ``step``-th pixel so that at most ``max_px`` per side are held
    (a full Sentinel-2 tile is not loaded whole); written to a temporary name, then renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, -(-max(cube.sizes["y"], cube.sizes["x"]) // max_px))
    sub = {"y": slice(None, None, step), "x": slice(None, None, step)}
    rgb = np.moveaxis(cube["reflectance"].sel(band=["red", "green", "blue"]).isel(sub).values, 0, -1)
    lo, hi = np.nanpercentile(rgb, [2, 98])
    rgb = np.clip((np.nan_to_num(rgb) - lo) / (hi - lo), 0, 1)
    l, b, r, t = cube.rio.bounds()
    ext = (l, r, b, t)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), constrained_layout=True)
    axes[0].imshow(rgb, extent=ext)
    axes[0].set_title("composite (B04, B03, B02)")
    cm = clusters["cluster_map"]
    cl, cb, cr, ct = cm.rio.bounds()
    axes[1].imshow(rgb, extent=ext)
    im1 = axes[1].imshow(np.ma.masked_less(cm.values, 0), extent=(cl, cr, cb, ct), cmap="tab10",
                         alpha=0.55, interpolation="nearest")
    fig.colorbar(im1, ax=axes[1], shrink=0.8, label="DEC cluster (one cell a patch)")
    axes[1].set_title("clusters")
    axes[2].imshow(rgb, extent=ext)
    im2 = axes[2].imshow(seg["probability"].isel(sub).values, extent=ext, cmap="magma", vmin=0, vmax=1,
                         alpha=0.6)
    fig.colorbar(im2, ax=axes[2], shrink=0.8, label="agricultural land probability")
    axes[2].set_title("U-Net probability")
    for ax in axes:
        ax.set_xlim(l, r)
        ax.set_ylim(b, t)
        ax.set_xlabel(f"x (m, {cube.rio.crs})")
        ax.ticklabel_format(style="plain")
        ax.tick_params(labelsize=7)
    path = Path(path)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
