"""``runtime.engine``: ONNX Runtime predictions equal TensorFlow's, with no TensorFlow in the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

BANDS = ["red", "green", "blue"]
RMAX = 0.3
SIZE = 64


def _sidecar(task: str, **extra) -> dict:
    return {
        "task": task,
        "bands": BANDS,
        "normalisation": {
            "type": "reflectance / reflectance_max, clipped to [0, 1]",
            "reflectance_max": RMAX,
        },
        "patch_size": SIZE,
        **extra,
    }


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """A small CAE encoder and plain U-Net (random weights, seed 0) with their sidecars."""
    import keras

    from agriland_scale.models.encoder import build_cae, encoder_from_cae
    from agriland_scale.models.files import write_sidecar
    from agriland_scale.models.unet import build_unet

    d = tmp_path_factory.mktemp("engines")
    keras.utils.set_random_seed(0)
    enc = encoder_from_cae(build_cae(SIZE, 3, head="gap", weights="none", embedding_dim=8, dense_units=32))
    enc.save(d / "encoder.keras")
    write_sidecar(d / "encoder.keras", _sidecar("embedding", model="cae_encoder", embedding_dim=8))
    unet = build_unet("plain", SIZE, 3, weights="none", filters=(8, 16, 32, 64, 128))
    unet.save(d / "unet.keras")
    write_sidecar(d / "unet.keras", _sidecar("segmentation", model="unet_plain", encoder="plain"))
    (d / "unet.keras.stac.json").write_text(json.dumps({"type": "Feature", "assets": {}}))
    return d


def test_auto_follows_the_engine_table_and_falls_back_to_tensorflow(monkeypatch):
    """``runtime.engine: auto`` (bench/results/engines.txt): float32 models in ONNX Runtime,
    else OpenVINO; bfloat16 models in OpenVINO, else TensorFlow; GPU workers and float16 in
    TensorFlow; TensorFlow where neither runtime is installed."""
    from agriland_scale.errors import MissingDependency
    from agriland_scale.models import engines

    installed = {"onnxruntime", "openvino"}
    monkeypatch.setattr(engines, "have_onnxruntime", lambda module="onnxruntime": module in installed)
    assert engines.choose_engine("tensorflow", "embedding") == "tensorflow"
    assert engines.choose_engine("onnx", "segmentation", "mixed_bfloat16") == "onnx"
    assert engines.choose_engine("auto", "embedding", "float32") == "onnx"
    assert engines.choose_engine("auto", "segmentation", "mixed_bfloat16") == "openvino"
    assert engines.choose_engine("auto", "segmentation", "float32") == "onnx"
    assert engines.choose_engine("auto", "embedding", "mixed_bfloat16") == "openvino"
    assert engines.choose_engine("auto", "embedding", "mixed_float16") == "tensorflow"
    assert engines.choose_engine("auto", "embedding", "float32", gpu=True) == "tensorflow"
    installed.discard("onnxruntime")
    assert engines.choose_engine("auto", "embedding", "float32") == "openvino"
    installed.discard("openvino")
    assert engines.choose_engine("auto", "segmentation", "mixed_bfloat16") == "tensorflow"
    with pytest.raises(MissingDependency, match="openvino is not installed"):
        engines.choose_engine("openvino", "embedding")
    installed.clear()
    assert engines.choose_engine("auto", "embedding") == "tensorflow"
    with pytest.raises(MissingDependency, match=r"\[infer\]"):
        engines.choose_engine("onnx", "embedding")


_CHILD = """
import json, sys
import numpy as np
from agriland_scale.models import worker
from agriland_scale.models.embed import _embed_batch
from agriland_scale.models.segment import predict_block, _open
a = json.loads(sys.argv[1])
y0, x0 = np.array(a["y0"]), np.array(a["x0"])
emb = _embed_batch(a["encoder"], a["store"], y0, x0, np.ones(len(y0), bool), a["size"], a["bands"],
                   a["rmax"], 8, 4, "cube", "float32", "onnx")
model, lock = worker.get_model(a["unet"], "float32", None, "onnx")
refl, clear = _open(a["store"], "cube", a["bands"])
prob = predict_block(model, refl, clear, 0, 0, 384, 384, window=a["size"], overlap=16,
                     reflectance_max=a["rmax"], batch_size=8, lock=lock)
