"""Nothing lost, nothing stale, nothing silently wrong: guarantees on copies of the session's
real demo run (short schedules, two-worker cluster). Each test fails without the guarantee
it names."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
import yaml
import zarr

from agriland_scale.errors import (
    BandMismatch,
    ConfigError,
    CorruptInput,
    LabelError,
    ModelMismatch,
    OutputExists,
    RunLocked,
)
from agriland_scale.layout import LOCK_NAME
from agriland_scale.models.embed import check_model
from agriland_scale.pipeline.runner import run
from agriland_scale.publish.inspect import format_summary, summarise_run
from agriland_scale.store import has_group, history, reader

pytestmark = pytest.mark.slow

AGRILAND = str(Path(sys.executable).parent / "agriland")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs"))
    return dst


def _stage(out: Path, name: str) -> str | None:
    try:
        return json.loads((out / "run.json").read_text())["stages"].get(name)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_overwrite_deletes_only_what_the_run_wrote(demo_run, external_cluster, tmp_path):
    cfg, out, record = demo_run
    copy = _copy(out, tmp_path / "copy")
    mine = {
        "models/my_model.h5": b"p",
        "cog/notes.txt": b"field notes",
        "notes.md": b"# my notes",
        "labels/drawn.json": b"{}",
    }
    for rel, data in mine.items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    listed = [f for fs in record["files"].values() for f in fs]
    assert {
        "models/encoder.keras",
        "models/unet.keras",
        "cog/probability.tif",
        "items.json",
        "stac/collection.json",
        "report.html",
    } <= set(listed)
    other = cfg.with_overrides(name="another-run")
    rec = run(other, copy, scheduler=external_cluster, overwrite=True, until="search")
    for rel, data in mine.items():
        assert (copy / rel).read_bytes() == data, rel
    assert [v["message"] for v in history(copy)] == ["Repository initialized"]  # the old store is gone
    assert not any((copy / rel).exists() for rel in listed if rel != "items.json")
    assert sorted(p.name for p in (copy / "cog").iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in (copy / "models").iterdir()) == ["my_model.h5"]
    assert rec["config"]["name"] == "another-run" and rec["stages"] == {"search": "done"}


def test_failed_force_leaves_no_stale_product(demo_run, external_cluster, tmp_path):
    """`--force clusters` that fails: the old clusters are not readable in the latest version
    (an earlier version still has them), and no COG, gallery, STAC file or report of them stays."""
    cfg, out, _ = demo_run
    copy = _copy(out, tmp_path / "copy")
    assert has_group(reader(copy), "clusters")
    before = history(copy)[0]["version"]
    for chunk in (copy / "agriland.icechunk" / "chunks").iterdir():
        chunk.write_bytes(b"\x00garbage" * 10)  # no stored array can be decoded any more
    with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises
        run(cfg, copy, scheduler=external_cluster, force=["clusters"])
    rec = json.loads((copy / "run.json").read_text())
    assert rec["stages"]["clusters"] == "failed" and "publish" not in rec["stages"]
    with pytest.raises((FileNotFoundError, KeyError, OSError, zarr.errors.GroupNotFoundError)):
        xr.open_zarr(reader(copy), group="clusters", consolidated=False)
    assert has_group(reader(copy), "segmentation")  # not forced: kept
    assert has_group(reader(copy, before), "clusters")  # the earlier version keeps them
    for rel in (
        "cog/cluster_map.tif",
        "cog/probability.tif",
        "clusters/gallery.png",
        "quicklook.png",
        "stac/collection.json",
    ):
        assert not (copy / rel).exists(), rel
    summary = summarise_run(copy)
    assert [s["stage"] for s in summary["stale"]] == ["clusters", "publish"]
    text = format_summary(summary)
    assert "stale: clusters failed" in text and "stale: publish" in text


def test_second_run_refused_while_first_runs_then_sigterm(demo_run, external_cluster, tmp_path):
    """Two runs on one --out: the second is refused naming the first, which goes on unharmed;
    SIGTERM then stops the first like Ctrl-C (exit 143, stage 'interrupted', lock released),
    and the rerun completes."""
    cfg, out, _ = demo_run
    copy = _copy(out, tmp_path / "copy")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # one patch a batch: 13 embedding blocks, time enough to try a second run and to stop it
    cmd = [
        AGRILAND,
        "run",
        str(pipeline),
        "--out",
        str(copy),
        "--scheduler",
        external_cluster,
        "--quiet",
        "--set",
        "embed.batch_size=1",
    ]
    first = subprocess.Popen(
        cmd + ["--force", "embeddings"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while _stage(copy, "embeddings") != "running":
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(RunLocked, match=f"in use by 'agriland run' \\(pid {first.pid} on host"):
        run(cfg.with_overrides(**{"embed.batch_size": 1}), copy, scheduler=external_cluster)
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    rec = json.loads((copy / "run.json").read_text())
    assert rec["stages"]["embeddings"] == "interrupted" and "running" not in rec["stages"].values()
    assert not (copy / LOCK_NAME).exists()
    assert "stale: embeddings interrupted" in format_summary(summarise_run(copy))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    rec = json.loads((copy / "run.json").read_text())
    assert set(rec["stages"].values()) == {"done"}


def test_models_are_checked_for_their_task(demo_run, tmp_path):
    cfg, out, _ = demo_run
    models = out / "models"
    e, s = cfg.embed, cfg.segment
    check_model(str(models / "encoder.keras"), "embedding", e.bands, e.reflectance_max, cfg.patches.size)
    check_model(str(models / "unet.keras"), "segmentation", s.bands, s.reflectance_max, s.window)
    with pytest.raises(
        ModelMismatch, match=r"segment.model = .*encoder.keras is a CAE encoder.*needs a U-Net"
    ):
        check_model(
            str(models / "encoder.keras"),
            "segmentation",
            s.bands,
            s.reflectance_max,
            s.window,
            key="segment.model",
        )
    with pytest.raises(ModelMismatch, match="is a U-Net"):
        check_model(
            str(models / "unet.keras"),
            "embedding",
            e.bands,
            e.reflectance_max,
            cfg.patches.size,
            key="embed.model",
        )
    with pytest.raises(ModelMismatch, match="whole autoencoder.*encoder.keras beside it"):
        check_model(str(models / "cae.keras"), "embedding", e.bands, e.reflectance_max, cfg.patches.size)
    with pytest.raises(BandMismatch, match="trained on bands"):
        check_model(
            str(models / "unet.keras"), "segmentation", ["red", "green", "nir"], s.reflectance_max, s.window
        )
    with pytest.raises(ModelMismatch, match="set segment.window to 256"):
        check_model(str(models / "unet.keras"), "segmentation", s.bands, s.reflectance_max, 128)
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"this is not a model" * 100)
    shutil.copy(models / "unet.keras.json", tmp_path / "junk.keras.json")
    with pytest.raises(CorruptInput, match="junk.keras is not a Keras model file"):
        check_model(str(junk), "segmentation", s.bands, s.reflectance_max, s.window)
    cut = tmp_path / "cut.keras"
    cut.write_bytes((models / "unet.keras").read_bytes()[: (models / "unet.keras").stat().st_size // 2])
    with pytest.raises(CorruptInput, match="cut.keras is not a"):
        check_model(str(cut), "segmentation", s.bands, s.reflectance_max, s.window)
    with pytest.raises(CorruptInput, match="no such file"):
        check_model(str(tmp_path / "missing.keras"), "segmentation", s.bands, s.reflectance_max, s.window)


def test_a_model_with_a_borrowed_sidecar_is_refused(demo_run, tmp_path):
    """The encoder copied beside the U-Net's sidecar (and the other way round): the sidecar says
    the right task, bands and size, but the file's own model does not fit (ran with exit 0 and
    a probability of ~0.01 everywhere). Refused before the run, from the file's config."""
    cfg, out, _ = demo_run
    models = out / "models"
    e, s = cfg.embed, cfg.segment
    shutil.copy(models / "encoder.keras", tmp_path / "fake_unet.keras")
    shutil.copy(models / "unet.keras.json", tmp_path / "fake_unet.keras.json")
    with pytest.raises(
        ModelMismatch,
        match=r"segment\.model = .*fake_unet\.keras is not the model its sidecar "
        r"describes \(its output is a Dense layer 'embedding'",
    ):
        check_model(
            str(tmp_path / "fake_unet.keras"),
            "segmentation",
            s.bands,
            s.reflectance_max,
            s.window,
            key="segment.model",
        )
    shutil.copy(models / "unet.keras", tmp_path / "fake_encoder.keras")
    shutil.copy(models / "encoder.keras.json", tmp_path / "fake_encoder.keras.json")
    with pytest.raises(ModelMismatch, match=r"not the model its sidecar describes \(its output is a Conv2D"):
        check_model(
            str(tmp_path / "fake_encoder.keras"), "embedding", e.bands, e.reflectance_max, cfg.patches.size
        )


