"""Cluster report (stats, gallery, t-SNE map) and the streaming k-means + DEC path."""

import numpy as np
import pytest
import xarray as xr
import zarr
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from agriland_scale.cluster.fit import fit_clusters_streaming
from agriland_scale.cluster.report import (
    cluster_stats,
    write_cluster_products,
    write_embedding_map,
    write_gallery,
)
from agriland_scale.config.schema import ClusterConfig
from agriland_scale.errors import ConfigError, CorruptInput, EmptyRegion
from agriland_scale.patches import patch_index
from agriland_scale.render import to_rgb8
from agriland_scale.store import open_product, reader


@pytest.fixture(scope="module")
def index(cube):
    return patch_index(cube, 256, 128)


def _window(cube, index, p):
    y0, x0 = int(index.y0[p]), int(index.x0[p])
    return cube["reflectance"].values[:, y0 : y0 + 256, x0 : x0 + 256].astype("float64")


def _ndvi_pixels(w, bands):
    red, nir = w[bands.index("red")], w[bands.index("nir")]
    ok = np.isfinite(w).all(0) & (nir + red != 0)
    return (nir[ok] - red[ok]) / (nir[ok] + red[ok])


def test_cluster_stats_equal_direct_numpy(cube, index):
    bands = [str(b) for b in cube.band.values]
    labels = np.full(index.sizes["patch"], -1)
    labels[10] = 0  # one known patch
    labels[[3, 40]] = 1  # two patches, pooled
    st = cluster_stats(cube, index, labels, 3, window_bytes=2**20)
    assert st["size"].values.tolist() == [1, 2, 0]
    w10 = _window(cube, index, 10)
    np.testing.assert_allclose(st["ndvi_mean"].sel(cluster=0), _ndvi_pixels(w10, bands).mean(), rtol=1e-10)
    ok = np.isfinite(w10).all(0)
    np.testing.assert_allclose(st["reflectance_mean"].sel(cluster=0), w10[:, ok].mean(1), rtol=1e-10)
    pooled = np.concatenate([_ndvi_pixels(_window(cube, index, p), bands) for p in (3, 40)])
    np.testing.assert_allclose(st["ndvi_mean"].sel(cluster=1), pooled.mean(), rtol=1e-10)
    assert int(st["valid_pixels"].sel(cluster=0)) == ok.sum()
    assert np.isnan(st["ndvi_mean"].sel(cluster=2)) and int(st["valid_pixels"].sel(cluster=2)) == 0
    assert -1 <= float(st["ndvi_mean"].sel(cluster=0)) <= 1


def test_cluster_stats_reject_mismatched_labels(cube, index):
    with pytest.raises(CorruptInput, match="49 patches"):
        cluster_stats(cube, index, np.zeros(10, int), 2)
    with pytest.raises(ConfigError, match="k = 2"):
        cluster_stats(cube, index, np.full(index.sizes["patch"], 5), 2)


def _old_cluster_stats(cube, index, labels, k, batch=16):
    """cluster_stats as it was (one loop over the clustered patches, one batch at a time),
    the reference of the map-reduce: sizes and pixel counts the same, means within rounding."""
    from agriland_scale.patches import read_windows

    size = int(index.attrs["patch_size"])
    bands = [str(b) for b in cube["band"].values]
    i_red, i_nir = bands.index("red"), bands.index("nir")
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
        return (
            np.bincount(labels[labels >= 0], minlength=k),
            pix_n,
            ndvi_sum / ndvi_n,
            band_sum / pix_n[:, None],
        )


def _random_labels(n, k, seed=5):
    labels = np.random.default_rng(seed).integers(-1, k - 1, n)  # cluster k - 1 stays empty
    return labels


