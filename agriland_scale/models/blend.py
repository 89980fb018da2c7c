"""The window grid and the blend: U-Net windows over an image, blended into one seamless map.

Windows of ``window`` px sit on one global grid (starts ``k * stride - overlap // 2``,
``stride = window - overlap``), anchored at the cube's top-left pixel. A pixel's probability
is the sum of the predictions of the windows covering it, weighted by a smooth (Hann)
weight, divided by the summed weight. Because the grid is global, the result does not depend
on how the work is split: tiled inference equals a whole-image pass with the same windows.
Nodata pixels (no clear observation) stay NaN; windows without a clear pixel are skipped.
:func:`predict_block` is the whole computation for one block in one process;
:func:`~agriland_scale.models.segment.segment_region` splits it into Dask tasks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from agriland_scale.errors import ModelMismatch
from agriland_scale.models import worker as _worker
from agriland_scale.patches import blend_weight, normalise, window_starts

__all__ = ["MAX_INFERENCE_WINDOW", "RESIZABLE_ENCODERS", "choose_inference_window", "predict_block"]

# the largest window "auto" considers, px (a 1024 px window of a plain U-Net at batch 1 holds
# about as many activations as the 256 px training batch of 16)
MAX_INFERENCE_WINDOW = 1024
# U-Net encoders whose models run at any input size divisible by 32 (InceptionV3's valid
# convolutions tie its skip connections to the training window)
RESIZABLE_ENCODERS = ("plain", "resnet50")


def _grid(length: int, window: int, overlap: int) -> np.ndarray:
    """Global window starts along one axis of ``length`` px.

    Windows step by ``window - overlap`` from ``-overlap // 2``; a window is left out when
    the one before it already reaches the last pixel (its blending weight is positive up to
    its edge, so every pixel stays covered). The grid depends on ``length`` only, never on
    how the image is split into blocks.
    """
    starts = window_starts(length, window, window - overlap, overlap // 2)
    needed = np.ones(len(starts), dtype=bool)
    needed[1:] = starts[:-1] + window < length
    return starts[needed]


def _predicted_pixels(size: int, overlap: int, height: int, width: int) -> int:
    """Pixels the U-Net predicts to cover ``height x width`` with ``size`` px windows."""
    return len(_grid(height, size, overlap)) * len(_grid(width, size, overlap)) * size * size


def choose_inference_window(
    setting: int | str | None, window: int, overlap: int, height: int, width: int, encoder: str | None
) -> int:
    """Choose the window side (px) the U-Net predicts on for a region of ``height x width`` px.

    Parameters
    ----------
    setting : int, "auto" or None
        ``segment.inference_window``: None keeps ``window``; an int is used as is; ``"auto"``
        takes the multiple of 32 in ``[window, MAX_INFERENCE_WINDOW]`` that predicts the
        fewest pixels (windows overlap by ``overlap`` and the grid covers the region; the
        smaller size on a tie), or ``window`` for a model that cannot change size.
    window : int
        The model's training window, px.
    overlap : int
        Overlap of neighbouring windows, px.
    height, width : int
        The region's size, px.
    encoder : str or None
        The U-Net's encoder (from its metadata sidecar).

    Returns
    -------
    int
        The inference window, px.

    Raises
    ------
    ModelMismatch
        A size other than ``window`` was asked for a model that cannot change size.
    """
    resizable = encoder in RESIZABLE_ENCODERS
    if setting is None:
        return window
    if isinstance(setting, int):
        if setting != window and not resizable:
            raise ModelMismatch(
                f"segment.inference_window {setting} needs a plain or ResNet-50 U-Net; this "
                f"one's encoder is {encoder!r}, whose valid convolutions tie it to its "
                f"{window} px training window: set segment.inference_window to null or auto"
            )
        return setting
    if not resizable:
        return window
    sizes = range(window, max(window, MAX_INFERENCE_WINDOW) + 1, 32)
    return min(sizes, key=lambda s: (_predicted_pixels(s, overlap, height, width), s))


def _weight(window: int) -> np.ndarray:
    # no floor: blend_weight's default floor (1e-3) gives a window's first column/row a step
    # of up to ~0.01 (a 20-step U-Net on the demo cube: mean |dp| across window borders /
    # inside windows 1.17 with the floor, 1.08 without; see tests/test_seams.py)
    return blend_weight(window, floor=0.0)


def _weighted_sum(
    model,
    reflectance,
    clear,
    rs: np.ndarray,
    cs: np.ndarray,
    *,
    window: int,
    reflectance_max: float | Sequence[float],
    batch_size: int,
    lock=None,
) -> np.ndarray | None:
    """Sum of ``weight * prediction`` (float64) of windows ``rs x cs`` over their span.

    The span starts at global pixel ``(rs.min(), cs.min())`` and is ``rs.max() - rs.min() +
    window`` px high (likewise wide). Windows without a clear pixel are skipped: they
    contribute to no pixel that is kept. ``None`` when every window is skipped.
    ``reflectance_max``: one reflectance for every band, or one a band of ``reflectance``.
    """
    H, W = clear.shape
    y_lo, y_hi = int(rs.min()), int(rs.max()) + window
    x_lo, x_hi = int(cs.min()), int(cs.max()) + window
    ry0, ry1, rx0, rx1 = max(y_lo, 0), min(y_hi, H), max(x_lo, 0), min(x_hi, W)
    ok = np.zeros((y_hi - y_lo, x_hi - x_lo), dtype=bool)
    ok[ry0 - y_lo : ry1 - y_lo, rx0 - x_lo : rx1 - x_lo] = np.asarray(clear[ry0:ry1, rx0:rx1]) > 0
    offsets = [
        (int(r) - y_lo, int(c) - x_lo)
        for r in rs
        for c in cs
        if ok[r - y_lo : r - y_lo + window, c - x_lo : c - x_lo + window].any()
    ]
    if not offsets:
        return None
    # read the span once, padding with 0 (no data) outside the image
    span = np.zeros((reflectance.shape[0], y_hi - y_lo, x_hi - x_lo), dtype="float32")
    span[:, ry0 - y_lo : ry1 - y_lo, rx0 - x_lo : rx1 - x_lo] = np.asarray(reflectance[:, ry0:ry1, rx0:rx1])
    span = normalise(np.ascontiguousarray(np.moveaxis(span, 0, -1)), reflectance_max)
    weight = _weight(window)
    acc = np.zeros((y_hi - y_lo, x_hi - x_lo), dtype="float64")
    for s in range(0, len(offsets), batch_size):
        chunk = offsets[s : s + batch_size]
        batch = np.stack([span[r : r + window, c : c + window] for r, c in chunk])
        # the same computation as predict(batch, batch_size=len(batch)) without building a
        # tf.data pipeline per call, traced once for any batch size
        with lock or contextlib.nullcontext():
            pred = np.asarray(_worker.predict(model, batch))
        _check_probabilities(pred, batch.shape)
        for (r, c), p in zip(chunk, pred[..., 0]):
            acc[r : r + window, c : c + window] += p * weight
    return acc


def _check_probabilities(pred: np.ndarray, shape: tuple[int, ...]) -> None:
    """Refuse predictions that are not one probability in [0, 1] a pixel of the windows ``shape``.

    The sidecar and the file's config are checked before a run (:func:`~.embed.check_model`);
    this checks what the loaded model computes, on every batch (a min and a max).
    """
    if pred.shape != (*shape[:3], 1) or not (np.all(pred >= 0) and np.all(pred <= 1)):
        lo, hi = (float(np.nanmin(pred)), float(np.nanmax(pred))) if pred.size else (np.nan, np.nan)
        raise ModelMismatch(
            f"the segmentation model gave outputs of shape {tuple(pred.shape)} in [{lo:.3g}, "
            f"{hi:.3g}] for windows of shape {tuple(shape)}: a U-Net gives one probability in "
            "[0, 1] a pixel (n, h, w, 1). segment.model is not a U-Net of agriland-scale: give "
            "one (models/unet.keras of a run), or retrain"
        )


def _weight_sum(rs: np.ndarray, cs: np.ndarray, window: int, gy: int, gx: int, h: int, w: int) -> np.ndarray:
    """Sum the blending weight (float64) of windows ``rs x cs`` on the block at (gy, gx)."""
    weight = _weight(window)
    wsum = np.zeros((h, w), dtype="float64")
    for r in rs:
        y0, y1 = max(int(r), gy), min(int(r) + window, gy + h)
        for c in cs:
            x0, x1 = max(int(c), gx), min(int(c) + window, gx + w)
            if y0 < y1 and x0 < x1:
                wsum[y0 - gy : y1 - gy, x0 - gx : x1 - gx] += weight[y0 - r : y1 - r, x0 - c : x1 - c]
    return wsum


def _touching(starts: np.ndarray, lo: int, hi: int, window: int) -> np.ndarray:
    return starts[(starts < hi) & (starts + window > lo)]


def predict_block(
    model,
    reflectance: np.ndarray,
    clear: np.ndarray,
    gy: int,
    gx: int,
    h: int,
    w: int,
    *,
    window: int,
    overlap: int,
    reflectance_max: float | Sequence[float],
    batch_size: int,
    lock=None,
) -> np.ndarray:
    """Blended probability ``(h, w)`` float32 for the block at global offset (gy, gx).

    ``reflectance`` (band, H, W) and ``clear`` (H, W) are array-likes over the whole cube
    (lazy is fine: only the needed window span is read). Predicts every window touching the
    block (the whole image when the block is the image).
    """
    H, W = clear.shape
    ok = np.asarray(clear[gy : gy + h, gx : gx + w]) > 0
    if not ok.any():  # an all-nodata / all-cloud block: nothing to predict
        return np.full((h, w), np.nan, dtype="float32")
    rs = _touching(_grid(H, window, overlap), gy, gy + h, window)
    cs = _touching(_grid(W, window, overlap), gx, gx + w, window)
    acc = _weighted_sum(
        model,
        reflectance,
        clear,
        rs,
        cs,
        window=window,
        reflectance_max=reflectance_max,
        batch_size=batch_size,
        lock=lock,
    )
    assert acc is not None  # the windows covering a clear pixel are never skipped
    y_lo, x_lo = int(rs.min()), int(cs.min())
    prob = acc[gy - y_lo : gy - y_lo + h, gx - x_lo : gx - x_lo + w] / np.maximum(
        _weight_sum(rs, cs, window, gy, gx, h, w), 1e-12
    )
    return np.where(ok, prob, np.nan).astype("float32")
