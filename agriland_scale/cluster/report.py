"""Cluster report: what each DEC cluster looks like, so a person can pick the arable ones.

Per cluster: its size, mean NDVI and mean reflectance (:func:`cluster_stats`), a gallery of
sample patches (:func:`write_gallery`) and a t-SNE map of the embeddings
(:func:`write_embedding_map`); :func:`write_cluster_products` writes all three for a run.

Patches are read from the cube through the patch index (``y0``/``x0`` pixel offsets and
the ``patch_size`` attribute), at most one block of patches at a time: the report's
memory does not grow with the region. The statistics are a map-reduce over the clustered
patches (:mod:`.stats`), on the Dask workers for a large cube; the gallery's patches are read
by the same tasks, and its stretch comes from them (:func:`sample_limits`).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.cluster.stats import check_labels, cluster_stats, stats_and_samples, stats_table
from agriland_scale.errors import AgrilandWarning, ConfigError, EmptyRegion
from agriland_scale.files import atomic_path
from agriland_scale.patches import read_windows
from agriland_scale.render import RGB, check_bands, figure_png, percentile_limits, to_rgb8

__all__ = [
    "cluster_stats",
    "gallery_patches",
    "sample_limits",
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
# the gallery instead of a block of patches at a time (the demo region: 16 MB; a whole
# Sentinel-2 tile with 4 bands: 1.9 GB, read by blocks on the workers)
IN_MEMORY_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------- figures


# patches the t-SNE map shows at most (a seeded sample beyond), and its iterations: its cost
# grows with them, not with the region. scikit-learn's Barnes-Hut t-SNE of 100-d embeddings on
# a loaded 2-core machine: 3,000 points x 1,000 iterations 257 s, 2,000 x 500 82 s; at one
# full tile (7,056 patches) the map took most of the publish stage. 2,000 points show k
# clusters as clearly, and 500 iterations (250 of them early exaggeration) settle the layout.
EMBEDDING_MAP_POINTS = 2_000
EMBEDDING_MAP_ITERATIONS = 500


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


def _cells(size: int) -> tuple[int, int, int]:
    """Return the gallery's ``(step, side, gap)``: pixels kept, cell side and gap for ``size`` px patches.

    Each row is one image (its patches side by side, a white gap between them), reduced to
    about the size it is shown at: one Axes a row, not one a patch (6 x faster to draw).
    """
    cell = max(1, round(min(COL_INCHES * DPI, ROW_INCHES * DPI) * 0.85))
    step = max(1, size // cell)
    side = -(-size // step)
    return step, side, max(1, side // 16)


def gallery_patches(labels: np.ndarray, k: int, per_cluster: int, seed: int) -> dict[int, np.ndarray]:
    """Return the patches the gallery shows: ``{cluster: positions}`` (:func:`sample_patches`)."""
    return {c: sample_patches(labels, c, per_cluster, seed) for c in range(k)}


def sample_limits(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return the 2–98 % stretch per band of RGB ``samples`` (each ``(3, h, w)``), as :func:`stretch_limits` does.

    Without a valid pixel among them (nothing but no data to show) the stretch is [0, 1].
    """
    if samples:
        pixels = np.concatenate([s.reshape(len(RGB), -1) for s in samples], axis=1)
        if np.isfinite(pixels).any(1).all():
            return percentile_limits(pixels, RGB)
    return np.zeros(len(RGB)), np.ones(len(RGB))


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
    samples: dict[int, np.ndarray] | None = None,
) -> dict[str, Any]:
    """PNG grid of sample patches: one row a cluster (``k`` rows), ``per_cluster`` columns.

    Each row is titled with the cluster id, its size in patches and its mean NDVI; patches
    are shown as RGB with one 2–98 % stretch a band for the whole gallery (so clusters
    compare). ``stats`` (from :func:`cluster_stats`) and ``limits`` are computed when not
    given; ``samples`` (``{patch: (3, side, side)}`` RGB windows, every ``step``-th pixel, as
    :func:`write_cluster_products` gets them from the statistics' tasks) are read when not
    given, and then only the shown patches are read.

    The stretch is the percentiles of the shown patches' pixels (:func:`sample_limits`).
    It was those of a regular subsample of the whole cube (``render.stretch_limits``), whose
    every chunk had to be decoded: minutes of reads at region scale for a picture of
    ``k × per_cluster`` patches. The pixels drawn are a bounded sample of the clusters (up to
    a million pixels, what ``stretch_limits`` took), and the stretch fits what is shown.

    Returns ``{"path", "rows", "cols", "width_px", "height_px", "patches"}``, ``patches``
    mapping each cluster to the patch positions shown. The image is exactly
    ``rows × 150`` px high.
    """
    labels = check_labels(index, labels, k)
    if per_cluster < 1:
        raise ConfigError(f"per_cluster must be at least 1, got {per_cluster}")
    check_bands(cube, RGB)
    size = int(index.attrs["patch_size"])
    step, side, gap = _cells(size)
    ids = gallery_patches(labels, k, per_cluster, seed)
    if stats is None:  # one pass: the statistics' tasks read the shown patches too
        stats, samples = stats_and_samples(
            cube, index, labels, k, shown=np.concatenate(list(ids.values())), step=step
        )
    elif samples is None:
        rgb = cube["reflectance"].sel(band=list(RGB))
        y0, x0 = index["y0"].values, index["x0"].values
        samples = {}
        for c in range(k):  # one row of patches in memory
            win = read_windows(rgb, y0[ids[c]], x0[ids[c]], size)
            samples.update({int(i): w[:, ::step, ::step] for i, w in zip(ids[c], win)})
    lo, hi = sample_limits([samples[int(i)] for c in range(k) for i in ids[c]]) if limits is None else limits
    plt = _pyplot()
    fig = plt.figure(figsize=(per_cluster * COL_INCHES, k * ROW_INCHES), dpi=DPI)
    rows = fig.subfigures(k, 1, squeeze=False)[:, 0]
    shown: dict[int, list[int]] = {}
    for c, sub in enumerate(rows):
        shown[c] = ids[c].tolist()
        ndvi = float(stats["ndvi_mean"].values[c])
        sub.suptitle(
            f"cluster {c}: {int(stats['size'].values[c])} patches, mean NDVI "
            f"{'n/a' if np.isnan(ndvi) else f'{ndvi:.2f}'}",
            fontsize=9,
        )
        ax = sub.add_axes((0.01, 0.02, 0.98, 0.8))
        ax.set_axis_off()
        strip = np.full((side, per_cluster * (side + gap) - gap, 3), 255, dtype="uint8")
        for j, i in enumerate(shown[c]):
            x = j * (side + gap)
            strip[:, x : x + side] = to_rgb8(samples[i], lo, hi)
            ax.text(x + 2, 2, str(int(index["patch"].values[i])), fontsize=6, color="w", va="top")
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
    max_points: int | None = EMBEDDING_MAP_POINTS,
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
    from threadpoolctl import threadpool_limits

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
    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (m - 1) / 3),
        init="pca",
        random_state=seed,
        max_iter=EMBEDDING_MAP_ITERATIONS,
    )
    # one OpenMP thread: scikit-learn's threads spin while they wait, and beside the worker's
    # other tasks (the publish stage's COGs) a 400-point map took 23-47 s, against 2.4-2.7 s
    # with one thread (a loaded 2-core machine)
    with threadpool_limits(1):
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


