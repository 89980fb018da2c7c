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
    # f = (1.4, 0.6); q^2 / f = (0.25/1.4, 0.25/0.6) = (0.17857, 0.41667), sum 0.59524
    # -> (0.3, 0.7); (0.81/1.4, 0.01/0.6) = (0.57857, 0.016667), sum 0.59524 -> (0.972, 0.028)
    p = target_distribution(q)
    np.testing.assert_allclose(p, [[0.3, 0.7], [0.972, 0.028]], atol=1e-12)
    assert p[1, 0] > q[1, 0]  # sharpens confident assignments
    np.testing.assert_allclose(p.sum(1), 1.0)


def test_clustering_layer_and_kl_gradients_match_xie_et_al():
    """The Keras layer gives ``soft_assign``'s q, and the gradients of KL(P || Q) (summed over
    points, P fixed) are Xie et al.'s eq. 4 and 3, here on hand-sized numbers:

    dL/dmu_j = -(a+1)/a sum_i (1 + |z_i - mu_j|^2/a)^-1 (p_ij - q_ij)(z_i - mu_j)
    dL/dz_i  =  (a+1)/a sum_j (1 + |z_i - mu_j|^2/a)^-1 (p_ij - q_ij)(z_i - mu_j)
    """
    import tensorflow as tf

    from agriland_scale.models.dec import ClusteringLayer

    z = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 0.5]])
    mu = np.array([[1.0, 0.0], [0.0, 2.0]])
    q = soft_assign(z, mu)
    np.testing.assert_allclose(q[0], [5 / 7, 2 / 7])
    p = target_distribution(q)
    layer = ClusteringLayer(2)
    layer.build((None, 2))
    layer.set_weights([mu.astype("float32")])
    zt = tf.Variable(z.astype("float32"))
    with tf.GradientTape() as tape:
        qt = layer(zt)
        loss = tf.reduce_sum(p * tf.math.log(p / qt))
    g_mu, g_z = tape.gradient(loss, [layer.trainable_weights[0], zt])
    np.testing.assert_allclose(qt.numpy(), q, rtol=1e-6)
    diff = z[:, None, :] - mu[None]  # (i, j, d)
    kern = 1.0 / (1.0 + (diff**2).sum(-1))  # alpha = 1
    coef = 2.0 * kern * (p - q)  # (a + 1) / a = 2
    np.testing.assert_allclose(g_mu.numpy(), -(coef[..., None] * diff).sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_z.numpy(), (coef[..., None] * diff).sum(1), rtol=1e-4, atol=1e-6)
    # the sign: a gradient step moves mu_0 towards z_0, the point it should own more (p > q)
    assert p[0, 0] > q[0, 0]
    assert np.linalg.norm(mu[0] - 0.1 * g_mu.numpy()[0] - z[0]) < np.linalg.norm(mu[0] - z[0])


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


def test_weights_file_missing():
    from agriland_scale.errors import CorruptInput
    from agriland_scale.models.unet import build_unet

    with pytest.raises(CorruptInput, match="does not exist"):
        build_unet("plain", 64, 3, weights="/nonexistent/w.weights.h5")


