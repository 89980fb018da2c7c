"""Training precision (``runtime.train_precision``): bfloat16 where the CPU computes it, float32 saved.

Issue 34, goal 5: the CAE and the U-Net train under Keras's ``mixed_bfloat16`` policy (float32
master weights, output layers in float32) where :func:`~agriland_scale.models.worker.cpu_has_bfloat16`
says so, and the saved ``.keras`` models are float32 whatever trained them. Tiny models, one step.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

SIZE = 64
NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw\n"
BF16 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"


def _policies(model) -> set[str]:
    """Every layer's dtype policy name, nested models included."""
    import keras

    out = set()
    for layer in model.layers:
        out.add(layer.dtype_policy.name)
        if isinstance(layer, keras.Model):
            out |= _policies(layer)
    return out


def test_the_setting_resolves_per_machine(tmp_path):
    """``auto``: mixed_bfloat16 on a CPU with bfloat16 instructions and no GPU, else float32;
    the explicit settings are honoured; the config takes the three values, default ``auto``."""
    from pydantic import ValidationError

    from agriland_scale.config.schema import RuntimeConfig
    from agriland_scale.models.saving import training_policy

    assert RuntimeConfig().train_precision == "auto"
    assert RuntimeConfig(train_precision="bfloat16").train_precision == "bfloat16"
    with pytest.raises(ValidationError):
        RuntimeConfig(train_precision="float16")
    plain, native = tmp_path / "plain", tmp_path / "native"
    plain.write_text(NO_BF16)
    native.write_text(BF16)
    for model in ("cae", "unet"):
        assert training_policy("auto", model, gpu=False, cpuinfo=str(plain)) == "float32"
        assert training_policy("auto", model, gpu=False, cpuinfo=str(native)) == "mixed_bfloat16"
        assert training_policy("auto", model, gpu=True, cpuinfo=str(native)) == "float32"
        assert training_policy("auto", model, gpu=False, cpuinfo=str(tmp_path / "none")) == "float32"
        assert training_policy("float32", model, cpuinfo=str(native)) == "float32"
        assert training_policy("bfloat16", model, cpuinfo=str(plain)) == "mixed_bfloat16"
    with pytest.raises(ValueError, match="train precision"):
        training_policy("half", "unet")


def _unet_cfg(demo_cfg):
    train = demo_cfg.segment.train.model_copy(update={"epochs": 1, "batch_size": 4, "augment_factor": 0})
    return demo_cfg.segment.model_copy(update={"window": SIZE, "train": train})


def _label() -> np.ndarray:
    """Labels on a 64 px band only (255 elsewhere): a few windows, both classes, both sides of the split."""
    label = np.full((1024, 1024), 255, dtype="uint8")
    label[:64] = 0
    label[:64, 160:640] = 1
    return label


def test_bfloat16_unet_training_saves_a_float32_model(cube_store, demo_cfg, tmp_path):
    """A ``bfloat16`` training computes in bfloat16, records it, and saves a float32 model
    (every layer float32, float32 output); the global policy is float32 again after."""
    import keras

    from agriland_scale.models import unet
    from agriland_scale.models.files import read_sidecar
    from agriland_scale.models.train import train_unet

    seen = []
    build = unet.build_unet

    def spy(*a, **k):
        m = build(*a, **k)
        seen.append(m.layers[1].compute_dtype)
        return m

    out = tmp_path / "unet.keras"
    mp = pytest.MonkeyPatch()
    mp.setattr(unet, "build_unet", spy)
    try:
        meta = train_unet(cube_store, _label(), _unet_cfg(demo_cfg), str(out), seed=0, precision="bfloat16")
    finally:
        mp.undo()
    assert seen == ["bfloat16"]
    assert keras.config.dtype_policy().name == "float32"
    assert meta["train_precision"] == "mixed_bfloat16"
    assert read_sidecar(out)["train_precision"] == "mixed_bfloat16"
    model = keras.saving.load_model(out, compile=False)
    assert _policies(model) == {"float32"}
    assert model.output.dtype == "float32"
    assert np.isfinite(meta["validation_metrics"]["iou"])


def test_policy_is_restored_when_training_fails(cube_store, demo_cfg, tmp_path, monkeypatch):
    """The model is built under mixed_bfloat16 and the global policy is float32 again after an error."""
    import keras

    from agriland_scale.models import unet
    from agriland_scale.models.train import train_unet

    seen = []

    class Boom(Exception):
        pass

    def failing(*a, **k):
        seen.append(keras.config.dtype_policy().name)
        raise Boom

    monkeypatch.setattr(unet, "build_unet", failing)
    with pytest.raises(Boom):
        train_unet(cube_store, _label(), _unet_cfg(demo_cfg), str(tmp_path / "u.keras"), precision="bfloat16")
    assert seen == ["mixed_bfloat16"]
    assert keras.config.dtype_policy().name == "float32"


def _train_tiny_cae(cube_store, demo_cfg, tmp_path, precision: str) -> dict:
    """One step of a small-headed CAE on 4 patches of 32 px, saved as ``tmp_path/cae.keras``."""
    from agriland_scale.models.train import train_cae

    e = demo_cfg.embed
    cfg = e.model_copy(
        update={
            "dense_units": 16,
            "embedding_dim": 8,
            "train": e.train.model_copy(update={"epochs": 1, "steps_per_epoch": 1, "batch_size": 2}),
        }
    )
    ys = xs = np.array([0, 32, 64, 96])
    return train_cae(cube_store, ys, xs, cfg, 32, str(tmp_path / "cae.keras"), seed=0, precision=precision)


def test_auto_on_a_cpu_without_bfloat16_trains_float32(cube_store, demo_cfg, tmp_path, monkeypatch):
    """``auto`` where the CPU lacks bfloat16 instructions: float32, recorded as such."""
    import keras

    from agriland_scale.models import saving, worker

    assert saving.training_policy("auto", "cae", gpu=False) == (
        "mixed_bfloat16" if worker.cpu_has_bfloat16() else "float32"
    )
    monkeypatch.setattr(worker, "cpu_has_bfloat16", lambda cpuinfo="/proc/cpuinfo": False)
    meta = _train_tiny_cae(cube_store, demo_cfg, tmp_path, "auto")
    assert meta["train_precision"] == "float32"
    assert json.loads((tmp_path / "encoder.keras.json").read_text())["train_precision"] == "float32"
    assert keras.config.dtype_policy().name == "float32"


def test_bfloat16_cae_training_saves_float32_cae_and_encoder(cube_store, demo_cfg, tmp_path):
    """The CAE in bfloat16: reconstruction and embedding layers float32 while training; the saved
    CAE and encoder are float32 throughout and their sidecars say mixed_bfloat16."""
    import keras

    meta = _train_tiny_cae(cube_store, demo_cfg, tmp_path, "bfloat16")
    assert meta["train_precision"] == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"
    for name in ("cae.keras", "encoder.keras"):
        model = keras.saving.load_model(tmp_path / name, compile=False)
        assert _policies(model) == {"float32"}, name
        assert all(o.dtype == "float32" for o in model.outputs)
        side = json.loads((tmp_path / f"{name}.json").read_text())
        assert side["train_precision"] == "mixed_bfloat16"
    assert np.isfinite(meta["history"]["loss"][-1])
