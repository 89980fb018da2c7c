"""Clusters at region scale: k-means and DEC whose memory does not grow with the region.

:func:`fit_clusters_streaming` never holds all embeddings. It makes three passes over the
stored embeddings ``(patch, dim)``, one chunk of rows at a time:

1. draw a seeded sample of at most ``sample_size`` valid rows;
2. k-means: MiniBatchKMeans with ``n_init`` restarts on the sample, then ``partial_fit``
   over every chunk of valid rows starting from those centres;
3. DEC (:func:`agriland_scale.models.dec_refine.refine_centroids`: NumPy, no TensorFlow)
   refines the centres on the sample, then
   every chunk is soft-assigned and written to Zarr arrays (``labels``, ``kmeans_labels``,
   ``soft``, ``centroids``).

Memory is about one chunk (``chunk × dim × 8`` bytes) plus the DEC sample; DEC's own
soft assignment broadcasts ``(sample, k, dim)`` (``8 × sample_size × k × dim`` bytes at its
first target refresh), so lower ``sample_size`` for large ``k``. When every valid row fits
in the sample, the result does not depend on ``chunk``.

:func:`cluster_map` lays the labels out on the patch grid as a georeferenced raster.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from threadpoolctl import threadpool_limits

from agriland_scale.config.schema import ClusterConfig
from agriland_scale.errors import CorruptInput, EmptyRegion
from agriland_scale.models.dec_refine import refine_centroids, soft_assign
from agriland_scale.patches import patch_map_transform
from agriland_scale.store import write_georef

__all__ = ["NOT_CLUSTERED", "cluster_map", "fit_clusters_streaming", "read_rows", "sample_rows"]

log = logging.getLogger(__name__)

_SOFT_BYTES = 64 * 2**20  # budget of one soft-assignment broadcast (rows, k, dim) float64


def read_rows(emb: zarr.Array | xr.DataArray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of embeddings ``(patch, dim)`` as float32 (reads just those chunks)."""
    if isinstance(emb, xr.DataArray):
        return np.asarray(emb.isel({emb.dims[0]: slice(start, stop)}).values, dtype="float32")
    return np.asarray(emb[start:stop], dtype="float32")