def test_segmentation_refuses_a_model_whose_outputs_are_not_probabilities():
    """What the loaded model computes is checked too: a 1-channel model without a sigmoid (its
    outputs beyond [0, 1]) stops the segmentation of a block with ModelMismatch."""
    import keras
    import numpy as np

    from agriland_scale.models.segment import predict_block

    inp = keras.Input((64, 64, 3))
    linear = keras.Model(
        inp, keras.layers.Conv2D(1, 1, kernel_initializer="ones", bias_initializer="ones")(inp)
    )
    refl = np.full((3, 128, 128), 0.5, dtype="float32")
    clear = np.ones((128, 128), dtype="uint8")
    with pytest.raises(
        ModelMismatch, match=r"outputs of shape \(\d+, 64, 64, 1\) in \[[\d.]+, 2\.5\].*not a U-Net"
    ):
        predict_block(
            linear, refl, clear, 0, 0, 64, 64, window=64, overlap=16, reflectance_max=1.0, batch_size=4
        )
    sigmoid = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(inp))
    prob = predict_block(
        sigmoid, refl, clear, 0, 0, 64, 64, window=64, overlap=16, reflectance_max=1.0, batch_size=4
    )
    assert prob.shape == (64, 64) and np.all((prob >= 0) & (prob <= 1))


