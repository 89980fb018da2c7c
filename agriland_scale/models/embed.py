"""Embeddings: the CAE encoder on batches of patches, run on Dask workers.

Each task reads one batch of patches from the Zarr cube, runs the encoder (loaded once per
worker) and returns ``(n, embedding_dim)`` float32; patches below the valid-pixel threshold
get NaN embeddings and are left out of clustering.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from agriland_scale.config.bands import ReflectanceMax, reflectance_scale
from agriland_scale.errors import BandMismatch, ModelMismatch
from agriland_scale.models import engines
from agriland_scale.models import worker as _worker
from agriland_scale.models.files import check_keras_file, model_signature, read_sidecar
from agriland_scale.patches import iter_batches, read_patches
from agriland_scale.store import open_cube

__all__ = ["check_model", "check_normalisation", "embed_patches"]


# what the sidecar's "task" / "model" say for each kind of model a stage takes
_TASKS = {
    "embedding": "a CAE encoder (models/encoder.keras of a run or of `agriland train-cae`)",
    "segmentation": "a U-Net (models/unet.keras of a run or of `agriland train-unet`)",
}


def check_model(
    model_path: str,
    task: str,
    bands: list[str],
    reflectance_max: ReflectanceMax | Sequence[float],
    size: int,
    *,
    key: str | None = None,
) -> dict:
    """Refuse a model file that does not fit ``task`` or the run's bands and patch size.

    A model is refused when it is not the kind of model ``task`` needs, or when it reads other
    bands, another normalisation or another patch size than the run. Returns its sidecar.

    ``task``: ``"embedding"`` (a CAE encoder giving one vector a patch) or ``"segmentation"``
    (a U-Net giving a probability a pixel). Checks, without TensorFlow: the file exists and is
    a complete ``.keras`` archive; its sidecar (``MODEL.keras.json``) names that task (an
    encoder's sidecar also says ``model: cae_encoder``, so the full autoencoder is refused);
    bands, ``reflectance_max`` (per band, :func:`check_normalisation`) and patch size agree.
    ``key`` (e.g. ``segment.model``) names the config key in messages.

    Raises
    ------
    CorruptInput
        The file or its sidecar is missing, not a Keras archive, or damaged.
    ModelMismatch
        The model is made for another task, or another patch/window size.
    BandMismatch
        It reads other bands or another normalisation.
    """
    where = f"{key} = {model_path}" if key else f"model {model_path}"
    check_keras_file(model_path, where)
    meta = read_sidecar(model_path)
    found = meta.get("task")
    is_encoder = meta.get("model") == "cae_encoder"
    if found != task or (task == "embedding" and not is_encoder):
        what = (
            "a U-Net (a segmentation model)"
            if found == "segmentation"
            else "a CAE encoder (an embedding model)"
            if found == "embedding" and is_encoder
            else "the whole autoencoder, not its encoder"
            if found == "embedding"
            else f"a model of task {found!r}"
        )
        hint = (
            f"; use {model_path.rsplit('/', 1)[0]}/encoder.keras beside it"
            if task == "embedding" and found == "embedding"
            else ""
        )
        raise ModelMismatch(
            f"{where} is {what} (its sidecar says task {found!r}, model "
            f"{meta.get('model')!r}), but this stage needs {_TASKS[task]}{hint}"
        )
    if list(meta.get("bands") or []) != list(bands):
        raise BandMismatch(
            f"{where} was trained on bands {meta.get('bands')} but the run "
            f"gives {list(bands)}: use the same bands, in the same order, or retrain"
        )
    check_normalisation(meta, bands, reflectance_max, where, key)
    _check_signature(model_path, where, task, meta, len(bands))
    if meta.get("patch_size") != size:
        what = "patches.size" if task == "embedding" else "segment.window"
        raise ModelMismatch(
            f"{where} takes {meta.get('patch_size')} px inputs, the run gives "
            f"{size}: set {what} to {meta.get('patch_size')}"
        )
    return meta


def _scale_text(scale: tuple[float, ...], bands: Sequence[str]) -> str:
    if len(set(scale)) == 1:
        return f"{scale[0]:g}"
    return "{" + ", ".join(f"{b}: {v:g}" for b, v in zip(bands, scale)) + "}"


def check_normalisation(
    meta: dict,
    bands: Sequence[str],
    reflectance_max: ReflectanceMax | Sequence[float],
    where: str,
    key: str | None = None,
) -> None:
    """Refuse a run whose ``reflectance_max`` maps any band otherwise than the model was trained.

    The sidecar's ``normalisation.reflectance_max`` is one number (every band; all sidecars
    before per-band normalisation) or a mapping band -> reflectance; both are compared per
    band (:func:`~agriland_scale.config.bands.reflectance_scale`), to 1e-9.

    Raises
    ------
    BandMismatch
        Naming the model's and the run's reflectance per band and the setting that matches.
    """
    trained = (meta.get("normalisation") or {}).get("reflectance_max")
    model_bands = list(meta.get("bands") or bands)
    try:  # a number or a mapping band -> number; anything else is unusable
        want = () if isinstance(trained, (str, list)) else reflectance_scale(trained, model_bands)
    except (TypeError, ValueError, AttributeError):
        want = ()
    have = reflectance_scale(reflectance_max, bands)
    if len(want) == len(have) and all(abs(a - b) <= 1e-9 for a, b in zip(want, have)):
        return
    setting = f"{key.rsplit('.', 1)[0]}.reflectance_max" if key else "reflectance_max"
    if not want:
        raise BandMismatch(
            f"{where} records no usable normalisation (reflectance_max {trained!r} in its "
            f"sidecar), the run maps reflectance {_scale_text(have, bands)} to 1: retrain it, or "
            "write its normalisation into the sidecar"
        )
    raise BandMismatch(
        f"{where} was trained with reflectance_max {_scale_text(want, model_bands)} (the "
        f"reflectance that maps to 1, per band), the run uses {_scale_text(have, bands)}: set "
        f"{setting} to {_scale_text(want, model_bands)} or retrain"
    )


def _check_signature(model_path: str, where: str, task: str, meta: dict, n_bands: int) -> None:
    """Refuse a model whose own input and output (its ``config.json``) are not what ``task`` needs.

    The sidecar says what a model is; this checks that the ``.keras`` file beside it is that
    model (an encoder copied under a U-Net's name and sidecar gave a probability of ~0.01
    everywhere): a U-Net takes ``n_bands`` bands and gives one sigmoid channel, an encoder
    ends in a Dense layer of the sidecar's ``embedding_dim`` units.
    """
    sig = model_signature(model_path)
    shape, out = sig.get("input"), sig.get("output") or {}
    problems = []
    if isinstance(shape, list) and len(shape) == 4 and shape[-1] not in (None, n_bands):
        problems.append(f"it takes {shape[-1]} band(s), the run gives {n_bands}")
    if (
        task == "segmentation"
        and out
        and (out.get("class") != "Conv2D" or out.get("channels") != 1 or out.get("activation") != "sigmoid")
    ):
        problems.append(
            f"its output is a {out.get('class')} layer '{out.get('name')}' of "
            f"{out.get('channels')} channel(s), activation {out.get('activation')!r}, not one "
            "sigmoid probability a pixel (a Conv2D of 1 filter)"
        )
    if (
        task == "embedding"
        and out
        and (
            out.get("class") != "Dense"
            or (meta.get("embedding_dim") and out.get("channels") != meta.get("embedding_dim"))
        )
    ):
        problems.append(
            f"its output is a {out.get('class')} layer '{out.get('name')}' of "
            f"{out.get('channels')} channel(s), not one vector of {meta.get('embedding_dim')} "
            "values a patch (a Dense layer)"
        )
    if problems:
        raise ModelMismatch(
            f"{where} is not the model its sidecar describes ({'; '.join(problems)}): the "
            f".keras file and its sidecar {model_path}.json come from different models. Give the "
            f".keras file saved with that sidecar, or retrain; this stage needs {_TASKS[task]}"
        )


def _embed_batch(
    model_path: str,
    cube_store: str,
    y0: np.ndarray,
    x0: np.ndarray,
    valid: np.ndarray,
    size: int,
    bands: list[str],
    reflectance_max: Sequence[float],
    dim: int,
    batch_size: int,
    group: str = "cube",
    precision: str = "float32",
    engine: str = "tensorflow",
) -> np.ndarray:
    out = np.full((len(y0), dim), np.nan, dtype="float32")
    if not valid.any():
        return out
    model, lock = _worker.get_model(model_path, precision, engine=engine)
    cube = open_cube(cube_store, group, dask=False)
    with lock:
        # the read under the model's lock too: a read beside a running predict takes a core
        # from TensorFlow's thread pool, which then waits for it at every op (bench_embed on 2
        # cores, best of 3: stage 23-24 s with the read inside, 27 s outside, for 392 patches)
        x = read_patches(cube["reflectance"], y0[valid], x0[valid], size, bands, reflectance_max)
        # batch by batch: what predict(x, batch_size=batch_size) computes, without building a
        # tf.data pipeline for every task
        out[valid] = np.concatenate(
            [_worker.predict(model, x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        )
    return out


def embed_patches(
    model_path: str,
    cube_store: str,
    index: xr.Dataset,
    bands: list[str],
    reflectance_max: ReflectanceMax | Sequence[float],
    *,
    batch_size: int,
    min_valid_fraction: float,
    resources: dict | None = None,
    tasks_batches: int = 4,
    group: str = "cube",
    precision: str = "float32",
    engine: str = "tensorflow",
) -> xr.Dataset:
    """Lazy embeddings ``(patch, dim)`` float32 of every patch of ``index``; compute on a Dask client.

    Patches are read by the workers from the cube ``group`` of the Zarr store ``cube_store``.
    ``precision``: ``float32``, ``mixed_float16`` (float16 compute, for GPU workers) or
    ``mixed_bfloat16`` (CPUs with bfloat16 instructions); the embeddings are float32.
    ``engine``: ``runtime.engine`` (``tensorflow``, ``onnx``, ``openvino`` or ``auto``, see
    :func:`~agriland_scale.models.engines.choose_engine`); with ``onnx`` or ``openvino`` the
    workers predict the model's ONNX export and import no TensorFlow.

    One task embeds ``tasks_batches * batch_size`` patches, so the graph has one task per
    few dozen patches and each ``predict`` call sees a full batch.
    """
    meta = check_model(model_path, "embedding", bands, reflectance_max, int(index.attrs["patch_size"]))
    reflectance_max = reflectance_scale(reflectance_max, bands)  # one a band, for the tasks
    dim = int(meta["embedding_dim"])
    size = int(index.attrs["patch_size"])
    y0, x0 = index["y0"].values, index["x0"].values
    valid = index["valid_fraction"].values >= min_valid_fraction
    engine, precision = engines.prepare(
        engine, "embedding", model_path, precision, gpu=bool(resources), units=int(valid.sum())
    )
    parts = []
    fn = dask.delayed(_embed_batch, pure=True)
    with dask.annotate(resources=resources or {}):
        for sl in iter_batches(len(y0), batch_size * tasks_batches):
            args = (
                model_path,
                cube_store,
                y0[sl],
                x0[sl],
                valid[sl],
                size,
                bands,
                reflectance_max,
                dim,
                batch_size,
                group,
                precision,
                engine,
            )
            # named for the dashboard: "embed-batch" in the task stream and progress bars
            d = fn(*args, dask_key_name=f"embed-batch-{tokenize(*args)}")
            parts.append(da.from_delayed(d, shape=(sl.stop - sl.start, dim), dtype="float32"))
    arr = da.concatenate(parts)
    ds = xr.Dataset(
        {"embedding": (("patch", "dim"), arr)}, coords={"patch": index["patch"].values, "dim": np.arange(dim)}
    )
    ds["embedding"].attrs.update(
        long_name="CAE patch embedding",
        model=str(model_path).rstrip("/").rsplit("/", 1)[-1],
        units="1",
        note="NaN for patches below min_valid_fraction",
        precision=precision,
        **({"engine": engine} if engine != "tensorflow" else {}),  # tensorflow runs keep their attributes
    )
    ds["patch"].attrs.update(long_name="patch number (as in the patches group)")
    ds["dim"].attrs.update(long_name="embedding dimension")
    return ds