def sample_rows(valid: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``size`` valid rows, drawn without replacement.

    All valid rows (in order) when there are no more than ``size``; the same draw for the
    same ``seed``.
    """
    rows = np.flatnonzero(valid)
    if len(rows) <= size:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _gather(emb: zarr.Array | xr.DataArray, rows: np.ndarray, chunk: int) -> np.ndarray:
    """Rows at sorted positions ``rows`` as float32 ``(len(rows), dim)``, reading chunk by chunk."""
    out = np.empty((len(rows), emb.shape[1]), dtype="float32")
    for start, stop in _chunks(emb.shape[0], chunk):
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            out[lo:hi] = read_rows(emb, start, stop)[rows[lo:hi] - start]
    return out


def _soft(z: np.ndarray, centroids: np.ndarray, alpha: float) -> np.ndarray:
    """:func:`soft_assign` in row blocks, so its ``(rows, k, dim)`` broadcast stays small."""
    k, d = centroids.shape
    step = max(1, _SOFT_BYTES // (8 * k * d))
    return np.concatenate(
        [soft_assign(z[i : i + step], centroids, alpha) for i in range(0, len(z), step)]
        or [np.empty((0, k), dtype="float32")]
    )


def _output(out: zarr.Group | str | Path, n: int, k: int, dim: int, chunk: int) -> dict[str, zarr.Array]:
    group = out if isinstance(out, zarr.Group) else zarr.open_group(str(out), mode="a", zarr_format=3)
    spec = {
        "labels": ((n,), (chunk,), "int16", -1, ["patch"]),
        "kmeans_labels": ((n,), (chunk,), "int16", -1, ["patch"]),
        "soft": ((n, k), (chunk, k), "float32", np.nan, ["patch", "cluster"]),
        "centroids": ((k, dim), (k, dim), "float32", np.nan, ["cluster", "dim"]),
    }
    arrays = {}
    for name, (shape, chunks, dtype, fill, dims) in spec.items():
        kw: dict[str, Any] = {"dimension_names": dims} if group.metadata.zarr_format == 3 else {}
        arrays[name] = group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, overwrite=True, **kw
        )
        if group.metadata.zarr_format == 2:
            arrays[name].attrs["_ARRAY_DIMENSIONS"] = dims
    return arrays


# one OpenMP/BLAS thread: scikit-learn's OpenMP threads spin while they wait, and on a worker
# beside other tasks MiniBatchKMeans (7,000 x 100, n_init 20) took 2.5-3.9 s against
# 0.13-0.16 s with one thread (a loaded 2-core machine)
@threadpool_limits.wrap(limits=1)
def fit_clusters_streaming(
    emb: zarr.Array | xr.DataArray,
    valid: np.ndarray,
    cfg: ClusterConfig,
    seed: int,
    *,
    out: zarr.Group | str | Path,
    sample_size: int = 10_000,
    chunk: int = 65_536,
) -> dict[str, Any]:
    """Run k-means then DEC over stored embeddings, one chunk of rows in memory at a time.

    Parameters
    ----------
    emb : embeddings ``(patch, dim)``, a Zarr array or a (lazy) DataArray.
    valid : ``(patch,)`` bool, rows to cluster (the others get label -1 and NaN soft).
    cfg : ``k``, ``n_init``, ``kmeans_batch_size`` and the DEC settings.
    seed : seeds the sample, k-means and DEC: the same seed gives the same labels.
    out : Zarr group (or its path, created as Zarr v3) receiving ``labels (patch)`` int16,
        ``kmeans_labels (patch)`` int16, ``soft (patch, cluster)`` float32 (rows sum to 1)
        and ``centroids (cluster, dim)`` float32, with dimension names (``xr.open_zarr`` reads
        them). Existing arrays of these names are replaced.
    sample_size : most rows DEC is trained on (and k-means restarts are run on).
    chunk : rows read at a time.

    Returns
    -------
    dict with timings (s), ``dec_iterations``, ``dec_last_delta``, ``dec_converged``,
    ``n_clustered``, ``n_sample``, ``sizes`` (patches a cluster) and ``changed_vs_kmeans``.
    """
    n, dim = int(emb.shape[0]), int(emb.shape[1])
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n,):
        raise CorruptInput(
            f"valid mask has shape {valid.shape} for {n} embeddings: they come from "
            "different runs; rerun the patches stage"
        )
    n_valid = int(valid.sum())
    if n_valid < cfg.k:
        raise EmptyRegion(
            f"only {n_valid} valid patches for cluster.k = {cfg.k} clusters: lower "
            "cluster.k, or use a larger region / smaller patches.stride"
        )
    t0 = time.perf_counter()
    rows = sample_rows(valid, sample_size, seed)
    z = _gather(emb, rows, chunk)
    from sklearn.cluster import MiniBatchKMeans  # here: the run's own process never imports sklearn

    km = MiniBatchKMeans(
        n_clusters=cfg.k, n_init=cfg.n_init, batch_size=cfg.kmeans_batch_size, random_state=seed
    )
    km.fit(z.astype("float64"))
    if len(rows) < n_valid:  # refine on every row, starting from the sample's centres
        km = MiniBatchKMeans(
            n_clusters=cfg.k,
            init=km.cluster_centers_,
            n_init=1,
            batch_size=cfg.kmeans_batch_size,
            random_state=seed,
        )
        for start, stop in _chunks(n, chunk):
            block = read_rows(emb, start, stop)[valid[start:stop]]
            if len(block) >= cfg.k:
                km.partial_fit(block.astype("float64"))
    t_km = time.perf_counter() - t0
    d = cfg.dec
    res = refine_centroids(
        z,
        km.cluster_centers_,
        alpha=d.alpha,
        max_iter=d.max_iter,
        update_interval=d.update_interval,
        tol=d.tol,
        batch_size=d.batch_size,
        learning_rate=d.learning_rate,
        momentum=d.momentum,
        seed=seed,
    )
    del z
    t_dec = time.perf_counter() - t0 - t_km
    arrays = _output(out, n, cfg.k, dim, chunk)
    arrays["centroids"][:] = res.centroids.astype("float32")
    sizes = np.zeros(cfg.k, dtype="int64")
    changed = 0
    for start, stop in _chunks(n, chunk):
        ok = valid[start:stop]
        block = read_rows(emb, start, stop)[ok]
        soft = np.full((stop - start, cfg.k), np.nan, dtype="float32")
        labels = np.full(stop - start, -1, dtype="int16")
        km_labels = np.full(stop - start, -1, dtype="int16")
        if len(block):
            soft[ok] = _soft(block, res.centroids, d.alpha)
            labels[ok] = soft[ok].argmax(1)
            km_labels[ok] = km.predict(block.astype("float64"))
        arrays["soft"][start:stop] = soft
        arrays["labels"][start:stop] = labels
        arrays["kmeans_labels"][start:stop] = km_labels
        sizes += np.bincount(labels[ok], minlength=cfg.k)
        changed += int((labels[ok] != km_labels[ok]).sum())
    t_soft = time.perf_counter() - t0 - t_km - t_dec
    log.info("clustered %d patches (DEC sample %d) in %.1f s", n_valid, len(rows), t_km + t_dec + t_soft)
    return {
        "kmeans_seconds": t_km,
        "dec_seconds": t_dec,
        "assign_seconds": t_soft,
        "dec_iterations": res.iterations,
        "dec_last_delta": res.last_delta,
        "dec_converged": res.converged,
        "n_clustered": n_valid,
        "n_sample": int(len(rows)),
        "sizes": sizes.tolist(),
        "changed_vs_kmeans": changed / n_valid,
    }


# the meaning of -1, the CF _FillValue of cluster ids (labels, kmeans_labels, cluster_map)
NOT_CLUSTERED = (
    "-1 (_FillValue): patch not clustered (too little valid data); xarray reads it as "
    "NaN, agriland_scale.store.open_product keeps the int16 ids and -1"
)


def cluster_map(labels: np.ndarray, index: xr.Dataset, cube: xr.Dataset) -> xr.DataArray:
    """Build the georeferenced cluster map ``(y, x)`` int16, one pixel a patch.

    -1 = no cluster, its CF ``_FillValue`` and Zarr ``fill_value``. The map is in the cube's
    CRS, on the patch grid (one pixel per stride).

    Parameters
    ----------
    labels : numpy.ndarray
        Cluster id of each patch ``(patch,)``, in the order of ``index`` (NaN or -1 where not
        clustered).
    index : xarray.Dataset
        The patch index (``row``, ``col``; attrs ``n_rows``, ``n_cols``, ``patch_size``,
        ``stride``).
    cube : xarray.Dataset
        The cube whose grid (transform, CRS) the patches were cut from.

    Returns
    -------
    xarray.DataArray
        ``cluster_map`` ``(y, x)`` int16 in the cube's CRS.
    """
    nr, nc = int(index.attrs["n_rows"]), int(index.attrs["n_cols"])
    grid = np.full((nr, nc), -1, dtype="int16")
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":  # ids read with CF masking: NaN where not clustered
        labels = np.where(np.isnan(labels), -1, labels)
    grid[index["row"].values, index["col"].values] = labels
    t = patch_map_transform(cube.rio.transform(), int(index.attrs["patch_size"]), int(index.attrs["stride"]))
    xs = t.c + t.a * (np.arange(nc) + 0.5)
    ys = t.f + t.e * (np.arange(nr) + 0.5)
    da = xr.DataArray(grid, dims=("y", "x"), coords={"y": ys, "x": xs}, name="cluster_map")
    da.attrs.update(long_name="DEC cluster per patch", comment=NOT_CLUSTERED)
    da.encoding.update(_FillValue=np.int16(-1), fill_value=np.int16(-1))
    return write_georef(da.to_dataset(), cube.rio.crs)["cluster_map"]