def test_cluster_stats_map_reduce_equals_the_old_loop(cube, index):
    """However the patches are split into blocks, the map-reduce gives the sizes
    and pixel counts of the former single loop exactly, and its means within rounding."""
    k = 5
    labels = _random_labels(index.sizes["patch"], k)
    size, pix, ndvi, refl = _old_cluster_stats(cube, index, labels, k)
    loaded = cube.compute()  # a loaded copy: the session fixture stays lazy for the other tests
    for window_bytes in (1, 4 * 2**20, 2**30):  # a patch a task, 3 x 3 patches, all
        st = cluster_stats(loaded, index, labels, k, window_bytes=window_bytes)
        assert st["size"].values.tolist() == size.tolist()
        assert st["valid_pixels"].values.tolist() == pix.tolist()
        np.testing.assert_allclose(st["ndvi_mean"].values, ndvi, rtol=1e-12)
        np.testing.assert_allclose(st["reflectance_mean"].values, refl, rtol=1e-12)
        assert np.isnan(st["ndvi_mean"].values[k - 1]) and st["size"].values[k - 1] == 0


@pytest.fixture(scope="module")
def workers():
    """A local cluster of 2 worker processes (the tasks pickle the store and read it)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        with Client(lc) as client:
            yield client


def _prefixes(client):
    return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))


def test_cluster_stats_on_the_workers_equal_those_computed_here(cube, cube_store, index, workers):
    """The workers' map-reduce (clusters-stats-... tasks reading the store) gives the numbers
    computed in this process for the same split, bit for bit."""
    k = 4
    labels = _random_labels(index.sizes["patch"], k, seed=9)
    here = cluster_stats(cube, index, labels, k, window_bytes=4 * 2**20)
    there = cluster_stats(cube, index, labels, k, window_bytes=4 * 2**20, client=workers, store=cube_store)
    xr.testing.assert_identical(here, there)
    assert "clusters-stats" in _prefixes(workers)


@pytest.fixture(scope="module")
def run_store(cube_store, index, tmp_path_factory):
    """A run's store in miniature: the cube, patches, clusters and embeddings groups."""
    import shutil

    import dask

    from agriland_scale.store import write_group

    path = tmp_path_factory.mktemp("run") / "agriland.zarr"
    shutil.copytree(cube_store, path)
    n = index.sizes["patch"]
    labels = _random_labels(n, 3, seed=2).astype("int16")
    emb = np.random.default_rng(0).random((n, 8)).astype("float32")
    with dask.config.set(scheduler="synchronous"):
        write_group(index, str(path), "patches")
        write_group(xr.Dataset({"labels": ("patch", labels)}), str(path), "clusters")
        write_group(xr.Dataset({"embedding": (("patch", "dim"), emb)}), str(path), "embeddings")
    return str(path), labels


def test_cluster_products_drawn_on_a_worker_equal_those_drawn_here(run_store, workers, tmp_path):
    """The report drawn in a task on a worker with a cube too large to load (its statistics
    and gallery samples then come from tasks it submits, distributed.worker_client) is the
    report drawn here, byte for byte; the gallery's stretch comes from the shown patches."""
    from dask.utils import key_split
    from distributed import get_task_stream

    from agriland_scale.cluster.report import gallery_patches, sample_limits, write_cluster_products
    from agriland_scale.render import RGB
    from agriland_scale.store import open_cube

    store, labels = run_store
    here = write_cluster_products(store, tmp_path / "here", 3, 1)
    with get_task_stream(workers) as tasks:
        there = workers.submit(
            write_cluster_products, store, str(tmp_path / "there"), 3, 1, in_memory_bytes=0, pure=False
        ).result()
    assert any(key_split(t["key"]) == "clusters-stats" for t in tasks.data)  # submitted by the task
    xr.testing.assert_identical(here, there)
    for name in ("stats.csv", "gallery.png"):
        a, b = (tmp_path / w / "clusters" / name for w in ("here", "there"))
        assert a.read_bytes() == b.read_bytes(), name
    cube = open_cube(store)
    index = _index_of(store)
    ids = np.concatenate(list(gallery_patches(labels.astype("int64"), 3, 8, 1).values()))
    shown = [
        cube["reflectance"]
        .sel(band=list(RGB))
        .isel(y=slice(a, a + 256), x=slice(b, b + 256))
        .values[:, ::2, ::2]
        for a, b in zip(index["y0"].values[ids], index["x0"].values[ids])
    ]
    lo, hi = sample_limits(shown)
    pix = np.concatenate([s.reshape(3, -1) for s in shown], axis=1)
    np.testing.assert_allclose(lo, np.nanpercentile(pix, 2, axis=1))
    np.testing.assert_allclose(hi, np.nanpercentile(pix, 98, axis=1))
    lo, hi = sample_limits([np.full((3, 4, 4), np.nan)])  # nothing valid to show
    assert lo.tolist() == [0, 0, 0] and hi.tolist() == [1, 1, 1]