@pytest.mark.parametrize("name, size", [("resnet50", 64), ("inceptionv3", 75)])
def test_first_conv_adapted_for_more_bands(name, size):
    """ImageNet-style weights into a 5-band backbone (offline: a seeded random RGB model
    stands in for the ImageNet one; the transfer does not depend on the values). Red, green
    and blue get their colour's kernel (ResNet50's in BGR order), NIR and SWIR the mean,
    all scaled by 3/5; every other weight is copied; and a uniform image gives exactly the
    features the colour model gave, the property the 3/n scaling keeps."""
    import keras

    from agriland_scale.models.backbone import _APPS, _KERNEL_ORDER, transfer_weights

    keras.utils.set_random_seed(0)
    src = _APPS[name](include_top=False, weights=None, input_shape=(size, size, 3))
    bands = ["nir", "red", "green", "blue", "swir16"]
    dst = _APPS[name](include_top=False, weights=None, input_shape=(size, size, 5))
    transfer_weights(src, dst, bands, _KERNEL_ORDER[name])
    k3 = next(w for w in src.weights if len(w.shape) == 4).numpy()
    k5 = next(w for w in dst.weights if len(w.shape) == 4).numpy()
    order = _KERNEL_ORDER[name]
    np.testing.assert_allclose(k5[:, :, 1], k3[:, :, order.index("red")] * 3 / 5, rtol=1e-6)
    np.testing.assert_allclose(k5[:, :, 3], k3[:, :, order.index("blue")] * 3 / 5, rtol=1e-6)
    np.testing.assert_allclose(k5[:, :, 0], k3.mean(2) * 3 / 5, rtol=1e-5)
    np.testing.assert_allclose(k5[:, :, 4], k5[:, :, 0])
    same = [(a, b) for a, b in zip(src.weights, dst.weights) if len(a.shape) != 4 or a.shape[2] != 3]
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in same[1:])
    u = np.full((2, size, size, 1), [[[[0.2]]], [[[0.7]]]], dtype="float32")
    np.testing.assert_allclose(
        dst.predict(np.repeat(u, 5, -1), verbose=0),
        src.predict(np.repeat(u, 3, -1), verbose=0),
        rtol=1e-3,
        atol=1e-4,
    )


def test_imagenet_kernel_follows_the_band_order():
    """Bands in another order than the kernel's: the kernel is permuted, not reinterpreted."""
    from agriland_scale.models.backbone import adapt_first_conv

    k = np.arange(2 * 2 * 3 * 4, dtype="float32").reshape(2, 2, 3, 4)
    out = adapt_first_conv(k, ["red", "green", "blue"], ("blue", "green", "red"))
    np.testing.assert_array_equal(out, k[:, :, ::-1])
    with pytest.raises(Exception, match="RGB kernel"):
        adapt_first_conv(k[:, :, :2], ["red", "green"])


def test_mixed_precision_copy_embeds_like_float32(tmp_path):
    """The mixed-precision copy a GPU worker uses (``embed.mixed_precision``): float16 compute,
    float32 weights, embeddings within float16 rounding of the float32 ones."""
    import keras

    from agriland_scale.models import worker as _worker
    from agriland_scale.models.encoder import build_cae, encoder_from_cae

    keras.utils.set_random_seed(0)
    enc = encoder_from_cae(build_cae(64, 3, head="gap", weights="none", embedding_dim=8, dense_units=32))
    path = tmp_path / "encoder.keras"
    enc.save(path)
    m32, _ = _worker.get_model(path)
    m16, _ = _worker.get_model(path, "mixed_float16")
    assert m16 is not m32 and _worker.get_model(path, "mixed_float16")[0] is m16  # cached
    conv = [layer for layer in m16.layers[1].layers if isinstance(layer, keras.layers.Conv2D)][0]
    assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
    x = np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 3)).astype("float32")
    a = m32.predict(x, verbose=0)
    b = np.asarray(m16.predict(x, verbose=0), dtype="float32")
    assert b.shape == a.shape
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * np.abs(a).max())


