"""Per-worker state: one copy of each model, TensorFlow threads set once.

Tasks call :func:`get_model`; a worker process loads a model file the first time it is
asked and keeps it for later tasks (keyed by path and modification time; the
:data:`MAX_MODELS` used last). A lock keeps
concurrent tasks of one worker from running the same model at once, so TensorFlow's thread
pool (sized to the worker's threads) is not oversubscribed.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agriland_scale.errors import CorruptInput, MissingDependency, ModelMismatch
from agriland_scale.models import engines

# the models this process keeps, least recently used first; a worker that outlives runs (an
# `agriland cluster`, an existing cluster) keeps at most MAX_MODELS (a U-Net copy per window
# size and precision counts as one)
MAX_MODELS = 8
_models: OrderedDict[tuple[str, float, str, int | None], Any] = OrderedDict()
_lock = threading.Lock()
_configured = False


def configure_tensorflow() -> None:
    """Set TF intra-op threads from ``TF_NUM_INTRAOP_THREADS`` before TF starts (once)."""
    global _configured
    if _configured:
        return
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import tensorflow as tf
    except ImportError as e:
        raise MissingDependency(
            f"TensorFlow is not installed in this Python ({e}): the model stages need it on every "
            "worker. Install agriland-scale with its [cpu] extra (pip install 'agriland-scale[cpu]') "
            "or, on NVIDIA GPU machines, its [gpu] extra"
        ) from None

    n = os.environ.get("TF_NUM_INTRAOP_THREADS")
    try:
        if n:
            tf.config.threading.set_intra_op_parallelism_threads(int(n))
            tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised in this process
        pass
    # same seed, same threads -> same results (training and inference); cheap on CPU
    tf.config.experimental.enable_op_determinism()
    _configured = True


PROGRESS_TOPIC = "agriland-progress"


def report_progress(
    tag: str | None, label: str, done: int, total: int, info: str = "", milestone: bool = False
) -> None:
    """Send progress of a long task (training) to the client that started it.

    Progress goes as a Dask event on :data:`PROGRESS_TOPIC` (``tag`` tells runs sharing a
    cluster apart). Nothing happens outside a Dask worker or without a tag.
    """
    if tag is None:
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(
        PROGRESS_TOPIC,
        {
            "tag": tag,
            "label": label,
            "done": int(done),
            "total": int(total),
            "info": info,
            "milestone": bool(milestone),
        },
    )


def get_model(
    path: str | Path, precision: str = "float32", input_size: int | None = None, engine: str = "tensorflow"
) -> tuple[Any, threading.Lock]:
    """Return the Keras model stored at ``path``, loaded once per process, and its run lock.

    Parameters
    ----------
    path : str or Path
        A ``.keras`` file, or its object-storage URL (``s3://...``: fetched into this machine's
        cache); the cache is keyed by its path and modification time.
    precision : str
        ``"mixed_float16"`` (GPUs with tensor cores) or ``"mixed_bfloat16"`` (CPUs with
        bfloat16 instructions, see :func:`cpu_has_bfloat16`) gives a copy computing in that
        dtype with float32 weights and float32 outputs (:func:`with_precision`), kept beside
        the float32 one.
    input_size : int, optional
        Window side in px: a copy taking windows of that size (:func:`at_input_size`), kept
        beside the model when it differs from the model's own input size.

    engine : str
        ``tensorflow``, or ``onnx``: an :class:`~agriland_scale.models.engines.OnnxModel` of
        the model's ONNX artifact (float32 whatever ``precision``; exported first if need be,
        see :func:`~agriland_scale.models.engines.ensure_onnx`), with neither TensorFlow nor
        Keras imported in this process; ``openvino``: an
        :class:`~agriland_scale.models.engines.OpenVinoModel` of it (bfloat16 for
        ``mixed_bfloat16``, else float32).

    Returns
    -------
    tuple
        The model and the lock its predictions run under.
    """
    if engine in ("onnx", "openvino"):
        return _get_onnx(path, input_size, engine, precision)
    configure_tensorflow()
    import keras

    from agriland_scale.files import local_copy
    from agriland_scale.models import dec, unet  # noqa: F401  (register custom objects)

    p = local_copy(path)  # a model on object storage: fetched once per machine and version
    key = (str(p.resolve()), p.stat().st_mtime, precision, None)
    with _lock:
        if key not in _models:
            try:
                model = keras.saving.load_model(p, compile=False)
            except Exception as e:  # noqa: BLE001 - any loader failure means a bad file here
                raise CorruptInput(
                    f"cannot load the Keras model {p} ({type(e).__name__}: "
                    f"{str(e)[:200]}): the file is damaged or was not saved by "
                    "agriland-scale; copy it again or retrain"
                ) from None
            if precision != "float32":
                model = with_precision(model, precision)
            _models[key] = (model, threading.Lock())
        _models.move_to_end(key)
        base = _models[key]
        if input_size is None or base[0].input_shape[1] == input_size:
            found = base
        else:
            sized = key[:3] + (input_size,)
            if sized not in _models:
                _models[sized] = (at_input_size(base[0], input_size), threading.Lock())
            _models.move_to_end(sized)
            found = _models[sized]
        while len(_models) > MAX_MODELS:  # a task still holding an evicted model keeps its copy
            _models.popitem(last=False)
        return found


def _get_onnx(
    path: str | Path, input_size: int | None, engine: str, precision: str
) -> tuple[Any, threading.Lock]:
    """:func:`get_model` for the ``onnx`` and ``openvino`` engines (cached with the Keras models)."""
    from agriland_scale.files import local_copy

    p = local_copy(path)
    key = (str(p.resolve()), p.stat().st_mtime, f"{engine}:{precision}", None)
    with _lock:
        if key not in _models:
            _models[key] = (engines.load_onnx(path, None, engine, precision), threading.Lock())
        _models.move_to_end(key)
        found = _models[key]
        if input_size is not None and found[0].input_shape[1] != input_size:
            sized = key[:3] + (input_size,)
            if sized not in _models:
                _models[sized] = (engines.load_onnx(path, input_size, engine, precision), threading.Lock())
            _models.move_to_end(sized)
            found = _models[sized]
        while len(_models) > MAX_MODELS:
            _models.popitem(last=False)
        return found


def predict(model: Any, batch: Any, *, trace_only: bool = False) -> Any:
    """Predict a batch ``(n, h, w, bands)`` float32 with ``model`` (numpy in, numpy out).

    The computation of ``model.predict_on_batch`` (the model called with ``training=False``
    in a ``tf.function``) traced ONCE for any batch size: ``predict_on_batch`` traces a first
    batch size, then again with a relaxed shape at the second size (on the demo encoder:
    load 1.8 s, then 1.2 s + 1.5 s of tracing, against 0.5 s + 0.65 s here). The function is
    kept on the model object (models are cached for the process, see :func:`get_model`).
    ``trace_only``: trace it now and return None, computing nothing. An ONNX model
    (``engine: onnx``) runs its session, without TensorFlow (nothing to trace).
    """
    if isinstance(model, (engines.OnnxModel, engines.OpenVinoModel)):
        return None if trace_only else model.predict(batch)
    import numpy as np
    import tensorflow as tf

    with _lock:
        fn = getattr(model, "_agriland_predict", None)
        if fn is None:
            spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
            # float32 out whatever the compute dtype (a bfloat16 output has no numpy dtype)
            fn = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), input_signature=[spec])
            # past Keras's attribute tracking: a function, not a layer or a weight
            object.__setattr__(model, "_agriland_predict", fn)
    if trace_only:
        fn.get_concrete_function()
        return None
    return np.asarray(fn(tf.convert_to_tensor(batch, dtype=tf.float32)))


def with_precision(model: Any, policy: str) -> Any:
    """Copy a functional Keras ``model`` so that its float32 layers compute under dtype ``policy``.

    ``policy`` is ``mixed_float16`` or ``mixed_bfloat16``; the copy has the same (float32)
    weights. The layers that give the model's outputs keep computing in float32 (Keras's
    advice for mixed precision: the last layer and its activation in float32), so outputs
    such as probabilities are not rounded to 8 (bfloat16) or 11 (float16) significant bits.
    A loaded model keeps each layer's saved policy, so the global policy alone would not
    change it.
    """
    config = model.get_config()
    last = {entry[0] for entry in _output_layers(config)}

    def swap(o: Any, keep: bool = False) -> Any:
        if isinstance(o, dict):
            if o.get("class_name") == "DTypePolicy" and o.get("config", {}).get("name") == "float32":
                return o if keep else dict(o, config=dict(o["config"], name=policy))
            keep_here = keep or (
                isinstance(o.get("config"), dict) and "class_name" in o and o["config"].get("name") in last
            )
            return {k: swap(v, keep_here) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v, keep) for v in o]
        return o

    copy = model.__class__.from_config(swap(config))
    copy.set_weights(model.get_weights())
    return copy


def _output_layers(config: dict) -> list:
    """``[[layer name, node, tensor], ...]`` of a functional model config's outputs."""
    outs = config.get("output_layers") or []
    return [outs] if outs and isinstance(outs[0], str) else list(outs)


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16).

    Read from the ``flags`` line of ``cpuinfo`` (Linux); False where there is none. On such CPUs oneDNN runs bfloat16
    convolutions at about 1.7x float32 (measured on the demo U-Net and encoder, 2-core AMD
    EPYC); on others it emulates them, slower than float32.
    """
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def at_input_size(model: Any, size: int) -> Any:
    """Copy a fully convolutional functional ``model`` to take ``(n, size, size, bands)`` inputs.

    The copy has the same layers and weights; only its input (and those of nested models,
    such as a ResNet-50 encoder) is ``size`` px square. A plain or ResNet-50 U-Net gives the
    same prediction at any size divisible by 32, away from the window's edges.

    Raises
    ------
    ModelMismatch
        The model does not work at that size (an InceptionV3 U-Net: its valid convolutions
        tie its skip connections to the training size).
    """

    def swap(o: Any) -> Any:
        if isinstance(o, dict):
            if o.get("class_name") == "InputLayer":
                s = o["config"]["batch_shape"]
                return dict(o, config=dict(o["config"], batch_shape=[s[0], size, size, s[-1]]))
            build = o.get("build_config")
            if (
                isinstance(build, dict)
                and isinstance(build.get("input_shape"), list)
                and len(build["input_shape"]) == 4
            ):
                s = build["input_shape"]
                o = dict(o, build_config=dict(build, input_shape=[s[0], size, size, s[-1]]))
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        return o

    try:
        copy = model.__class__.from_config(swap(model.get_config()))
        copy.set_weights(model.get_weights())
        copy.compute_output_shape((1, size, size, model.input_shape[-1]))  # shapes, no compute
    except Exception as e:  # noqa: BLE001 - any failure means: not at this size
        raise ModelMismatch(
            f"model {model.name} does not run on {size} px windows ({type(e).__name__}: "
            f"{str(e)[:160]}): set segment.inference_window to null (its training "
            "window) for this model"
        ) from None
    return copy


def warm_up(
    models: list[tuple[str, int, int, bool]], precision: str = "float32", engine: str = "tensorflow"
) -> dict[str, Any]:
    """Import TensorFlow, load ``models`` and trace their predict step, ahead of the stages.

    A run submits this to every worker while earlier stages run, so that TensorFlow's
    import, model loading and tracing do not open the embedding and segmentation stages.
    A model to ``trace`` predicts a batch of 1 zero window (:func:`predict` traces one
    function for any batch size; the first call also optimises its graph); the others are
    traced without computing (a large U-Net window would cost a second of compute).

    Parameters
    ----------
    models : list of (str, int, int, bool)
        Model files, the window side (px) they will predict on, their number of bands, and
        whether to trace them.
    precision, engine : str
        As for :func:`get_model` (``engine: onnx`` imports no TensorFlow).

    Returns
    -------
    dict
        ``seconds`` spent, and ``error`` (text) when something failed: a warm-up never
        raises; the stage that needs the model reports the problem itself.
    """
    t0 = time.perf_counter()
    try:
        if engine == "tensorflow":
            configure_tensorflow()
        import numpy as np

        for path, size, bands, trace in models:
            model, lock = get_model(path, precision, size, engine)
            with lock:
                predict(model, np.zeros((1, size, size, bands), dtype="float32"), trace_only=not trace)
    except Exception as e:  # noqa: BLE001 - reported by the stage that needs it
        return {"seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
    return {"seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Make Keras model building and training repeatable for ``seed`` inside a Dask worker.

    ``keras.utils.set_random_seed`` seeds Python's process-wide ``random``, but Keras draws
    the default seed of every unseeded initializer from it, and the worker's other threads
    consume numbers from it too, so two runs built different weights. Inside this block
    Keras draws from a private ``random.Random(seed)`` instead (not thread-shared).
    """
    configure_tensorflow()
    import keras
    from keras.src.random import seed_generator

    keras.utils.set_random_seed(seed)
    saved = seed_generator.python_random
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = saved