np.save(a["out"] + "-emb.npy", emb)
np.save(a["out"] + "-prob.npy", prob)
if a["openvino"]:
    model, lock = worker.get_model(a["unet"], "float32", None, "openvino")
    prob = predict_block(model, refl, clear, 0, 0, 384, 384, window=a["size"], overlap=16,
                         reflectance_max=a["rmax"], batch_size=8, lock=lock)
    np.save(a["out"] + "-prob-ov.npy", prob)
print(json.dumps({m: m in sys.modules for m in ("tensorflow", "keras", "onnxruntime")}))
"""


def test_onnx_engine_predicts_like_tensorflow_with_no_tensorflow_imported(
    small_models, cube_store, tmp_path, monkeypatch
):
    """Embeddings and the blended probability of the demo cube: ONNX Runtime (and OpenVINO,
    float32, where installed) in a fresh process
    (neither tensorflow nor keras imported there) against TensorFlow float32, max |d| <= 1e-4 and
    >= 99.9 % equal mask pixels. The U-Net's artifact is the one exported at the end of training
    (sidecar record); the encoder has none and is exported once into the worker cache."""
    from agriland_scale.models import engines, onnx_export, worker
    from agriland_scale.models.embed import _embed_batch
    from agriland_scale.models.files import read_sidecar
    from agriland_scale.models.segment import _open, predict_block

    cache = tmp_path / "cache"
    monkeypatch.setenv("AGRILAND_CACHE", str(cache))
    encoder, unet = str(small_models / "encoder.keras"), str(small_models / "unet.keras")
    rec = onnx_export.attach_onnx(unet)  # what training does at its end
    assert rec is not None and (small_models / "unet.onnx").is_file()
    assert read_sidecar(unet)["artifacts"]["onnx"] == rec
    assert rec["source_sha256"] == engines.sha256_file(unet)
    item = json.loads((small_models / "unet.keras.stac.json").read_text())
    assert item["assets"]["onnx"]["agriland:source_sha256"] == rec["source_sha256"]

    y0 = np.repeat(np.arange(0, 512, SIZE), 4)[:24]
    x0 = np.tile(np.arange(0, 4 * 96, 96), 6)[:24]
    args = {
        "encoder": encoder,
        "unet": unet,
        "store": cube_store,
        "size": SIZE,
        "bands": BANDS,
        "rmax": RMAX,
        "y0": y0.tolist(),
        "x0": x0.tolist(),
        "out": str(tmp_path / "onnx"),
        "openvino": engines.have_onnxruntime("openvino"),
    }
    env = dict(os.environ, AGRILAND_CACHE=str(cache))
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    imported = json.loads(r.stdout.strip().splitlines()[-1])
    assert imported == {"tensorflow": False, "keras": False, "onnxruntime": True}
    assert len(list((cache / "onnx").glob("*.onnx"))) == 1  # the encoder, exported once

    ref_emb = _embed_batch(encoder, cube_store, y0, x0, np.ones(len(y0), bool), SIZE, BANDS, RMAX, 8, 4)
    model, lock = worker.get_model(unet)
    refl, clear = _open(cube_store, "cube", BANDS)
    ref_prob = predict_block(
        model,
        refl,
        clear,
        0,
        0,
        384,
        384,
        window=SIZE,
        overlap=16,
        reflectance_max=RMAX,
        batch_size=8,
        lock=lock,
    )
    emb, prob = np.load(tmp_path / "onnx-emb.npy"), np.load(tmp_path / "onnx-prob.npy")
    assert np.abs(emb - ref_emb).max() <= 1e-4 * max(1.0, np.abs(ref_emb).max())
    ok = ~np.isnan(ref_prob)
    assert np.array_equal(ok, ~np.isnan(prob)) and ok.any()
    assert np.abs(prob[ok] - ref_prob[ok]).max() <= 1e-4
    assert ((prob[ok] >= 0.5) == (ref_prob[ok] >= 0.5)).mean() >= 0.999
    if args["openvino"]:  # OpenVINO on the same artifact, float32
        prob = np.load(tmp_path / "onnx-prob-ov.npy")
        assert np.abs(prob[ok] - ref_prob[ok]).max() <= 1e-4
        assert ((prob[ok] >= 0.5) == (ref_prob[ok] >= 0.5)).mean() >= 0.999


def test_a_stale_artifact_is_never_used(small_models, tmp_path, monkeypatch):
    """An artifact whose recorded source sha256 is not the model's own is not loaded: with no
    export allowed the engine refuses, saying why; else it exports into the cache under the
    model's own sha256."""
    from agriland_scale.errors import CorruptInput
    from agriland_scale.models import engines, onnx_export
    from agriland_scale.models.files import read_sidecar, write_sidecar

    monkeypatch.setenv("AGRILAND_CACHE", str(tmp_path / "cache"))
    unet = small_models / "unet.keras"
    if not (small_models / "unet.onnx").is_file():
        onnx_export.attach_onnx(unet)
    assert engines.ensure_onnx(unet, export=False) == small_models / "unet.onnx"
    meta = read_sidecar(unet)
    stale = json.loads(json.dumps(meta))
    stale["artifacts"]["onnx"]["source_sha256"] = "0" * 64  # exported from another .keras file
    write_sidecar(unet, stale)
    try:
        with pytest.raises(CorruptInput, match="no up-to-date ONNX artifact"):
            engines.ensure_onnx(unet, export=False)
        (small_models / "unet.onnx").write_bytes(b"not this model")  # and a changed artifact
        write_sidecar(unet, meta)
        with pytest.raises(CorruptInput, match="no up-to-date ONNX artifact"):
            engines.ensure_onnx(unet, export=False)
    finally:
        write_sidecar(unet, meta)
        onnx_export.attach_onnx(unet)