def test_masked_losses_hand_computed():
    """Dice and BCE over labelled pixels only (255 ignored), on four pixels."""
    from agriland_scale.models.unet import masked_bce, masked_bce_dice, masked_dice, unet_loss

    y = np.array([[[[1], [0], [1], [255]]]], dtype="float32")  # (1, 1, 4, 1)
    p = np.array([[[[0.8], [0.4], [0.5], [0.9]]]], dtype="float32")
    # Dice: sum(y p) = 0.8 + 0.5 = 1.3, sum(y) = 2, sum(p) = 1.7 (the ignored 0.9 left out)
    # -> 1 - (2.6 + 1) / (3.7 + 1) = 0.234043
    np.testing.assert_allclose(float(masked_dice(y, p)), 1 - 3.6 / 4.7, rtol=1e-6)
    bce = -(np.log(0.8) + np.log(0.6) + np.log(0.5)) / 3
    np.testing.assert_allclose(float(masked_bce(y, p)), bce, rtol=1e-6)
    np.testing.assert_allclose(float(masked_bce_dice(y, p)), bce + 1 - 3.6 / 4.7, rtol=1e-6)
    assert unet_loss("bce") is masked_bce and unet_loss("dice") is masked_dice
    perfect = np.where(y == 255, 0.3, y).astype("float32")
    assert float(masked_dice(y, perfect)) < 1e-6


def test_bfloat16_copy_keeps_its_output_layer_and_outputs_float32(tmp_path):
    """``runtime.inference_precision: bfloat16``: every layer computes in bfloat16 except the
    one that gives the probabilities (float32, not rounded to bfloat16's 8 significant bits),
    predictions come back float32, within one step (1/254) of the stored uint8 probability."""
    import keras

    from agriland_scale.models import worker as _worker
    from agriland_scale.models.unet import build_unet

    keras.utils.set_random_seed(0)
    path = tmp_path / "unet.keras"
    build_unet("plain", 64, 3, weights="none", filters=(4, 8, 16)).save(path)
    m32, _ = _worker.get_model(path)
    mbf, _ = _worker.get_model(path, "mixed_bfloat16")
    convs = [layer for layer in mbf.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs[-1].name == mbf.layers[-1].name and convs[-1].compute_dtype == "float32"
    assert {c.compute_dtype for c in convs[:-1]} == {"bfloat16"}
    assert {c.variable_dtype for c in convs} == {"float32"}
    x = np.random.default_rng(0).uniform(0, 0.3, (2, 64, 64, 3)).astype("float32")
    a, b = _worker.predict(m32, x), _worker.predict(mbf, x)
    assert a.dtype == b.dtype == np.float32 and b.shape == a.shape
    assert 0 < np.abs(b - a).max() < 1 / 254


def test_bfloat16_support_is_read_from_the_cpu_flags(tmp_path):
    from agriland_scale.models.worker import cpu_has_bfloat16

    info = tmp_path / "cpuinfo"
    for flags, has in (
        ("fpu sse avx2 avx512f", False),
        ("fpu avx512f avx512_bf16", True),
        ("fpu amx_bf16 amx_tile", True),
    ):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert cpu_has_bfloat16(str(info)) is has
    assert cpu_has_bfloat16(str(tmp_path / "missing")) is False


def test_a_long_lived_worker_keeps_only_the_models_used_last(tmp_path, monkeypatch):
    """A worker that outlives runs (``agriland cluster``) does not keep every model it ever
    loaded: at most ``MAX_MODELS``, the least recently used go first; a model used again
    stays, and a file saved again is loaded again."""
    import keras

    from agriland_scale.models import worker as _worker
    from agriland_scale.models.unet import build_unet

    monkeypatch.setattr(_worker, "_models", type(_worker._models)())
    monkeypatch.setattr(_worker, "MAX_MODELS", 2)
    keras.utils.set_random_seed(0)
    paths = [tmp_path / f"unet{i}.keras" for i in range(3)]
    for p in paths:
        build_unet("plain", 32, 3, weights="none", filters=(2, 4)).save(p)
    a = _worker.get_model(paths[0])[0]
    _worker.get_model(paths[1])
    assert _worker.get_model(paths[0])[0] is a  # used again: now the most recent
    _worker.get_model(paths[2])
    kept = [k[0] for k in _worker._models]
    assert kept == [str(paths[0].resolve()), str(paths[2].resolve())]
    _worker.get_model(paths[2], input_size=64)  # a copy for another window size counts as one
    assert [k[0] for k in _worker._models] == [str(paths[2].resolve())] * 2
