"""Cluster report: what each DEC cluster looks like, so a person can pick the arable ones.

Per cluster: its size, mean NDVI and mean reflectance (:func:`cluster_stats`), a gallery of
sample patches (:func:`write_gallery`) and a t-SNE map of the embeddings
(:func:`write_embedding_map`); :func:`write_cluster_products` writes all three for a run.

Patches are read from the cube through the patch index (``y0``/``x0`` pixel offsets and
the ``patch_size`` attribute), at most one batch of patches at a time: the report's
memory does not grow with the region.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.errors import AgrilandWarning, ConfigError, CorruptInput, EmptyRegion
from agriland_scale.files import atomic_path
from agriland_scale.patches import read_windows
from agriland_scale.render import RGB, check_bands, figure_png, stretch_limits, to_rgb8

__all__ = [
    "cluster_stats",
    "sample_patches",
    "stats_table",
    "write_cluster_products",
    "write_embedding_map",
    "write_gallery",
]

log = logging.getLogger(__name__)

ROW_INCHES = 1.5  # height of one gallery row
COL_INCHES = 1.3  # width of one gallery column
DPI = 100
# a cube up to this size (decoded float32 reflectance) is read once for the statistics and
# the gallery instead of a batch of patches at a time (the demo region: 16 MB; a whole
# Sentinel-2 tile with 4 bands: 1.9 GB, read by batches)
IN_MEMORY_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------- reading


def _check_labels(index: xr.Dataset, labels: np.ndarray, k: int) -> np.ndarray:
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
    cube: xr.Dataset, index: xr.Dataset, labels: np.ndarray, k: int, *, batch: int = 16
) -> xr.Dataset:
    """Per-cluster statistics ``(cluster)`` computed from the cube's pixels.

    Parameters
    ----------
    cube : Dataset with ``reflectance (band, y, x)`` float32 (bands include ``red``, ``nir``).
    index : the patch index (``y0``, ``x0``, attribute ``patch_size``), dims ``patch``.
    labels : ``(patch,)`` int cluster of each patch; -1 = not clustered (ignored).
    k : number of clusters (clusters without patches get size 0 and NaN means).
    batch : patches read at a time (memory ≈ batch × bands × size² × 4 bytes).

    Returns
    -------
    Dataset with ``size`` (patches, int64), ``valid_pixels`` (int64), ``ndvi_mean``
    (``(nir - red) / (nir + red)``, float64) and ``reflectance_mean (cluster, band)``
    (unitless). Means are over the valid pixels (every band finite) of the cluster's
    patches; a pixel in two overlapping patches of a cluster counts twice.
    """
    check_bands(cube, ("red", "nir"))
    labels = _check_labels(index, labels, k)
    size = int(index.attrs["patch_size"])
    bands = [str(b) for b in cube["band"].values]
    i_red, i_nir = bands.index("red"), bands.index("nir")
    n_patches = np.bincount(labels[labels >= 0], minlength=k)[:k].astype("int64")
    ndvi_sum, ndvi_n = np.zeros(k), np.zeros(k, dtype="int64")
    band_sum, pix_n = np.zeros((k, len(bands))), np.zeros(k, dtype="int64")
    sel = np.flatnonzero(labels >= 0)
    y0, x0 = index["y0"].values, index["x0"].values
    for start in range(0, len(sel), batch):
        ids = sel[start : start + batch]
        win = read_windows(cube["reflectance"], y0[ids], x0[ids], size).astype("float64")
        for w, c in zip(win, labels[ids]):
            ok = np.isfinite(w).all(0)
            band_sum[c] += w[:, ok].sum(1)
            pix_n[c] += int(ok.sum())
            red, nir = w[i_red][ok], w[i_nir][ok]
            den = nir + red
            good = den != 0
            ndvi_sum[c] += ((nir[good] - red[good]) / den[good]).sum()
            ndvi_n[c] += int(good.sum())
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
    return ds


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


# ---------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Save a figure atomically (temporary file + rename), so reruns never leave half a PNG."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(figure_png(fig, DPI))


def sample_patches(labels: np.ndarray, cluster: int, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` patch positions of ``cluster``, sorted; the same for the same ``seed``.

    Each cluster draws from its own generator (``[seed, cluster]``), so one cluster's
    sample does not change when another cluster changes.
    """
    members = np.flatnonzero(np.asarray(labels) == cluster)
    if len(members) <= n:
        return members
    rng = np.random.default_rng([seed, cluster])
    return np.sort(rng.choice(members, size=n, replace=False))


