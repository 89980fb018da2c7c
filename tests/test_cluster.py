import numpy as np
import xarray as xr
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score

from agriland_scale.cluster import cluster_embeddings
from agriland_scale.config import ClusterConfig


def _acc(y, pred):
    k = max(y.max(), pred.max()) + 1
    m = np.zeros((k, k))
    for a, b in zip(pred, y):
        m[a, b] += 1
    r, c = linear_sum_assignment(-m)
    return m[r, c].sum() / len(y)


def test_kmeans_then_dec_on_digits_is_repeatable_and_close():
    """DEC here refines centroids on a fixed embedding (no encoder fine-tuning). Measured on
    raw digits (seed 3): k-means acc 0.729 / NMI 0.695, DEC acc 0.710 / NMI 0.664; seed 0:
    0.787 / 0.724 -> 0.817 / 0.721. So it stays within a few points of k-means but does not
    reliably improve it; the 'DEC must not be worse' goal belongs to issue 5."""
    x, y = load_digits(return_X_y=True)
    emb = xr.DataArray(x.astype("float32") / 16, dims=("patch", "dim"),
                       coords={"patch": np.arange(len(x))})
    valid = np.ones(len(x), bool)
    cfg = ClusterConfig(k=10, n_init=5, dec={"max_iter": 3000, "update_interval": 100, "tol": 0.001,
                                             "batch_size": 64})
    ds, info = cluster_embeddings(emb, valid, cfg, seed=3)
    ds2, _ = cluster_embeddings(emb, valid, cfg, seed=3)
    np.testing.assert_array_equal(ds["labels"].values, ds2["labels"].values)
    np.testing.assert_allclose(ds["soft"].values.sum(1), 1.0, rtol=1e-5)
    acc_km, acc_dec = _acc(y, ds["kmeans_labels"].values), _acc(y, ds["labels"].values)
    nmi_km = normalized_mutual_info_score(y, ds["kmeans_labels"].values)
    nmi_dec = normalized_mutual_info_score(y, ds["labels"].values)
    print(f"digits: k-means acc {acc_km:.3f} NMI {nmi_km:.3f}; DEC acc {acc_dec:.3f} NMI {nmi_dec:.3f}")
    assert acc_km > 0.6
    assert nmi_dec >= nmi_km - 0.05 and acc_dec >= acc_km - 0.05