def _index_of(store):
    return open_product(store, "patches").load()


def test_to_rgb8_stretch_and_nodata():
    block = np.array([[[0.0, 0.5, 1.0, np.nan]]] * 3, dtype="float32").reshape(3, 1, 4)
    rgb = to_rgb8(block, np.array([0.0, 0.0, 0.5]), np.array([1.0, 0.5, 1.0]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 0]
    assert rgb[0, :, 1].tolist() == [0, 255, 255, 0]  # clipped above hi
    assert rgb[0, :, 2].tolist() == [0, 0, 255, 0]  # clipped below lo


def test_gallery_one_row_per_cluster_and_seeded_sampling(cube, index, tmp_path):
    n = index.sizes["patch"]
    labels = np.arange(n) % 3
    labels[:2] = -1
    info = write_gallery(cube, index, labels, 3, tmp_path / "g.png", per_cluster=4, seed=1)
    img = Image.open(tmp_path / "g.png")
    assert img.size == (info["width_px"], info["height_px"]) == (4 * 130, 3 * 150)
    assert img.mode == "RGB"  # no alpha channel: it carried nothing, and a quarter of the bytes
    assert info["rows"] == 3 and sorted(info["patches"]) == [0, 1, 2]
    for c, ids in info["patches"].items():
        assert len(ids) == 4 and all(labels[i] == c for i in ids)
    again = write_gallery(cube, index, labels, 3, tmp_path / "g2.png", per_cluster=4, seed=1)
    other = write_gallery(cube, index, labels, 3, tmp_path / "g3.png", per_cluster=4, seed=2)
    assert again["patches"] == info["patches"] and other["patches"] != info["patches"]
    assert (tmp_path / "g.png").read_bytes() == (tmp_path / "g2.png").read_bytes()
    # a 4th, empty cluster still gets its row
    assert write_gallery(cube, index, labels, 4, tmp_path / "g4.png", per_cluster=4)["height_px"] == 600
    assert Image.open(tmp_path / "g4.png").size[1] == 600


def test_embedding_map_separates_digits_and_is_repeatable(tmp_path):
    x, y = load_digits(return_X_y=True)
    x, y = x[:400].astype("float32"), y[:400].copy()
    y[::50] = -1  # not clustered: left out
    xy = write_embedding_map(x, y, tmp_path / "m.png", seed=0)
    assert xy.shape == (400, 2)
    assert np.isnan(xy[y < 0]).all() and np.isfinite(xy[y >= 0]).all()
    assert Image.open(tmp_path / "m.png").size == (700, 600)
    np.testing.assert_array_equal(xy, write_embedding_map(x, y, tmp_path / "m2.png", seed=0))
    keep = y >= 0  # the 2-d map keeps digit classes apart: 5-NN accuracy in 2-d
    acc = cross_val_score(KNeighborsClassifier(5), xy[keep], y[keep], cv=5).mean()
    assert acc > 0.85, acc
    with pytest.raises(EmptyRegion):
        write_embedding_map(x[:3], y[:3], tmp_path / "m3.png")


DIGITS_CFG = ClusterConfig(
    k=10, n_init=5, dec={"max_iter": 600, "update_interval": 100, "tol": 0.001, "batch_size": 64}
)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    valid = np.ones(len(x), bool)
    valid[::9] = False
    return (x / 16).astype("float32"), y, valid


def _in_memory(x, valid, seed, chunk):
    """Cluster with every valid row in the sample, reading ``chunk`` rows at a time."""
    emb = xr.DataArray(x, dims=("patch", "dim"), coords={"patch": np.arange(len(x))})
    out = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    info = fit_clusters_streaming(emb, valid, DIGITS_CFG, seed, out=out, sample_size=len(x), chunk=chunk)
    return out, info


def test_streaming_does_not_depend_on_the_chunk_when_the_sample_holds_everything(digits):
    x, y, valid = digits
    ref, _ = _in_memory(x, valid, 3, chunk=len(x))
    out, info = _in_memory(x, valid, 3, chunk=500)
    assert info["n_sample"] == valid.sum()
    for name in ("labels", "kmeans_labels"):
        np.testing.assert_array_equal(out[name][:], ref[name][:])
    for name in ("soft", "centroids"):
        np.testing.assert_allclose(out[name][:], ref[name][:], rtol=1e-6)


def test_streaming_on_a_sample_is_repeatable(digits, tmp_path):
    x, y, valid = digits
    arr = zarr.create_array(str(tmp_path / "emb.zarr"), shape=x.shape, chunks=(256, 64), dtype="float32")
    arr[:] = x
    runs = [
        fit_clusters_streaming(
            arr, valid, DIGITS_CFG, 7, out=tmp_path / f"c{i}.zarr", sample_size=700, chunk=256
        )
        for i in range(2)
    ]
    a, b = (xr.open_zarr(tmp_path / f"c{i}.zarr", consolidated=False).load() for i in range(2))
    xr.testing.assert_identical(a, b)
    assert runs[0]["sizes"] == runs[1]["sizes"] and runs[0]["n_sample"] == 700
    assert a["soft"].dims == ("patch", "cluster") and a["soft"].shape == (len(x), 10)
    assert (a["labels"].values[~valid] == -1).all() and np.isnan(a["soft"].values[~valid]).all()
    np.testing.assert_allclose(a["soft"].values[valid].sum(1), 1.0, rtol=1e-5)
    assert set(np.unique(a["labels"].values[valid])) <= set(range(10))
    assert sum(runs[0]["sizes"]) == valid.sum()
    ref, _ = _in_memory(x, valid, 7, chunk=len(x))
    nmi_ref = normalized_mutual_info_score(y[valid], ref["labels"][:][valid])
    nmi = normalized_mutual_info_score(y[valid], a["labels"].values[valid])
    assert nmi > nmi_ref - 0.08, (nmi, nmi_ref)


def test_streaming_needs_k_valid_rows(digits):
    x, _, _ = digits
    valid = np.zeros(len(x), bool)
    valid[:5] = True
    with pytest.raises(EmptyRegion, match="only 5 valid"):
        fit_clusters_streaming(
            x, valid, DIGITS_CFG, 0, out=zarr.open_group(zarr.storage.MemoryStore(), mode="w")
        )


@pytest.mark.slow
def test_cluster_products_of_the_demo_run(demo_run):
    cfg, out, _ = demo_run
    store = reader(out)
    k = cfg.cluster.k
    stats = write_cluster_products(store, out, k, cfg.seed)
    labels = open_product(store, "clusters")["labels"].values
    assert stats["size"].values.tolist() == np.bincount(labels[labels >= 0], minlength=k).tolist()
    csv = (out / "clusters" / "stats.csv").read_text().splitlines()
    assert csv[0].startswith("cluster,size,valid_pixels,ndvi_mean") and len(csv) == k + 1
    assert Image.open(out / "clusters" / "gallery.png").size[1] == 150 * k
    assert Image.open(out / "clusters" / "embedding_map.png").size == (700, 600)
    before = {p.name: p.read_bytes() for p in (out / "clusters").iterdir()}
    write_cluster_products(store, out, k, cfg.seed)  # idempotent
    assert {p.name: p.read_bytes() for p in (out / "clusters").iterdir()} == before