def test_the_mlm_item_with_its_onnx_asset_stays_valid(tmp_path):
    """The asset training adds to ``unet.keras.stac.json`` for ``unet.onnx`` keeps the Item valid (MLM 1.4)."""
    from agriland_scale.models.mlm import add_onnx_asset, write_mlm_item
    from tests.test_stac_valid import _end, validate_files

    meta = _sidecar("segmentation", model="unet", encoder="plain", initial_weights="none", epochs=1, seed=0)
    item = write_mlm_item(
        tmp_path / "unet.keras",
        meta,
        bbox_lonlat=[-75.70, 37.62, -75.58, 37.71],
        n_params=12345,
        output={
            "name": "agricultural land probability",
            "tasks": ["semantic-segmentation"],
            "result": {
                "shape": [-1, SIZE, SIZE, 1],
                "dim_order": ["batch", "height", "width", "channel"],
                "data_type": "float32",
            },
        },
    )
    rec = {"file": "unet.onnx", "sha256": "a" * 64, "source_sha256": "b" * 64}
    assert add_onnx_asset(tmp_path / "unet.keras", rec) == item
    asset = json.loads(item.read_text())["assets"]["onnx"]
    assert asset["href"] == "./unet.onnx" and asset["mlm:artifact_type"] == "onnx"
    _end(validate_files([item]))


def test_training_exports_the_artifact_beside_the_model(cube_store, demo_cfg, tmp_path):
    """``onnx=True``: ``unet.onnx`` beside ``unet.keras`` at the end of training, recorded in the
    sidecar and the MLM Item with the sha256 of the ``.keras`` file it came from, and used as is."""
    from agriland_scale.models import engines
    from agriland_scale.models.files import read_sidecar
    from agriland_scale.models.train import train_unet

    label = np.zeros((1024, 1024), dtype="uint8")
    label[:, :512] = 1
    train = demo_cfg.segment.train.model_copy(update={"epochs": 1, "batch_size": 4, "augment_factor": 0})
    cfg = demo_cfg.segment.model_copy(update={"window": SIZE, "train": train})
    out = tmp_path / "unet.keras"
    train_unet(cube_store, label, cfg, str(out), seed=0, onnx=True)
    rec = read_sidecar(out)["artifacts"]["onnx"]
    assert rec["file"] == "unet.onnx" and rec["source_sha256"] == engines.sha256_file(out)
    assert rec["sha256"] == engines.sha256_file(tmp_path / "unet.onnx")
    item = json.loads((tmp_path / "unet.keras.stac.json").read_text())
    assert item["assets"]["onnx"]["agriland:source_sha256"] == rec["source_sha256"]
    assert engines.ensure_onnx(out, export=False) == tmp_path / "unet.onnx"


