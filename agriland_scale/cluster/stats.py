"""Per-cluster statistics of the cube's pixels, a map-reduce over the clustered patches.

:func:`cluster_stats` gives each cluster's size, valid pixels, mean NDVI and mean reflectance.
The patch grid is cut into square blocks of whole patches of bounded size; each task (on a
Dask worker, reading the run's store itself, or here without a client) reads the window of
its block's clustered patches once and sums them by cluster, and the partial sums are added
in block order. The gallery's sample patches (:mod:`.report`) are read by the same tasks.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.errors import ConfigError, CorruptInput
from agriland_scale.render import RGB, check_bands

__all__ = ["WINDOW_BYTES", "check_labels", "cluster_stats", "stats_and_samples", "stats_table"]

# float32 reflectance a statistics task reads at once (4 bands: a 1448 px window, 100 patches of
# 256 px at stride 128; a full tile: about 70 tasks)
WINDOW_BYTES = 32 * 2**20


# ---------------------------------------------------------------------------- reading


def check_labels(index: xr.Dataset, labels: np.ndarray, k: int) -> np.ndarray:
    """Return ``labels`` as int64, checked against the patch ``index`` and ``k``."""
    labels = np.asarray(labels)
    if labels.shape != (index.sizes["patch"],):
        raise CorruptInput(
            f"{labels.shape[0] if labels.ndim else 0} cluster labels for "
            f"{index.sizes['patch']} patches: the clusters and patches groups come "
            "from different runs; rerun the clusters stage"
        )
    if labels.size and labels.max() >= k:
        raise ConfigError(
            f"cluster labels go up to {int(labels.max())} but k = {k}: pass the run's cluster.k"
        )
    return labels.astype("int64")


# ---------------------------------------------------------------------------- statistics


def cluster_stats(
    cube: xr.Dataset,
    index: xr.Dataset,
    labels: np.ndarray,
    k: int,
    *,
    client: Any = None,
    store: Any = None,
    group: str = "cube",
    window_bytes: int = WINDOW_BYTES,
) -> xr.Dataset:
    """Per-cluster statistics ``(cluster)`` computed from the cube's pixels.

    Parameters
    ----------
    cube : Dataset with ``reflectance (band, y, x)`` float32 (bands include ``red``, ``nir``).
    index : the patch index (``y0``, ``x0``, attributes ``patch_size``, ``stride``), dims ``patch``.
    labels : ``(patch,)`` int cluster of each patch; -1 = not clustered (ignored).
    k : number of clusters (clusters without patches get size 0 and NaN means).
    client, store, group : with a Dask ``client`` and the run's ``store``, the workers read
        the patches from the cube ``group`` of ``store`` (see below); otherwise this process
        reads them from ``cube``.
    window_bytes : float32 reflectance a task reads at once, every band (its memory: at most
        about five times that).

    Returns
    -------
    Dataset with ``size`` (patches, int64), ``valid_pixels`` (int64), ``ndvi_mean``
    (``(nir - red) / (nir + red)``, float64) and ``reflectance_mean (cluster, band)``
    (unitless). Means are over the valid pixels (every band finite) of the cluster's
    patches; a pixel in two overlapping patches of a cluster counts twice.

    Notes
    -----
    A map-reduce over blocks of patches: the patch grid is cut into square blocks of
    whole patches whose pixels fit ``window_bytes``; a task (``clusters-stats-...`` on the
    workers, in parallel) reads the window of its block's clustered patches once and sums,
    per cluster, the valid pixels, their reflectance and their NDVI. Each pixel is decoded and
    computed once per task, its sums kept by cells of ``gcd(size, stride)`` px, and a patch
    adds its cells: before, patches were read and summed one at a time (batches of 16), so
    each pixel was computed once per patch overlapping it (4 times at stride = size / 2) and
    each stored chunk decoded once per batch touching it. The partial sums are added here in
    block order: without a client the same blocks give the same numbers, bit for bit; against
    the former loop, the same counts and means within rounding (relative 1e-12).
    """
    return stats_and_samples(
        cube, index, labels, k, client=client, store=store, group=group, window_bytes=window_bytes
    )[0]


def stats_and_samples(
    cube: xr.Dataset,
    index: xr.Dataset,
    labels: np.ndarray,
    k: int,
    *,
    client: Any = None,
    store: Any = None,
    group: str = "cube",
    window_bytes: int = WINDOW_BYTES,
    shown: np.ndarray | None = None,
    step: int = 1,
) -> tuple[xr.Dataset, dict[int, np.ndarray]]:
    """:func:`cluster_stats`, and the RGB windows of the ``shown`` patches read on the way.

    ``shown``: patch positions (clustered ones) whose ``(3, side, side)`` float32 RGB window,
    every ``step``-th pixel, comes back with the statistics (the gallery's samples): they are
    read by the same tasks, not again.
    """
    check_bands(cube, ("red", "nir") + (RGB if shown is not None and len(shown) else ()))
    labels = check_labels(index, labels, k)
    size = int(index.attrs["patch_size"])
    stride = int(index.attrs.get("stride", size))
    bands = [str(b) for b in cube["band"].values]
    n_patches = np.bincount(labels[labels >= 0], minlength=k)[:k].astype("int64")
    sel = np.flatnonzero(labels >= 0)
    is_shown = np.isin(sel, np.asarray([] if shown is None else shown, dtype="int64"))
    y0, x0 = index["y0"].values[sel], index["x0"].values[sel]
    # blocks of n x n patches: a window of at most (n - 1) * stride + size px a side
    side = int(np.sqrt(window_bytes / (4 * len(bands))))
    span = max(1, (side - size) // stride + 1) * stride
    block = (y0 // span) * (int(x0.max(initial=0)) // span + 1) + x0 // span
    order = np.argsort(block, kind="stable")  # by block, in patch order within a block
    tasks = np.split(order, np.flatnonzero(np.diff(block[order])) + 1) if len(sel) else []
    args = [(sel[t], y0[t], x0[t], labels[sel[t]], is_shown[t]) for t in tasks]
    if client is not None and store is not None:
        token = uuid.uuid4().hex
        futures = [
            client.submit(_stats_task, store, group, *a, k, size, step, key=(f"clusters-stats-{token}", i))
            for i, a in enumerate(args)
        ]
        parts = client.gather(futures)  # a few numbers a cluster, and the shown windows
    else:
        parts = [_partial_stats(cube, *a, k, size, step) for a in args]
    sums, counts = np.zeros((k, len(bands) + 1)), np.zeros((k, 2), dtype="int64")
    samples: dict[int, np.ndarray] = {}
    for part_sums, part_counts, part_samples in parts:  # in block order: the same sums every time
        sums += part_sums
        counts += part_counts
        samples.update(part_samples)
    band_sum, ndvi_sum = sums[:, :-1], sums[:, -1]
    pix_n, ndvi_n = counts[:, 0], counts[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ndvi = np.where(ndvi_n > 0, ndvi_sum / np.maximum(ndvi_n, 1), np.nan)
        refl = np.where(pix_n[:, None] > 0, band_sum / np.maximum(pix_n, 1)[:, None], np.nan)
    ds = xr.Dataset(
        {
            "size": ("cluster", n_patches),
            "valid_pixels": ("cluster", pix_n),
            "ndvi_mean": ("cluster", ndvi),
            "reflectance_mean": (("cluster", "band"), refl),
        },
        coords={"cluster": np.arange(k), "band": np.array(bands, dtype=object)},
    )
    ds["size"].attrs.update(units="patches", long_name="patches in the cluster")
    ds["valid_pixels"].attrs.update(
        units="pixels", long_name="valid pixels summed over the cluster's patches"
    )
    ds["ndvi_mean"].attrs.update(units="1", long_name="mean NDVI (nir - red) / (nir + red)")
    ds["reflectance_mean"].attrs.update(units="1", long_name="mean reflectance")
    ds.attrs.update(patch_size=size)
    return ds, samples


def _partial_stats(
    cube: xr.Dataset,
    ids: np.ndarray,
    y0: np.ndarray,
    x0: np.ndarray,
    labels: np.ndarray,
    shown: np.ndarray,
    k: int,
    size: int,
    step: int,
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Sum one block's patches by cluster, from one read of their window.

    Returns ``sums (k, bands + 1)`` (reflectance per band, then NDVI), ``counts (k, 2)``
    (valid pixels, pixels with an NDVI) and ``{patch: RGB window}`` of its ``shown`` patches.
    """
    bands = [str(b) for b in cube["band"].values]
    i_red, i_nir = bands.index("red"), bands.index("nir")
    rgb = [bands.index(b) for b in RGB] if shown.any() else []
    sums, counts = np.zeros((k, len(bands) + 1)), np.zeros((k, 2), dtype="int64")
    samples = {}
    ys, xs = int(y0.min()), int(x0.min())
    ye, xe = int(y0.max()) + size, int(x0.max()) + size
    # float32, as read_windows reads it (a packed cube opened without dask decodes to float64)
    window = np.asarray(cube["reflectance"].isel(y=slice(ys, ye), x=slice(xs, xe)).values, dtype="float32")
    for i, a, b, show in zip(ids, y0 - ys, x0 - xs, shown):
        if show:
            samples[int(i)] = np.ascontiguousarray(window[rgb, a : a + size : step, b : b + size : step])
    # sums over cells of cs x cs px (every patch is whole cells), each pixel computed once
    # however many patches overlap it; a patch's sums are those of its cells
    cs = int(np.gcd.reduce(np.concatenate([[size], y0 - ys, x0 - xs])))
    ok = np.isfinite(window).all(0)  # valid: every band finite

    def cells(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0] // cs, cs, a.shape[1] // cs, cs).sum(axis=(1, 3))

    planes = [cells(np.where(ok, window[j].astype("float64"), 0.0)) for j in range(len(bands))]
    red = np.where(ok, window[i_red].astype("float64"), 0.0)
    nir = np.where(ok, window[i_nir].astype("float64"), 0.0)
    den = nir + red
    good = ok & (den != 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        planes.append(cells(np.where(good, (nir - red) / den, 0.0)))
    del window, red, nir, den
    sum_cells = np.stack(planes, axis=-1)  # (cells y, cells x, bands + 1)
    count_cells = np.stack([cells(ok.astype("int64")), cells(good.astype("int64"))], axis=-1)
    n = size // cs
    for a, b, c in zip((y0 - ys) // cs, (x0 - xs) // cs, labels):
        sums[c] += sum_cells[a : a + n, b : b + n].sum(axis=(0, 1))
        counts[c] += count_cells[a : a + n, b : b + n].sum(axis=(0, 1))
    return sums, counts, samples


def _stats_task(store: Any, group: str, *args: Any) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """:func:`_partial_stats` of one block of patches of the stored cube ``group`` (runs on a worker)."""
    from agriland_scale.store import open_cube

    return _partial_stats(open_cube(store, group, dask=False), *args)


def stats_table(stats: xr.Dataset) -> Any:
    """``stats`` as a pandas DataFrame: one row a cluster, ``<band>_mean`` columns."""
    import pandas as pd

    df = pd.DataFrame(
        {
            "cluster": stats["cluster"].values,
            "size": stats["size"].values,
            "valid_pixels": stats["valid_pixels"].values,
            "ndvi_mean": stats["ndvi_mean"].values,
        }
    )
    for j, b in enumerate(stats["band"].values):
        df[f"{b}_mean"] = stats["reflectance_mean"].values[:, j]
    return df
