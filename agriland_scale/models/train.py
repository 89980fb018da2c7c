"""Training entry points: the self-supervised CAE and the U-Net, with the seed's augmentation.

Both run as one task on a Dask worker (the GPU one when the cluster has it), read their
patches from the Zarr cube, and save a ``.keras`` model with a JSON metadata sidecar. With
``precision`` (``runtime.train_precision``) giving ``mixed_bfloat16`` the model is built and
trained in bfloat16 with float32 master weights (the demo's steps 1.6-1.9x faster on a CPU with
AMX), its output layers in float32, and saved as its float32 copy: the saved model is the same
kind of file whichever precision trained it (the sidecar records ``train_precision``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.config.bands import canonical_band
from agriland_scale.config.schema import EmbedConfig, SegmentConfig
from agriland_scale.errors import CorruptInput
from agriland_scale.models import onnx_export
from agriland_scale.models import worker as _worker
from agriland_scale.models.callbacks import (
    CAE_LABEL,
    UNET_LABEL,
    WAITING_FOR_TENSORFLOW,
    phase,
    relay_callback,
    timed_checkpoint,
)
from agriland_scale.models.mlm import write_mlm_item
from agriland_scale.models.saving import (
    as_float32,
    dtype_policy,
    lonlat_bounds,
    normalisation,
    relocated,
    saved_to,
    training_policy,
)
from agriland_scale.models.windows import _metrics, choose_threshold, training_windows, unet_augment_fn
from agriland_scale.patches import read_patches
from agriland_scale.store import open_cube

__all__ = ["train_cae", "train_unet"]

log = logging.getLogger(__name__)


# a schedule of at most this many steps trains eagerly (``run_eagerly``): tracing the training
# step costs more than it saves. Measured (the demo's CAE, batch 8, 2 cores): graph mode 22 s
# for the first step (tracing) then 3.1 s a step, eager 6.5 s then 4.6 s a step, so eager is
# cheaper up to about 11 steps (smoke runs, tests); the demo's 18 steps and longer schedules
# keep graph mode. The same config always trains the same way (the seed's repeatability holds).
EAGER_MAX_STEPS = 10


def build_optimizer(model: Any) -> None:
    """Create the compiled ``model``'s optimizer state (Adam's moments) now, eagerly.

    Left to the first training step, Keras creates it while tracing the step function: the
    trace took twice as long, and the steps were slower too. Measured on the demo's CAE in
    bfloat16 (2 cores): the first step 24.5 -> 11.7 s, then 2.35 -> 1.86 s a step (float32:
    2.69 s a step either way; with the timed checkpoints, its whole training 102 -> 61 s).
    The moments start at zero either way.
    """
    model.optimizer.build(model.trainable_variables)


def _train_cae(
    cube_store: str,
    y0: np.ndarray,
    x0: np.ndarray,
    cfg: EmbedConfig,
    size: int,
    out_path: str,
    *,
    seed: int = 0,
    region: str = "",
    group: str = "cube",
    progress_tag: str | None = None,
    precision: str = "float32",
) -> dict[str, Any]:
    """Train the CAE on patches at (y0, x0) of the cube; save it to ``out_path`` (.keras).

    Loss: MSE between the (augmented) patch and its reconstruction; Adam. Returns the
    training history and timing. With ``cfg.train.epochs == 0`` the model is saved untrained.
    """
    total = cfg.train.epochs * cfg.train.steps_per_epoch
    phase(progress_tag, CAE_LABEL, WAITING_FOR_TENSORFLOW, total=total)
    _worker.configure_tensorflow()
    import keras
    import tensorflow as tf

    from agriland_scale.models.encoder import build_cae, cae_augmenter

    t0 = time.perf_counter()
    phase(progress_tag, CAE_LABEL, f"reading {len(y0)} patches…", total=total)
    cube = open_cube(cube_store, group, dask=False)
    x = read_patches(cube["reflectance"], y0, x0, size, cfg.bands, cfg.reflectance_max)
    phase(progress_tag, CAE_LABEL, "building the model…", total=total)
    policy = training_policy(precision, "cae")
    with dtype_policy(policy):
        cae = build_cae(
            size,
            len(cfg.bands),
            head=cfg.head,
            weights=cfg.weights,
            embedding_dim=cfg.embedding_dim,
            dense_units=cfg.dense_units,
            seed=seed,
            bands=[canonical_band(b) for b in cfg.bands],
        )
        recon_model = keras.Model(cae.input, cae.get_layer("reconstruction").output)
    recon_model.compile(
        optimizer=keras.optimizers.Adam(cfg.train.learning_rate),
        loss="mse",
        run_eagerly=total <= EAGER_MAX_STEPS,
    )
    build_optimizer(recon_model)
    history: dict[str, list[float]] = {}
    tc = cfg.train
    if tc.epochs > 0:
        aug = cae_augmenter(seed) if tc.augment else None
        ds = tf.data.Dataset.from_tensor_slices(x).shuffle(len(x), seed=seed).repeat()
        ds = ds.batch(tc.batch_size)
        if aug is not None:
            ds = ds.map(lambda b: aug(b, training=True))
        ds = ds.map(lambda b: (b, b)).prefetch(2)
        # a checkpoint at an epoch's end once a minute at most, for long schedules
        ckpt = timed_checkpoint(Path(out_path).with_suffix(".checkpoint.keras"))
        relay = relay_callback(CAE_LABEL, tc.epochs, tc.steps_per_epoch, progress_tag)
        phase(progress_tag, CAE_LABEL, "tracing the first step…", total=total)
        h = recon_model.fit(
            ds,
            epochs=tc.epochs,
            steps_per_epoch=tc.steps_per_epoch,
            shuffle=False,
            verbose=0,
            callbacks=[ckpt, relay],
        )
        history = {k: [float(v) for v in vs] for k, vs in h.history.items()}
    from agriland_scale.models.encoder import encoder_from_cae
    from agriland_scale.models.files import write_sidecar

    phase(progress_tag, CAE_LABEL, "saving the model…", total, total)
    cae = as_float32(cae)  # a mixed-precision training saves its float32 copy
    cae.save(out_path)
    # the per-epoch checkpoint guards a long schedule until it ends; then the model replaces it
    Path(out_path).with_suffix(".checkpoint.keras").unlink(missing_ok=True)
    encoder_path = str(Path(out_path).with_name("encoder.keras"))
    encoder = encoder_from_cae(cae)
    encoder.save(encoder_path)

    meta = {
        "model": cae.name,
        "task": "embedding",
        "bands": list(cfg.bands),
        "normalisation": normalisation(cfg.reflectance_max, cfg.bands),
        "patch_size": size,
        "head": cfg.head,
        "embedding_dim": cfg.embedding_dim,
        "initial_weights": cfg.weights,
        "training_region": region,
        "training_patches": int(len(x)),
        "epochs": tc.epochs,
        "steps_per_epoch": tc.steps_per_epoch,
        "batch_size": tc.batch_size,
        "learning_rate": tc.learning_rate,
        "seed": seed,
        "train_precision": policy,
        "history": history,
        "seconds": time.perf_counter() - t0,
    }
    write_sidecar(out_path, meta)
    write_sidecar(encoder_path, meta | {"model": "cae_encoder", "cae": out_path})
    write_mlm_item(
        encoder_path,
        meta | {"model": "cae_encoder"},
        bbox_lonlat=lonlat_bounds(cube),
        n_params=encoder.count_params(),
        output={
            "name": "embedding",
            "tasks": ["similarity-search"],
            "result": {
                "shape": [-1, cfg.embedding_dim],
                "dim_order": ["batch", "embedding"],
                "data_type": "float32",
            },
        },
    )
    return meta | {"encoder_path": encoder_path}


def _train_unet(
    cube_store: str,
    label: np.ndarray | str,
    cfg: SegmentConfig,
    out_path: str,
    *,
    seed: int = 0,
    label_source: str = "",
    region: str = "",
    group: str = "cube",
    progress_tag: str | None = None,
    precision: str = "float32",
) -> dict[str, Any]:
    """Train a U-Net on windows of the cube labelled by ``label``.

    ``label`` is a uint8 array (1 / 0 / 255 = ignored, ``(y, x)`` on the cube grid), or the
    name of a group of ``cube_store`` whose ``label`` variable is read.

    Masked binary cross-entropy (unlabelled pixels ignored), Adam; validation windows come
    from a spatially separate part (``cfg.train.validation`` side); early stopping on
    validation loss with the best weights kept. IoU, F1 and pixel accuracy on the
    validation windows are computed after every epoch and returned. After training, the
    mask threshold with the best validation IoU (of 0.05 ... 0.95, :func:`choose_threshold`) is
    recorded as ``threshold``, with the validation metrics at it (precision, recall, mean
    probability against the labelled agricultural fraction: the over-prediction).
    """
    phase(progress_tag, UNET_LABEL, WAITING_FOR_TENSORFLOW)
    _worker.configure_tensorflow()
    import keras
    import tensorflow as tf

    from agriland_scale.models.files import write_sidecar
    from agriland_scale.models.unet import build_unet, masked_iou, unet_loss

    t0 = time.perf_counter()
    cube = open_cube(cube_store, group, dask=False)
    if isinstance(label, str):
        label = np.asarray(
            xr.open_dataset(cube_store, engine="zarr", group=label, chunks=None, consolidated=False)[
                "label"
            ].values
        )
    if label.shape != (cube.sizes["y"], cube.sizes["x"]):
        raise CorruptInput(
            f"label raster {label.shape} is not on the cube grid "
            f"({cube.sizes['y']}, {cube.sizes['x']}) of group '{group}': rerun the "
            "unet stage (agriland run ... --force unet)"
        )
    win, tc = cfg.window, cfg.train
    tr, va, split = training_windows(label, cfg, f"the labels {label_source or ''}".rstrip())

    def load(offsets):
        ys = np.array([o[0] for o in offsets])
        xs = np.array([o[1] for o in offsets])
        img = read_patches(cube["reflectance"], ys, xs, win, cfg.bands, cfg.reflectance_max)
        lab = np.stack([label[r : r + win, c : c + win] for r, c in offsets])[..., None]
        return img, lab

    phase(progress_tag, UNET_LABEL, f"reading {len(tr)} training and {len(va)} validation windows…")
    xtr, ytr = load(tr)
    xva, yva = load(va)
    phase(progress_tag, UNET_LABEL, "building the model…")
    n_b = xtr.shape[-1]
    policy = training_policy(precision, "unet")
    with dtype_policy(policy):
        model = build_unet(
            cfg.encoder, win, n_b, weights=cfg.weights, bands=[canonical_band(b) for b in cfg.bands]
        )
    steps = max(1, (len(xtr) * max(tc.augment_factor, 1)) // tc.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(tc.learning_rate),
        loss=unet_loss(tc.loss),
        metrics=[masked_iou],
        run_eagerly=tc.epochs * steps <= EAGER_MAX_STEPS,
    )
    build_optimizer(model)
    augment = unet_augment_fn(n_b, seed)

    ds = tf.data.Dataset.from_tensor_slices((xtr, ytr.astype("float32"))).shuffle(len(xtr), seed=seed)
    ds = ds.repeat().batch(tc.batch_size)
    if tc.augment_factor > 0:
        ds = ds.map(augment)
    ds = ds.prefetch(2)
    per_epoch: list[dict[str, float]] = []

    class Metrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            m = _metrics(yva, self.model.predict(xva, batch_size=cfg.batch_size, verbose=0))
            per_epoch.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}, **m})

    ckpt = str(Path(out_path).with_suffix(".best.keras"))
    callbacks = [
        Metrics(),
        relay_callback(UNET_LABEL, tc.epochs, steps, progress_tag),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=tc.patience, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(ckpt, monitor="val_loss", save_best_only=True),
    ]
    if tc.epochs > 0:
        phase(progress_tag, UNET_LABEL, "tracing the first step…", total=tc.epochs * steps)
        model.fit(
            ds,
            epochs=tc.epochs,
            steps_per_epoch=steps,
            validation_data=(xva, yva.astype("float32")),
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
        )
    phase(progress_tag, UNET_LABEL, "saving the model…", tc.epochs * steps, tc.epochs * steps)
    model = as_float32(model)  # a mixed-precision training saves (and validates) its float32 copy
    model.save(out_path)
    Path(ckpt).unlink(missing_ok=True)  # the best weights are in the model (restore_best_weights)
    pva = model.predict(xva, batch_size=cfg.batch_size, verbose=0)
    # the mask's threshold: the one of 0.05 ... 0.95 with the best IoU on the validation strip
    threshold, ious = choose_threshold(yva, pva)
    final = _metrics(yva, pva, threshold)
    meta = {
        "model": model.name,
        "task": "segmentation",
        "encoder": cfg.encoder,
        "bands": list(cfg.bands),
        "normalisation": normalisation(cfg.reflectance_max, cfg.bands),
        "patch_size": win,
        "initial_weights": cfg.weights,
        "label_source": label_source,
        "training_region": region,
        "train_windows": len(tr),
        "validation_windows": len(va),
        "validation": {"side": tc.validation, "split_px": split},
        "epochs": tc.epochs,
        "steps_per_epoch": steps,
        "batch_size": tc.batch_size,
        "learning_rate": tc.learning_rate,
        "augment_factor": tc.augment_factor,
        "seed": seed,
        "train_precision": policy,
        "loss": tc.loss,
        "per_epoch": per_epoch,
        "threshold": threshold,
        "threshold_choice": {
            "on": "validation windows",
            "criterion": "iou",
            "iou_by_threshold": ious,
            "at_0.5": _metrics(yva, pva, 0.5),
        },
        "validation_metrics": final,
        "seconds": time.perf_counter() - t0,
    }
    write_sidecar(out_path, meta)
    write_mlm_item(
        out_path,
        meta,
        bbox_lonlat=lonlat_bounds(cube),
        n_params=model.count_params(),
        output={
            "name": "agricultural land probability",
            "tasks": ["semantic-segmentation"],
            "result": {
                "shape": [-1, win, win, 1],
                "dim_order": ["batch", "height", "width", "channel"],
                "data_type": "float32",
            },
            "classification:classes": [{"value": 0, "name": "other"}, {"value": 1, "name": "agricultural"}],
            "post_processing_function": None,
        },
    )
    return meta


def train_cae(
    cube_store: str,
    y0: np.ndarray,
    x0: np.ndarray,
    cfg: EmbedConfig,
    size: int,
    out_path: str,
    *,
    seed: int = 0,
    region: str = "",
    group: str = "cube",
    progress_tag: str | None = None,
    onnx: bool = False,
    precision: str = "float32",
) -> dict[str, Any]:
    """Train the CAE repeatably for ``seed``, also on a Dask worker (see :func:`_train_cae`).

    Parameters
    ----------
    cube_store : str
        The run's Zarr store.
    y0, x0 : numpy.ndarray
        ``(n,)`` top-left pixel offsets of the training patches in the cube grid.
    cfg : EmbedConfig
        Bands, backbone, head and the training schedule (``cfg.train``).
    size : int
        Patch side, pixels.
    out_path : str
        Where the autoencoder is saved (``.keras``); the encoder goes beside it.
    seed : int
        Seeds weights, batches and augmentation.
    region : str
        Name of the training region, recorded in the model's metadata.
    group : str
        The cube group of the store (``utm18n/cube`` in a multi-zone run).
    progress_tag : str, optional
        Relays per-step progress to the run that submitted the task.
    onnx : bool
        Also export the encoder to ``encoder.onnx`` beside it, for ``runtime.engine: onnx``
        (recorded in its sidecar and MLM Item, :func:`~.onnx_export.attach_onnx`).
    precision : str
        ``runtime.train_precision`` (``auto``, ``float32``, ``bfloat16``), resolved on the
        worker that trains (:func:`~.saving.training_policy`); recorded as ``train_precision``.

    Returns
    -------
    dict
        The model's metadata: history (loss per epoch), seconds, paths.
    """
    with _worker.seeded(seed), saved_to(out_path) as local:
        meta = _train_cae(
            cube_store,
            y0,
            x0,
            cfg,
            size,
            local,
            seed=seed,
            region=region,
            group=group,
            progress_tag=progress_tag,
            precision=precision,
        )
        if onnx:
            onnx_export.attach_onnx(meta["encoder_path"])
    return relocated(meta, local, out_path)


def train_unet(
    cube_store: str,
    label: np.ndarray | str,
    cfg: SegmentConfig,
    out_path: str,
    *,
    seed: int = 0,
    label_source: str = "",
    region: str = "",
    group: str = "cube",
    progress_tag: str | None = None,
    onnx: bool = False,
    precision: str = "float32",
) -> dict[str, Any]:
    """Train the U-Net repeatably for ``seed``, also on a Dask worker (see :func:`_train_unet`).

    Parameters
    ----------
    cube_store : str
        The run's Zarr store.
    label : numpy.ndarray or str
        ``(y, x)`` uint8 labels on the cube grid (1 agricultural, 0 other, 255 ignored), or
        the store group holding them as variable ``label``.
    cfg : SegmentConfig
        Encoder, bands, window and the training schedule (``cfg.train``).
    out_path : str
        Where the model is saved (``.keras``, with its metadata sidecar).
    seed : int
        Seeds weights, window order and augmentation.
    label_source : str
        Where the labels came from, recorded in the model's metadata.
    region : str
        Name of the training region, recorded in the model's metadata.
    group : str
        The cube group of the store.
    progress_tag : str, optional
        Relays per-step progress to the run that submitted the task.
    onnx : bool
        Also export ``MODEL.onnx`` beside the model (as for :func:`train_cae`).
    precision : str
        ``runtime.train_precision``, as for :func:`train_cae`.

    Returns
    -------
    dict
        The model's metadata: validation metrics, per-epoch history, seconds.
    """
    with _worker.seeded(seed), saved_to(out_path) as local:
        meta = _train_unet(
            cube_store,
            label,
            cfg,
            local,
            seed=seed,
            label_source=label_source,
            region=region,
            group=group,
            progress_tag=progress_tag,
            precision=precision,
        )
        if onnx:
            onnx_export.attach_onnx(local)
    return relocated(meta, local, out_path)