def test_unet_stage_refuses_labels_without_a_positive_pixel(demo_run, external_cluster, tmp_path):
    """Labels whose classes are all 'other' stop the U-Net stage before training (was IoU 0, exit 0)."""
    cfg, out, _ = demo_run
    copy = _copy(out, tmp_path / "copy")
    before = (copy / "models" / "unet.keras").read_bytes()
    bad = cfg.with_overrides(**{"segment.positive_classes": ["vineyard"]})
    t0 = time.perf_counter()
    with pytest.raises(
        LabelError, match=r"hold 0 agricultural and [\d,]+ other pixels.*segment.positive_classes"
    ):
        run(bad, copy, scheduler=external_cluster, force=["unet"], until="unet")
    assert time.perf_counter() - t0 < 60  # no training started
    assert (
        not (copy / "models" / "unet.keras").exists()
        or (copy / "models" / "unet.keras").read_bytes() == before
    )


def test_k_larger_than_the_valid_patches_is_refused_before_training(demo_run, external_cluster, tmp_path):
    cfg, out, _ = demo_run
    copy = _copy(out, tmp_path / "copy")
    with pytest.raises(ConfigError, match="cluster.k is 60 but the run's region has only 49 valid"):
        run(cfg.with_overrides(**{"cluster.k": 60}), copy, scheduler=external_cluster, force=["clusters"])
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="cluster.k is 60 but the region has only 49 valid patch"):
        run(cfg.with_overrides(**{"cluster.k": 60}), fresh, scheduler=external_cluster)
    rec = json.loads((fresh / "run.json").read_text())
    assert rec["stages"]["patches"] == "failed" and "cae" not in rec["stages"]


def test_force_never_deletes_a_model_the_config_reads(demo_run, external_cluster, tmp_path):
    """`embed.model` pointing at the run's own encoder, with `--force cae` (which would delete
    what the cae stage wrote): refused, the encoder kept."""
    cfg, out, _ = demo_run
    copy = _copy(out, tmp_path / "copy")
    enc = copy / "models" / "encoder.keras"
    before = enc.read_bytes()
    own = cfg.with_overrides(**{"embed.model": str(enc)})
    with pytest.raises(OutputExists, match=r"--force cae would delete .*encoder.keras.*reads as an input"):
        run(own, copy, scheduler=external_cluster, force=["cae"])
    with pytest.raises(OutputExists, match=r"--overwrite would delete .*encoder.keras"):
        run(own.with_overrides(name="other"), copy, scheduler=external_cluster, overwrite=True)
    assert enc.read_bytes() == before