def write_gallery(
    cube: xr.Dataset,
    index: xr.Dataset,
    labels: np.ndarray,
    k: int,
    path: str | Path,
    *,
    per_cluster: int = 8,
    seed: int = 0,
    stats: xr.Dataset | None = None,
    limits: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """PNG grid of sample patches: one row a cluster (``k`` rows), ``per_cluster`` columns.

    Each row is titled with the cluster id, its size in patches and its mean NDVI; patches
    are shown as RGB with one 2–98 % stretch a band for the whole region (so clusters compare).
    ``stats`` (from :func:`cluster_stats`) and ``limits`` are computed when not given.

    Returns ``{"path", "rows", "cols", "width_px", "height_px", "patches"}``, ``patches``
    mapping each cluster to the patch positions shown. The image is exactly
    ``rows × 150`` px high.
    """
    labels = _check_labels(index, labels, k)
    if per_cluster < 1:
        raise ConfigError(f"per_cluster must be at least 1, got {per_cluster}")
    check_bands(cube, RGB)
    stats = cluster_stats(cube, index, labels, k) if stats is None else stats
    lo, hi = stretch_limits(cube) if limits is None else limits
    size = int(index.attrs["patch_size"])
    rgb = cube["reflectance"].sel(band=list(RGB))
    y0, x0 = index["y0"].values, index["x0"].values
    plt = _pyplot()
    fig = plt.figure(figsize=(per_cluster * COL_INCHES, k * ROW_INCHES), dpi=DPI)
    rows = fig.subfigures(k, 1, squeeze=False)[:, 0]
    # one image a row (the row's patches side by side, a white gap between them), reduced to
    # about the size it is shown at: one Axes a row, not one a patch (6 x faster to draw)
    cell = max(1, round(min(COL_INCHES * DPI, ROW_INCHES * DPI) * 0.85))
    step = max(1, size // cell)
    side = -(-size // step)
    gap = max(1, side // 16)
    shown: dict[int, list[int]] = {}
    for c, sub in enumerate(rows):
        ids = sample_patches(labels, c, per_cluster, seed)
        shown[c] = ids.tolist()
        ndvi = float(stats["ndvi_mean"].values[c])
        sub.suptitle(
            f"cluster {c}: {int(stats['size'].values[c])} patches, mean NDVI "
            f"{'n/a' if np.isnan(ndvi) else f'{ndvi:.2f}'}",
            fontsize=9,
        )
        ax = sub.add_axes((0.01, 0.02, 0.98, 0.8))
        ax.set_axis_off()
        strip = np.full((side, per_cluster * (side + gap) - gap, 3), 255, dtype="uint8")
        win = read_windows(rgb, y0[ids], x0[ids], size)  # one row of patches in memory
        for j in range(len(ids)):
            x = j * (side + gap)
            strip[:, x : x + side] = to_rgb8(win[j][:, ::step, ::step], lo, hi)
            ax.text(x + 2, 2, str(int(index["patch"].values[ids[j]])), fontsize=6, color="w", va="top")
        ax.imshow(strip, interpolation="nearest", aspect="equal")
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    w, h = round(per_cluster * COL_INCHES * DPI), round(k * ROW_INCHES * DPI)
    return {
        "path": str(path),
        "rows": k,
        "cols": per_cluster,
        "width_px": w,
        "height_px": h,
        "patches": shown,
    }


def write_embedding_map(
    embeddings: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    *,
    seed: int = 0,
    max_points: int | None = 10_000,
) -> np.ndarray:
    """2-D t-SNE map of ``embeddings (n, dim)`` coloured by cluster, written as a PNG.

    Rows whose label is negative (not clustered) are left out; when more than
    ``max_points`` remain, a seeded sample of that many is mapped (t-SNE is quadratic in
    memory for small maps and slow for large ones). Perplexity is ``min(30, (m - 1) / 3)``
    for ``m`` mapped points; the result is the same for the same ``seed``.

    Returns
    -------
    ``(n, 2)`` float64 t-SNE coordinates, NaN for rows not mapped.
    """
    from sklearn.manifold import TSNE

    z = np.asarray(embeddings)
    labels = np.asarray(labels)
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(
            f"embeddings must be (n, dim) with one label a row; got {z.shape} and {labels.shape}"
        )
    rows = np.flatnonzero(labels >= 0)
    if max_points is not None and len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_points, replace=False))
    if len(rows) < 4:
        raise EmptyRegion(f"only {len(rows)} clustered embeddings: t-SNE needs at least 4")
    m = len(rows)
    tsne = TSNE(n_components=2, perplexity=min(30.0, (m - 1) / 3), init="pca", random_state=seed)
    xy = tsne.fit_transform(z[rows].astype("float32"))
    out = np.full((z.shape[0], 2), np.nan)
    out[rows] = xy
    lab = labels[rows]
    k = int(lab.max()) + 1
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=DPI, constrained_layout=True)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "turbo", k)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=lab, cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=12 if m < 2000 else 3)
    if k <= 20:
        ax.legend(*sc.legend_elements(), title="cluster", fontsize=7, loc="best")
    else:
        fig.colorbar(sc, ax=ax, label="cluster")
    ax.set_title(f"t-SNE of {m} patch embeddings (dim {z.shape[1]}), coloured by DEC cluster")
    ax.set_xticks([])
    ax.set_yticks([])
    _save(fig, Path(path))
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- run products


