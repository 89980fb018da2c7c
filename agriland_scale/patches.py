"""Patches: a grid of square windows over the cube, and their georeferenced index.

Also the blending of window predictions back into a seamless mosaic.

Pixel offsets are (row, col) of the top-left pixel in the cube's grid; bounds are in the
cube's CRS (metres). Patches are read from the cube with ``isel``, never copied to disk.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import xarray as xr
from affine import Affine

from agriland_scale.config.bands import ReflectanceMax, reflectance_scale
from agriland_scale.errors import RegionError

__all__ = [
    "blend_weight",
    "iter_batches",
    "patch_grid",
    "patch_index",
    "patch_map_transform",
    "patch_valid_fraction",
    "read_patches",
    "read_windows",
    "window_starts",
]


def patch_grid(height: int, width: int, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixel offsets (rows, cols) of every whole ``size`` patch at ``stride``.

    Only patches that lie entirely inside the image are kept; a margin narrower than a
    stride at the bottom/right is not covered by any patch.
    """
    if size > min(height, width):
        raise RegionError(
            f"the region's cube is {height} x {width} px, smaller than one patch of "
            f"{size} x {size} px (patches.size): enlarge search.bbox / search.region "
            "(a patch covers size x cube.resolution metres a side) or lower patches.size"
        )
    rows = np.arange(0, height - size + 1, stride)
    cols = np.arange(0, width - size + 1, stride)
    return rows, cols


def patch_index(
    cube: xr.Dataset,
    size: int,
    stride: int,
    client: Any = None,
    *,
    store: Any = None,
    group: str = "cube",
    window_bytes: int = 64 * 2**20,
) -> xr.Dataset:
    """Georeferenced index of the patch grid over ``cube`` (dims ``patch``).

    Variables: ``row``/``col`` (grid position), ``y0``/``x0`` (top-left pixel offsets),
    ``minx, miny, maxx, maxy`` (bounds in the cube CRS, metres) and ``valid_fraction``
    (fraction of pixels with a clear observation, computed from ``clear_count``).

    The valid fractions are counted window by window (:func:`patch_valid_fraction`), each
    window a block of whole patches of at most about ``window_bytes`` of ``clear_count`` with
    its halo (a patch is never cut by a window's edge). With ``client`` and ``store`` the
    workers count them, one task (``patches-index-...``) a window, each reading ``group`` of
    the run's ``store`` itself and returning one number a patch: this process never holds
    the pixels, nor a count per pixel block. Otherwise they are counted here, window by
    window, from ``cube`` (a dask-backed one through the current scheduler).
    """
    h, w = cube.sizes["y"], cube.sizes["x"]
    rows, cols = patch_grid(h, w, size, stride)
    rr, cc = np.meshgrid(np.arange(len(rows)), np.arange(len(cols)), indexing="ij")
    y0, x0 = rows[rr.ravel()], cols[cc.ravel()]
    t = cube.rio.transform()
    minx, maxy = t @ (x0, y0)
    maxx, miny = t @ (x0 + size, y0 + size)
    frac = patch_valid_fraction(
        cube["clear_count"], size, stride, client=client, store=store, group=group, window_bytes=window_bytes
    ).ravel()
    idx = xr.Dataset(
        {
            "row": ("patch", rr.ravel().astype("int32")),
            "col": ("patch", cc.ravel().astype("int32")),
            "y0": ("patch", y0.astype("int64")),
            "x0": ("patch", x0.astype("int64")),
            "minx": ("patch", np.asarray(minx, "float64")),
            "miny": ("patch", np.asarray(miny, "float64")),
            "maxx": ("patch", np.asarray(maxx, "float64")),
            "maxy": ("patch", np.asarray(maxy, "float64")),
            "valid_fraction": ("patch", frac),
        },
        coords={"patch": np.arange(len(y0), dtype="int64")},
        attrs={
            "patch_size": size,
            "stride": stride,
            "crs": str(cube.rio.crs),
            "n_rows": len(rows),
            "n_cols": len(cols),
        },
    )
    unit = cube["x"].attrs.get("units", "m")  # CF: a long_name on every variable, units where any
    for name, long_name, units in (
        ("patch", "patch number", None),
        ("row", "row of the patch in the patch grid", None),
        ("col", "column of the patch in the patch grid", None),
        ("y0", "first pixel row of the patch in the cube", None),
        ("x0", "first pixel column of the patch in the cube", None),
        ("minx", "smallest x of the patch (cube CRS)", unit),
        ("miny", "smallest y of the patch (cube CRS)", unit),
        ("maxx", "largest x of the patch (cube CRS)", unit),
        ("maxy", "largest y of the patch (cube CRS)", unit),
        ("valid_fraction", "fraction of the patch's pixels with a clear observation", "1"),
    ):
        idx[name].attrs.update({"long_name": long_name} | ({"units": units} if units else {}))
    return idx