def test_auto_takes_another_engine_only_where_its_artifact_is_here_or_the_stage_pays(
    small_models, tmp_path, monkeypatch
):
    """``auto`` on a model without an ONNX artifact: TensorFlow for a small stage (an export costs
    20-120 s), the engine of the table from EXPORT_PAYS_FROM images or once an artifact is
    cached; an explicit engine is always honoured. Nothing is exported by the choice."""
    from agriland_scale.models import engines

    monkeypatch.setenv("AGRILAND_CACHE", str(tmp_path / "cache"))
    enc = small_models / "encoder.keras"
    big = engines.EXPORT_PAYS_FROM
    assert engines.resolve("auto", "embedding", enc, units=49) == "tensorflow"
    assert engines.resolve("auto", "embedding", enc) == "tensorflow"  # a warm-up: units unknown
    assert engines.resolve("auto", "embedding", enc, units=big) == "onnx"
    assert engines.resolve("onnx", "embedding", enc, units=1) == "onnx"
    assert (
        engines.resolve("auto", "segmentation", small_models / "unet.keras", "float32", units=big) == "onnx"
    )
    assert (
        engines.resolve("auto", "segmentation", small_models / "unet.keras", "float16", units=big)
        == "tensorflow"
    )
    assert not (tmp_path / "cache" / "onnx").exists()  # choosing exported nothing
    cached = tmp_path / "cache" / "onnx" / f"{engines.sha256_file(enc)}.onnx"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"an export")  # what ensure_onnx made once on this machine
    assert engines.has_artifact(enc)
    assert engines.resolve("auto", "embedding", enc, units=1) == "onnx"
    assert not engines.has_artifact(enc, input_size=2 * SIZE)  # another window: another export


def test_tensorflow_is_imported_at_launch_only_when_a_stage_needs_it(small_models, tmp_path, monkeypatch):
    """The launched cluster's workers import TensorFlow for training, for an engine that resolves
    to TensorFlow, never for an inference-only run whose models have their artifacts (``auto``)
    nor for the data stages alone. Clusters (DEC) need no TensorFlow any more."""
    from agriland_scale.config.schema import RunConfig
    from agriland_scale.models import engines
    from agriland_scale.pipeline.launch import tensorflow_needed

    monkeypatch.setenv("AGRILAND_CACHE", str(tmp_path / "cache"))
    enc, unet = small_models / "encoder.keras", small_models / "unet.keras"

    def cfg(engine="auto", **over):
        base = {
            "name": "t",
            "search": {
                "api": "local",
                "catalog": "builtin:virginia",
                "collections": ["c"],
                "bbox": [0, 0, 1, 1],
            },
            "embed": {"model": str(enc)},
            "segment": {"model": str(unet)},
            "runtime": {"engine": engine},
        }
        for k, v in over.items():
            base[k] = v
        return RunConfig.model_validate(base)

    everything = [
        "search",
        "cube",
        "patches",
        "cae",
        "embeddings",
        "clusters",
        "unet",
        "segmentation",
        "publish",
    ]
    assert not tensorflow_needed(cfg(), ["search", "cube", "patches", "clusters", "publish"])
    assert tensorflow_needed(cfg(), everything)  # no artifacts yet: auto keeps TensorFlow
    assert tensorflow_needed(cfg("tensorflow"), everything)
    for model in (enc, unet):
        cached = tmp_path / "cache" / "onnx" / f"{engines.sha256_file(model)}.onnx"
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(b"an export")
    assert not tensorflow_needed(cfg(), everything)  # both exported: no TensorFlow anywhere
    assert tensorflow_needed(cfg(), ["cae", "embeddings"]) is False
    assert tensorflow_needed(cfg(embed={}), ["cae", "embeddings"])  # the CAE is trained: TensorFlow
    assert tensorflow_needed(cfg(segment={"labels": "builtin:virginia/labels.geojson"}), ["unet"])


