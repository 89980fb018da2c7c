"""Segmentation: U-Net over overlapping windows, blended into a seamless probability map.

Windows of ``window`` px sit on one global grid (starts ``k * stride - overlap // 2``,
``stride = window - overlap``), anchored at the cube's top-left pixel. Each Dask task makes
one output block: it predicts every window touching the block, accumulates predictions
weighted by a smooth (Hann) weight, divides by the summed weight and keeps its block.
Because the grid is global, the result does not depend on the block size: tiled inference
equals a whole-image pass with the same windows. Nodata pixels stay NaN.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import xarray as xr

from . import _worker
from .cube import open_cube, write_georef
from .embed import check_model_bands
from .patches import blend_weight, window_starts

__all__ = ["predict_block", "segment_region"]


def predict_block(model, reflectance: np.ndarray, clear: np.ndarray, gy: int, gx: int, h: int, w: int,
                  *, window: int, overlap: int, reflectance_max: float, batch_size: int,
                  lock=None) -> np.ndarray:
    """Blended probability ``(h, w)`` float32 for the block at global offset (gy, gx).

    ``reflectance`` (band, H, W) and ``clear`` (H, W) are array-likes over the whole cube
    (lazy is fine: only the needed window span is read).
    """
    H, W = clear.shape
    ok = np.asarray(clear[gy:gy + h, gx:gx + w]) > 0
    if not ok.any():  # an all-nodata / all-cloud block: nothing to predict
        return np.full((h, w), np.nan, dtype="float32")
    stride, off = window - overlap, overlap // 2
    rs = window_starts(H, window, stride, off)
    cs = window_starts(W, window, stride, off)
    rs = rs[(rs < gy + h) & (rs + window > gy)]
    cs = cs[(cs < gx + w) & (cs + window > gx)]
    y_lo, y_hi = int(rs.min()), int(rs.max()) + window
    x_lo, x_hi = int(cs.min()), int(cs.max()) + window
    # read the span once, padding with 0 (no data) outside the image
    span = np.zeros((reflectance.shape[0], y_hi - y_lo, x_hi - x_lo), dtype="float32")
    ry0, ry1, rx0, rx1 = max(y_lo, 0), min(y_hi, H), max(x_lo, 0), min(x_hi, W)
    span[:, ry0 - y_lo:ry1 - y_lo, rx0 - x_lo:rx1 - x_lo] = np.asarray(reflectance[:, ry0:ry1, rx0:rx1])
    np.nan_to_num(span, copy=False, nan=0.0)
    span = np.clip(span / reflectance_max, 0.0, 1.0)
    span = np.moveaxis(span, 0, -1)
    offsets = [(int(r), int(c)) for r in rs for c in cs]
    weight = blend_weight(window)
    acc = np.zeros((y_hi - y_lo, x_hi - x_lo), dtype="float64")
    wsum = np.zeros_like(acc)
    for s in range(0, len(offsets), batch_size):
        chunk = offsets[s:s + batch_size]
        batch = np.stack([span[r - y_lo:r - y_lo + window, c - x_lo:c - x_lo + window] for r, c in chunk])
        if lock is not None:
            with lock:
                pred = model.predict(batch, batch_size=len(batch), verbose=0)
        else:
            pred = model.predict(batch, batch_size=len(batch), verbose=0)
        for (r, c), p in zip(chunk, pred[..., 0]):
            acc[r - y_lo:r - y_lo + window, c - x_lo:c - x_lo + window] += p * weight
            wsum[r - y_lo:r - y_lo + window, c - x_lo:c - x_lo + window] += weight
    prob = (acc / np.maximum(wsum, 1e-12))[gy - y_lo:gy - y_lo + h, gx - x_lo:gx - x_lo + w]
    return np.where(ok, prob, np.nan).astype("float32")


def _segment_task(model_path: str, cube_store: str, gy: int, gx: int, h: int, w: int, bands: list[str],
                  window: int, overlap: int, reflectance_max: float, batch_size: int,
                  group: str = "cube") -> np.ndarray:
    model, lock = _worker.get_model(model_path)
    cube = open_cube(cube_store, group, dask=False)
    refl = cube["reflectance"].sel(band=bands)  # lazily indexed: only the window span is read
    return predict_block(model, refl, cube["clear_count"], gy, gx, h, w, window=window,
                         overlap=overlap, reflectance_max=reflectance_max, batch_size=batch_size,
                         lock=lock)


def segment_region(model_path: str, cube_store: str, cube: xr.Dataset, bands: list[str], *,
                   window: int, overlap: int, reflectance_max: float, threshold: float,
                   batch_size: int, block: int = 1024, resources: dict | None = None,
                   group: str = "cube") -> xr.Dataset:
    """Lazy ``probability`` (float32 0..1, NaN = nodata) and ``mask`` (uint8 1/0, 255 = nodata).

    One task per ``block`` x ``block`` output block; compute or write with a Dask client.
    """
    check_model_bands(model_path, bands, reflectance_max, window)
    H, W = cube.sizes["y"], cube.sizes["x"]
    fn = dask.delayed(_segment_task, pure=True)
    rows = []
    with dask.annotate(resources=resources or {}):
        for gy in range(0, H, block):
            row = []
            for gx in range(0, W, block):
                h, w = min(block, H - gy), min(block, W - gx)
                d = fn(model_path, cube_store, gy, gx, h, w, bands, window, overlap, reflectance_max, batch_size,
                       group)
                row.append(da.from_delayed(d, shape=(h, w), dtype="float32"))
            rows.append(row)
    prob = da.block(rows)
    mask = da.where(da.isnan(prob), 255, (prob >= threshold).astype("uint8")).astype("uint8")
    ds = xr.Dataset({"probability": (("y", "x"), prob), "mask": (("y", "x"), mask)},
                    coords={"y": cube.y, "x": cube.x})
    ds["probability"].attrs.update(long_name="agricultural land probability", units="1",
                                   model=str(model_path), window=window, overlap=overlap)
    ds["mask"].attrs.update(long_name="agricultural land mask", threshold=threshold,
                            flag_values=[0, 1], flag_meanings="other agricultural")
    ds["probability"].encoding.update(dtype="uint8", scale_factor=np.float32(1 / 254), add_offset=np.float32(0), _FillValue=255)
    ds["mask"].encoding.update(_FillValue=255)
    return write_georef(ds, cube.rio.crs)
