"""Clusters: MiniBatch k-means seeds DEC, which refines the centroids; every patch gets a
hard label and soft assignments, and a georeferenced cluster map (one pixel a patch).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import xarray as xr
from sklearn.cluster import MiniBatchKMeans

from .config import ClusterConfig
from .cube import write_georef
from .errors import EmptyRegion
from .models.dec import fit_dec, soft_assign
from .patches import patch_map_transform

__all__ = ["cluster_embeddings", "cluster_map", "kmeans_streaming"]

log = logging.getLogger(__name__)

# the meaning of -1, the CF _FillValue of cluster ids (labels, kmeans_labels, cluster_map)
NOT_CLUSTERED = ("-1 (_FillValue): patch not clustered (too little valid data); xarray reads it as "
                 "NaN, agriland_scale.publish.open_product keeps the int16 ids and -1")


def kmeans_streaming(emb: xr.DataArray, valid: np.ndarray, k: int, *, n_init: int, batch_size: int,
                     seed: int, chunk: int = 65_536) -> MiniBatchKMeans:
    """MiniBatchKMeans over the valid rows of ``emb (patch, dim)``.

    When all valid embeddings fit in one ``chunk`` they are fitted at once (``n_init``
    restarts); otherwise ``partial_fit`` streams chunks read from the (Zarr-backed) array.
    """
    km = MiniBatchKMeans(n_clusters=k, n_init=n_init, batch_size=batch_size, random_state=seed)
    n = emb.sizes["patch"]
    if valid.sum() <= chunk:
        km.fit(np.asarray(emb.values[valid], dtype="float64"))
        return km
    for start in range(0, n, chunk):
        block = np.asarray(emb.isel(patch=slice(start, start + chunk)).values, dtype="float64")
        block = block[valid[start:start + chunk]]
        if len(block) >= k:
            km.partial_fit(block)
    return km


def cluster_embeddings(emb: xr.DataArray, valid: np.ndarray, cfg: ClusterConfig, *, seed: int
                       ) -> tuple[xr.Dataset, dict]:
    """k-means then DEC on embeddings ``(patch, dim)``; returns labels, soft assignments, info.

    ``labels`` (patch) int16, -1 where invalid; ``soft`` (patch, cluster) float32 DEC
    soft assignments (rows sum to 1), NaN where invalid; ``centroids`` (cluster, dim).
    """
    n_valid = int(valid.sum())
    if n_valid < cfg.k:
        raise EmptyRegion(f"only {n_valid} valid patches for cluster.k = {cfg.k} clusters: lower "
                          "cluster.k, or use a larger region / smaller patches.stride")
    t0 = time.perf_counter()
    km = kmeans_streaming(emb, valid, cfg.k, n_init=cfg.n_init, batch_size=cfg.kmeans_batch_size, seed=seed)
    t_km = time.perf_counter() - t0
    z = np.asarray(emb.values[valid], dtype="float32")  # DEC's training sample (all, at demo scale)
    d = cfg.dec
    res = fit_dec(z, km.cluster_centers_, alpha=d.alpha, max_iter=d.max_iter,
                  update_interval=d.update_interval, tol=d.tol, batch_size=d.batch_size,
                  learning_rate=d.learning_rate, momentum=d.momentum, seed=seed)
    n = emb.sizes["patch"]
    soft = np.full((n, cfg.k), np.nan, dtype="float32")
    soft[valid] = soft_assign(z, res.centroids, d.alpha)
    labels = np.full(n, -1, dtype="int16")
    labels[valid] = soft[valid].argmax(1)
    km_labels = np.full(n, -1, dtype="int16")
    km_labels[valid] = km.predict(z.astype("float64"))
    ds = xr.Dataset(
        {"labels": ("patch", labels), "kmeans_labels": ("patch", km_labels),
         "soft": (("patch", "cluster"), soft),
         "centroids": (("cluster", "dim"), res.centroids.astype("float32"))},
        coords={"patch": emb["patch"].values, "cluster": np.arange(cfg.k)},
    )
    for name in ("labels", "kmeans_labels"):  # -1 is the CF _FillValue (and Zarr fill_value)
        ds[name].encoding.update(_FillValue=np.int16(-1), fill_value=np.int16(-1))
    ds["labels"].attrs.update(long_name="DEC cluster", comment=NOT_CLUSTERED)
    ds["kmeans_labels"].attrs.update(long_name="k-means cluster", comment=NOT_CLUSTERED)
    info = {"kmeans_seconds": t_km, "dec_seconds": time.perf_counter() - t0 - t_km,
            "dec_iterations": res.iterations, "dec_last_delta": res.last_delta,
            "dec_converged": res.converged, "n_clustered": n_valid,
            "changed_vs_kmeans": float((labels[valid] != km_labels[valid]).mean())}
    return ds, info


def cluster_map(labels: np.ndarray, index: xr.Dataset, cube: xr.Dataset) -> xr.DataArray:
    """Georeferenced cluster map ``(y, x)`` int16, one pixel a patch (-1 = no cluster, its CF
    ``_FillValue`` and Zarr ``fill_value``)."""
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