_RUN_CHILD = """
import json, sys
from agriland_scale.config import load_config
from agriland_scale.pipeline.runner import run
a = json.loads(sys.argv[1])
cfg = load_config(a["pipeline"]).with_overrides(**a["overrides"])
run(cfg, a["out"], scheduler=a["scheduler"], report=lambda *x: None)
print(json.dumps({m: m in sys.modules for m in ("tensorflow", "keras")}))
"""


def test_an_inference_only_run_with_artifacts_imports_no_tensorflow_anywhere(small_models, tmp_path):
    """``runtime.engine: auto`` (the default) and given models whose ONNX artifacts are at hand:
    the whole run (search to publish, clusters included) imports neither TensorFlow nor Keras in
    the agriland process or on the worker, and the products say which engine made them."""
    import xarray as xr
    from distributed import Client, LocalCluster

    from agriland_scale.models import onnx_export

    for name in ("encoder.keras", "unet.keras"):
        assert onnx_export.attach_onnx(str(small_models / name)) is not None
    from tests.conftest import DEMO_YAML, FAST

    overrides = {
        **FAST,
        "patches.size": SIZE,
        "patches.stride": SIZE,
        "embed.model": str(small_models / "encoder.keras"),
        "segment.model": str(small_models / "unet.keras"),
        "segment.window": SIZE,
        "segment.overlap": 16,
        "segment.inference_window": None,
        "runtime.inference_precision": "float32",
    }
    env = os.environ | {"TF_NUM_INTRAOP_THREADS": "2", "OMP_NUM_THREADS": "2"}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            args = {
                "pipeline": str(DEMO_YAML),
                "overrides": overrides,
                "out": str(tmp_path / "run"),
                "scheduler": cluster.scheduler_address,
            }
            r = subprocess.run(
                [sys.executable, "-c", _RUN_CHILD, json.dumps(args)],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
                check=False,
            )
            assert r.returncode == 0, r.stderr[-3000:]
            assert json.loads(r.stdout.strip().splitlines()[-1]) == {"tensorflow": False, "keras": False}
            on_workers = client.run(lambda: sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
            assert list(on_workers.values()) == [[]]
    from agriland_scale.store import open_product

    emb = open_product(str(tmp_path / "run"), "embeddings")
    seg = open_product(str(tmp_path / "run"), "segmentation")
    assert emb["embedding"].attrs["engine"] == "onnx" and seg["probability"].attrs["engine"] == "onnx"
    assert isinstance(emb, xr.Dataset) and int(emb["embedding"].notnull().any("dim").sum()) > 0
    assert float(seg["probability"].max()) > 0


def test_a_training_only_run_exports_the_artifact_for_the_runs_that_apply_the_model(monkeypatch):
    """Under ``auto`` the training stages export the ONNX artifact when the run ends with them
    (``train-cae``, ``train-unet``, ``--until``): the model is trained to be applied elsewhere. A
    run that trains and applies at once does not (its own stage exports where it pays); an
    explicit engine always does; without ONNX Runtime nothing is exported."""
    from types import SimpleNamespace

    from agriland_scale.pipeline import model_stages as stages

    def ctx(engine, *wanted):
        return SimpleNamespace(cfg=SimpleNamespace(runtime=SimpleNamespace(engine=engine)), wanted=wanted)

    whole = ("search", "cube", "patches", "cae", "embeddings", "clusters", "unet", "segmentation", "publish")
    assert stages._export_after_training(ctx("auto", "search", "cube", "patches", "cae"), "cae")
    assert stages._export_after_training(ctx("auto", *whole[:7]), "unet")
    assert not stages._export_after_training(ctx("auto", *whole), "cae")
    assert not stages._export_after_training(ctx("auto", *whole), "unet")
    assert stages._export_after_training(ctx("openvino", *whole), "unet")
    assert not stages._export_after_training(ctx("tensorflow", "cae"), "cae")
    monkeypatch.setattr(stages, "have_onnxruntime", lambda module="onnxruntime": False)
    assert not stages._export_after_training(ctx("auto", "cae"), "cae")
