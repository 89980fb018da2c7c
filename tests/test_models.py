import numpy as np
import pytest

from agriland_scale.models.dec import fit_dec, soft_assign, target_distribution


def test_soft_assignment_hand_computed():
    z = np.array([[0.0, 0.0]])
    mu = np.array([[1.0, 0.0], [0.0, 2.0]])
    # alpha = 1: q ∝ 1 / (1 + d²) -> 1/2 and 1/5, normalised 5/7 and 2/7
    np.testing.assert_allclose(soft_assign(z, mu), [[5 / 7, 2 / 7]])


def test_target_distribution_hand_computed():
    q = np.array([[0.5, 0.5], [0.9, 0.1]])
    f = q.sum(0)  # 1.4, 0.6
    w = q**2 / f
    np.testing.assert_allclose(target_distribution(q), w / w.sum(1, keepdims=True))
    p = target_distribution(q)
    assert p[1, 0] > q[1, 0]  # sharpens confident assignments
    np.testing.assert_allclose(p.sum(1), 1.0)


def test_kl_gradient_moves_centroid_towards_its_points():
    """Xie et al. eq. 4: dL/dmu_j pulls mu_j towards points with p_ij > q_ij."""
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 0.3, (50, 2)), rng.normal(4, 0.3, (50, 2))]).astype("float32")
    init = np.array([[1.0, 1.0], [3.0, 3.0]], dtype="float32")
    res = fit_dec(z, init, max_iter=300, update_interval=50, batch_size=16, seed=0)
    assert np.linalg.norm(res.centroids[0] - 0) < np.linalg.norm(init[0] - 0)
    assert np.linalg.norm(res.centroids[1] - 4) < np.linalg.norm(init[1] - 4)
    again = fit_dec(z, init, max_iter=300, update_interval=50, batch_size=16, seed=0)
    np.testing.assert_array_equal(res.centroids, again.centroids)


def test_cae_shapes():
    from agriland_scale.models.encoder import build_cae, encoder_from_cae

    cae = build_cae(64, 3, head="gap", weights="none", dense_units=32, embedding_dim=10)
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype="float32")
    recon, emb = cae.predict(x, verbose=0)
    assert recon.shape == (2, 64, 64, 3) and emb.shape == (2, 10)
    assert 0 <= recon.min() and recon.max() <= 1
    np.testing.assert_allclose(encoder_from_cae(cae).predict(x, verbose=0), emb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["plain", "resnet50", "inceptionv3"])
def test_unet_shapes(encoder):
    from agriland_scale.models.unet import build_unet

    m = build_unet(encoder, 128, 4, weights="none")
    y = m.predict(np.zeros((1, 128, 128, 4), "float32"), verbose=0)
    assert y.shape == (1, 128, 128, 1) and 0 <= y.min() and y.max() <= 1


def test_imagenet_needs_three_bands():
    from agriland_scale.errors import BandMismatch
    from agriland_scale.models.unet import build_unet

    with pytest.raises(BandMismatch, match="expect 3 bands"):
        build_unet("resnet50", 128, 4, weights="imagenet")


def test_weights_file_missing():
    from agriland_scale.errors import CorruptInput
    from agriland_scale.models.unet import build_unet

    with pytest.raises(CorruptInput, match="does not exist"):
        build_unet("plain", 64, 3, weights="/nonexistent/w.weights.h5")