def _cluster_client(client: Any) -> Any:
    """Context giving ``client``, else the worker's own client inside a task, else None."""
    if client is not None:
        return nullcontext(client)
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):  # not in a task on a worker
        return nullcontext(None)
    return worker_client()


def write_cluster_products(
    store: str | Path,
    out_dir: str | Path,
    k: int,
    seed: int,
    *,
    per_cluster: int = 8,
    max_points: int = EMBEDDING_MAP_POINTS,
    zone: str = "",
    client: Any = None,
    in_memory_bytes: int = IN_MEMORY_BYTES,
) -> xr.Dataset:
    """Write ``OUT/clusters/{gallery.png, embedding_map.png, stats.csv}`` for a run's store.

    Reads the ``cube``, ``patches``, ``embeddings`` and ``clusters`` groups of ``store``
    (``OUT/agriland.zarr``); with ``zone`` (multi-zone runs) the groups ``ZONE/cube`` ...
    and the folder ``OUT/clusters/ZONE/``. Files are replaced atomically, so rerunning gives the same
    files (idempotent). Returns the :func:`cluster_stats` dataset.

    The statistics and the gallery's patches come from one pass over the clustered patches
    (:func:`cluster_stats`): a cube of at most ``in_memory_bytes`` is read once, here;
    a larger one by the workers of ``client`` in parallel, a bounded block of patches a task,
    or, called in a task on a worker (the publish stage draws the report so), by tasks that
    task submits through ``distributed.worker_client``. Without a client and outside a
    worker, this process reads the patches, one block at a time.
    """
    from agriland_scale.store import open_cube, open_product

    pre = f"{zone}/" if zone else ""
    cube = open_cube(store, pre + "cube")
    small = cube["reflectance"].nbytes <= in_memory_bytes
    if small:  # one read, not one a block of patches
        cube = cube.load()
    index = open_product(store, pre + "patches").load()
    labels = open_product(store, pre + "clusters")["labels"].values
    out = Path(out_dir) / "clusters" / zone
    out.mkdir(parents=True, exist_ok=True)
    ids = gallery_patches(check_labels(index, labels, k), k, per_cluster, seed)
    shown = np.concatenate(list(ids.values()))
    step = _cells(int(index.attrs["patch_size"]))[0]
    with nullcontext(None) if small else _cluster_client(client) as workers:
        stats, samples = stats_and_samples(
            cube, index, labels, k, client=workers, store=store, group=pre + "cube", shown=shown, step=step
        )
    with atomic_path(out / "stats.csv") as tmp:
        stats_table(stats).to_csv(tmp, index=False, float_format="%.6g")
    write_gallery(
        cube,
        index,
        labels,
        k,
        out / "gallery.png",
        per_cluster=per_cluster,
        seed=seed,
        stats=stats,
        samples=samples,
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
