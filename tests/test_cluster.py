import numpy as np
import xarray as xr
import zarr
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score

from agriland_scale.cluster.fit import fit_clusters_streaming
from agriland_scale.config.schema import ClusterConfig


def _acc(y, pred):
    k = max(y.max(), pred.max()) + 1
    m = np.zeros((k, k))
    for a, b in zip(pred, y):
        m[a, b] += 1
    r, c = linear_sum_assignment(-m)
    return m[r, c].sum() / len(y)


def _cluster(emb, valid, cfg, seed):
    """Cluster in memory (every valid row in DEC's sample) and read the arrays back as a Dataset."""
    out = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    fit_clusters_streaming(emb, valid, cfg, seed, out=out, sample_size=len(valid))
    return xr.open_zarr(out.store, consolidated=False).load()


def test_pipeline_clustering_on_raw_digits_is_repeatable_and_close():
    """The pipeline's path (``fit_clusters_streaming``: k-means, then DEC refining the centroids on
    fixed embeddings) on raw digit pixels. Measured (seed 3): k-means acc 0.729 / NMI 0.695,
    DEC acc 0.710 / NMI 0.664; seed 0: 0.787 / 0.724 -> 0.817 / 0.721: refining centroids
    alone stays within a few points of k-means. DEC's gain comes from fine-tuning the encoder
    (next test)."""
    x, y = load_digits(return_X_y=True)
    emb = xr.DataArray(x.astype("float32") / 16, dims=("patch", "dim"), coords={"patch": np.arange(len(x))})
    valid = np.ones(len(x), bool)
    cfg = ClusterConfig(
        k=10, n_init=5, dec={"max_iter": 3000, "update_interval": 100, "tol": 0.001, "batch_size": 64}
    )
    ds, ds2 = (_cluster(emb, valid, cfg, 3) for _ in range(2))
    np.testing.assert_array_equal(ds["labels"].values, ds2["labels"].values)
    np.testing.assert_allclose(ds["soft"].values.sum(1), 1.0, rtol=1e-5)
    acc_km, acc_dec = _acc(y, ds["kmeans_labels"].values), _acc(y, ds["labels"].values)
    nmi_km = normalized_mutual_info_score(y, ds["kmeans_labels"].values)
    nmi_dec = normalized_mutual_info_score(y, ds["labels"].values)
    print(f"digits: k-means acc {acc_km:.3f} NMI {nmi_km:.3f}; DEC acc {acc_dec:.3f} NMI {nmi_dec:.3f}")
    assert acc_km > 0.6
    assert nmi_dec >= nmi_km - 0.05 and acc_dec >= acc_km - 0.05


def _digits_autoencoder(x: np.ndarray, seed: int):
    """A dense autoencoder 64-256-256-512-10 (the DEC paper's d-500-500-2000-10, narrower to
    keep the test short), trained 30 epochs with MSE; returns its encoder."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((x.shape[1],))
    h = inp
    for units in (256, 256, 512):
        h = keras.layers.Dense(units, activation="relu")(h)
    z = keras.layers.Dense(10, name="embedding")(h)
    d = z
    for units in (512, 256, 256):
        d = keras.layers.Dense(units, activation="relu")(d)
    ae = keras.Model(inp, keras.layers.Dense(x.shape[1])(d))
    ae.compile(keras.optimizers.Adam(1e-3), "mse")
    ae.fit(x, x, batch_size=256, epochs=30, verbose=0)
    return keras.Model(inp, z)


def test_dec_beats_kmeans_on_the_same_digits_embedding():
    """Xie et al.'s DEC (encoder fine-tuned with the centroids) against k-means, both starting
    from the same autoencoder embedding of scikit-learn's digits (1797 images, 10 classes).

    Measured on this machine (2 CPU cores, seed 0; accuracy with Hungarian matching / NMI):
    k-means (n_init 20) 0.733 / 0.695; DEC refining the centroids only 0.733 / 0.694;
    DEC with the encoder 0.787 / 0.780 (1900 iterations). Seeds 1-3: k-means 0.728 / 0.720,
    0.759 / 0.733, 0.797 / 0.738 -> DEC 0.768 / 0.791, 0.805 / 0.829, 0.824 / 0.794.
    Asserted: DEC not worse in accuracy and at least 0.03 better in NMI (about 25 s)."""
    from sklearn.cluster import KMeans

    from agriland_scale.models import worker as _worker
    from agriland_scale.models.dec import fit_dec, soft_assign

    _worker.configure_tensorflow()
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype("float32")
    encoder = _digits_autoencoder(x, seed=0)
    emb = encoder.predict(x, verbose=0)
    km = KMeans(10, n_init=20, random_state=0).fit(emb)
    res = fit_dec(
        x,
        km.cluster_centers_,
        max_iter=2000,
        update_interval=100,
        tol=0.001,
        batch_size=256,
        seed=0,
        encoder=encoder,
    )
    dec = soft_assign(res.encoder.predict(x, verbose=0), res.centroids).argmax(1)
    acc_km, acc_dec = _acc(y, km.labels_), _acc(y, dec)
    nmi_km, nmi_dec = normalized_mutual_info_score(y, km.labels_), normalized_mutual_info_score(y, dec)
    print(
        f"digits, AE embedding: k-means acc {acc_km:.3f} NMI {nmi_km:.3f}; "
        f"DEC acc {acc_dec:.3f} NMI {nmi_dec:.3f} ({res.iterations} iterations)"
    )
    assert acc_km > 0.6
    assert acc_dec >= acc_km and nmi_dec >= nmi_km + 0.03