def patch_valid_fraction(
    count: xr.DataArray,
    size: int,
    stride: int,
    *,
    client: Any = None,
    store: Any = None,
    group: str = "cube",
    window_bytes: int = 64 * 2**20,
) -> np.ndarray:
    """Fraction of each patch's pixels with a clear observation, ``(n_rows, n_cols)`` float32.

    ``count`` is the cube's ``(y, x)`` ``clear_count``; patches are those of
    :func:`patch_grid`. The patch grid is split into windows of whole patches (each window's
    pixels at most about ``window_bytes`` of ``count``, patches of neighbouring windows
    overlapping when ``stride < size``); a window counts its clear pixels by ``gcd(size,
    stride)`` cells and adds them per patch through their integral image. The counts are
    exact integers, so the result does not depend on the windows nor on where they are
    counted: with ``client`` and ``store`` by the workers (tasks ``patches-index-...`` reading
    ``group`` of ``store``), otherwise here from ``count``.
    """
    h, w = count.sizes["y"], count.sizes["x"]
    rows, cols = patch_grid(h, w, size, stride)
    side = max(size, int(np.sqrt(window_bytes / count.dtype.itemsize)))
    n = max(1, (side - size) // stride + 1)  # patches a window side
    windows = [
        (rows[i : i + n], cols[j : j + n]) for i in range(0, len(rows), n) for j in range(0, len(cols), n)
    ]
    if client is not None and store is not None:
        token = uuid.uuid4().hex
        futures = client.map(
            _patch_fraction_task,
            [store] * len(windows),
            [group] * len(windows),
            [r for r, _ in windows],
            [c for _, c in windows],
            [size] * len(windows),
            [stride] * len(windows),
            key=[(f"patches-index-{token}", i) for i in range(len(windows))],
        )
        parts = client.gather(futures)  # one number a patch
    else:
        parts = [_window_fraction(count, r, c, size, stride) for r, c in windows]
    out = np.empty((len(rows), len(cols)), dtype="float32")
    for (r, c), part in zip(windows, parts):
        i, j = int(r[0]) // stride, int(c[0]) // stride
        out[i : i + len(r), j : j + len(c)] = part
    return out


def _window_fraction(
    count: xr.DataArray, rows: np.ndarray, cols: np.ndarray, size: int, stride: int
) -> np.ndarray:
    """Count the valid fractions ``(len(rows), len(cols))`` of the patches at ``rows`` x ``cols`` in one window."""
    from agriland_scale.cube.masks import clear_block_counts

    cs = math.gcd(size, stride)
    y, x = int(rows[0]), int(cols[0])
    # the window starts on a patch and spans whole cs cells (offsets step by stride, sides are size)
    cells = clear_block_counts(count, slice(y, int(rows[-1]) + size), slice(x, int(cols[-1]) + size), cs)
    ii = np.pad(cells.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = size // cs
    r, c = np.meshgrid((rows - y) // cs, (cols - x) // cs, indexing="ij")
    total = ii[r + k, c + k] - ii[r, c + k] - ii[r + k, c] + ii[r, c]
    return (total / size**2).astype("float32")


def _patch_fraction_task(
    store: Any, group: str, rows: np.ndarray, cols: np.ndarray, size: int, stride: int
) -> np.ndarray:
    """:func:`_window_fraction` of one window of the stored cube ``group`` (runs on a worker)."""
    from agriland_scale.store import open_cube

    return _window_fraction(open_cube(store, group, dask=False)["clear_count"], rows, cols, size, stride)


def patch_map_transform(cube_transform: Affine, size: int, stride: int) -> Affine:
    """Return the transform of a map with one pixel a patch, in the cube's CRS.

    Pixel (r, c) covers the central ``stride`` x ``stride`` area of patch (r, c) (the whole
    patch when stride == size).

    Parameters
    ----------
    cube_transform : affine.Affine
        The cube grid's transform (metres, UTM).
    size : int
        Patch side, pixels.
    stride : int
        Patch stride, pixels.

    Returns
    -------
    affine.Affine
        The map's transform: pixels ``stride`` cube pixels a side.
    """
    off = (size - stride) / 2
    return cube_transform @ Affine.translation(off, off) @ Affine.scale(stride)


def iter_batches(n: int, batch: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``batch`` elements."""
    for start in range(0, n, batch):
        yield slice(start, min(start + batch, n))


def read_windows(reflectance: xr.DataArray, y0: np.ndarray, x0: np.ndarray, size: int) -> np.ndarray:
    """Read square windows of the cube as ``(n, band, size, size)`` float32, NaN (no data) kept.

    Parameters
    ----------
    reflectance : xarray.DataArray
        ``(band, y, x)`` reflectance (unitless), dask-backed or lazily indexed.
    y0, x0 : numpy.ndarray
        ``(n,)`` top-left pixel offsets of the windows in the cube grid.
    size : int
        Window side, pixels; every window lies inside the cube.

    Returns
    -------
    numpy.ndarray
        ``(n, band, size, size)`` float32.

    Notes
    -----
    Windows are read in spans: the windows of one grid row (or all of them, when their
    bounding box is at most twice their total area) come from one read, so each stored chunk
    is decoded once rather than once per overlapping window. A dask-backed cube is computed
    once for all spans (one graph, shared chunk reads).
    """
    y0, x0 = np.asarray(y0, dtype="int64"), np.asarray(x0, dtype="int64")
    out = np.empty((len(y0), reflectance.sizes["band"], size, size), dtype="float32")
    if len(y0) == 0:
        return out
    span = (y0.max() - y0.min() + size) * (x0.max() - x0.min() + size)
    groups = (
        [np.arange(len(y0))]
        if span <= 2 * len(y0) * size**2
        else [np.flatnonzero(y0 == r) for r in np.unique(y0)]
    )
    corners = [(int(y0[g].min()), int(x0[g].min())) for g in groups]
    parts = [
        reflectance.isel(y=slice(ys, int(y0[g].max()) + size), x=slice(xs, int(x0[g].max()) + size))
        for g, (ys, xs) in zip(groups, corners)
    ]
    if reflectance.chunks is not None:
        import dask

        spans = dask.compute(*[a.data for a in parts])
    else:
        spans = [np.asarray(a) for a in parts]
    for g, (ys, xs), block in zip(groups, corners, spans):
        for i in g:
            a, b = int(y0[i]) - ys, int(x0[i]) - xs
            out[i] = block[:, a : a + size, b : b + size]
    return out


def read_patches(
    reflectance: xr.DataArray,
    y0: np.ndarray,
    x0: np.ndarray,
    size: int,
    bands: list[str],
    reflectance_max: ReflectanceMax | Sequence[float],
) -> np.ndarray:
    """Read patches as a model input batch ``(n, size, size, n_bands)`` float32 in [0, 1].

    Parameters
    ----------
    reflectance : xarray.DataArray
        ``(band, y, x)`` reflectance of the cube.
    y0, x0 : numpy.ndarray
        ``(n,)`` top-left pixel offsets of the patches.
    size : int
        Patch side, pixels.
    bands : list of str
        The model's bands, in its order.
    reflectance_max : float, 'auto', mapping or sequence of float
        Reflectance that maps to 1 (:func:`normalise`), one for every band or per band
        (:func:`~agriland_scale.config.bands.reflectance_scale`); NaN (no data) becomes 0.

    Returns
    -------
    numpy.ndarray
        ``(n, size, size, n_bands)`` float32, band last (the Keras layout).
    """
    windows = read_windows(reflectance.sel(band=bands), y0, x0, size)
    scale = reflectance_scale(reflectance_max, bands)
    return normalise(np.ascontiguousarray(np.moveaxis(windows, 1, -1)), scale)


def normalise(x: np.ndarray, reflectance_max: float | Sequence[float]) -> np.ndarray:
    """Make model input from float32 reflectance, band last ``(..., n_bands)``, in place.

    Returns ``x / reflectance_max`` clipped to [0, 1], NaN (no data) and -inf to 0, +inf to 1.
    ``reflectance_max``: one reflectance for every band, or one a band (``(n_bands,)``, along
    the last axis).
    """
    rmax = np.asarray(reflectance_max, dtype="float32")
    np.fmax(x, 0.0, out=x)  # NaN -> 0 (fmax ignores NaN), negatives -> 0
    np.fmin(x, rmax, out=x)
    return np.divide(x, rmax, out=x)


def window_starts(length: int, window: int, stride: int, offset: int) -> np.ndarray:
    """Global window starts ``k * stride - offset`` covering ``[0, length)``.

    The grid is anchored at global pixel 0, so any block of the image asks for the same
    windows as a whole-image pass: blended results do not depend on how work is split.
    """
    last_needed = length - 1
    ks = np.arange(0, int(np.ceil((last_needed + offset + 1) / stride)) + 1)
    starts = ks * stride - offset
    return starts[(starts < length) & (starts + window > 0)]


def blend_weight(window: int, floor: float = 1e-3) -> np.ndarray:
    """Smooth 2-D blending weight ``(window, window)``: separable Hann (sin²), floored.

    Weights fall towards the window edges, so each mosaic pixel is dominated by the windows
    that see it near their centre; predictions are divided by the summed weight.
    """
    i = (np.arange(window) + 0.5) / window
    w1 = np.sin(np.pi * i) ** 2
    return np.maximum(np.outer(w1, w1), floor).astype("float32")