def write_cluster_products(
    store: str | Path,
    out_dir: str | Path,
    k: int,
    seed: int,
    *,
    per_cluster: int = 8,
    max_points: int = 10_000,
    zone: str = "",
) -> xr.Dataset:
    """Write ``OUT/clusters/{gallery.png, embedding_map.png, stats.csv}`` for a run's store.

    Reads the ``cube``, ``patches``, ``embeddings`` and ``clusters`` groups of ``store``
    (``OUT/agriland.zarr``); with ``zone`` (multi-zone runs) the groups ``ZONE/cube`` ...
    and the folder ``OUT/clusters/ZONE/``. Files are replaced atomically, so rerunning gives the same
    files (idempotent). Returns the :func:`cluster_stats` dataset.
    """
    from agriland_scale.store import open_cube, open_product

    pre = f"{zone}/" if zone else ""
    cube = open_cube(store, pre + "cube")
    if cube["reflectance"].nbytes <= IN_MEMORY_BYTES:  # one read, not one a batch of patches
        cube = cube.load()
    index = open_product(store, pre + "patches").load()
    labels = open_product(store, pre + "clusters")["labels"].values
    out = Path(out_dir) / "clusters" / zone
    out.mkdir(parents=True, exist_ok=True)
    stats = cluster_stats(cube, index, labels, k)
    with atomic_path(out / "stats.csv") as tmp:
        stats_table(stats).to_csv(tmp, index=False, float_format="%.6g")
    write_gallery(
        cube, index, labels, k, out / "gallery.png", per_cluster=per_cluster, seed=seed, stats=stats
    )
    rows = np.flatnonzero(labels >= 0)
    if len(rows) > max_points:  # read only the embeddings that are mapped
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_points, replace=False))
    if len(rows) < 4:  # a tiny zone: too few points for a 2-d map
        warnings.warn(
            f"only {len(rows)} clustered patches in {store} {zone}: no embedding map",
            AgrilandWarning,
            stacklevel=2,
        )
        (out / "embedding_map.png").unlink(missing_ok=True)
    else:
        emb = open_product(store, pre + "embeddings")["embedding"].isel(patch=rows).values
        write_embedding_map(emb, labels[rows], out / "embedding_map.png", seed=seed, max_points=None)
    log.info("cluster report written to %s", out)
    return stats
