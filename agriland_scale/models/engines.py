"""Inference engines: TensorFlow, or ONNX Runtime with no TensorFlow in the predicting process.

``runtime.engine`` picks how the model stages predict. ``tensorflow``: the ``.keras`` file
in Keras (:mod:`~agriland_scale.models.worker`). ``onnx``: an ONNX export of that file run
by ONNX Runtime (CPUExecutionProvider), which imports and loads in under 1 s against
TensorFlow's 5-8 s (bench/results/engines.txt) and keeps TensorFlow and Keras out of the
worker. ``openvino``: the same artifact in OpenVINO, in bfloat16 where
``runtime.inference_precision`` chose it (AMX / AVX512-BF16 kernels), also without TensorFlow. ``auto``: per model, from the measurements of ``bench/bench_engines.py``
(:func:`choose_engine`).

The ONNX artifact of ``MODEL.keras`` is ``MODEL.onnx`` beside it, written at the end of
training and recorded in the model's sidecar (``artifacts.onnx``: its file, its sha256 and
the sha256 of the ``.keras`` file it was exported from). A model without one (given by the
user, or trained before) is exported once per machine into :func:`~agriland_scale.files.cache_dir`
``/onnx/<sha256 of the .keras>[-<px>].onnx``, by a child process (the export needs TensorFlow;
the process asking for it keeps none). An artifact whose recorded source sha256 is not the
``.keras`` file's own is stale and never used: the cached export keyed by the file's own
sha256 is used (made) instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from agriland_scale.errors import CorruptInput, MissingDependency

__all__ = [
    "ENGINES",
    "OnnxModel",
    "OpenVinoModel",
    "EXPORT_PAYS_FROM",
    "artifact_path",
    "choose_engine",
    "has_artifact",
    "ensure_onnx",
    "have_onnxruntime",
    "load_onnx",
    "prepare",
    "record_onnx",
    "resolve",
    "sha256_file",
]

ENGINES = ("tensorflow", "onnx", "openvino", "auto")
# the engines that run the ONNX artifact, and the Python module each needs
_ONNX_ENGINES = {"onnx": "onnxruntime", "openvino": "openvino"}

# ``auto`` exports a model that has no ONNX artifact only for a stage of at least this many
# images (patches or windows): the export costs 20-120 s once (bench/results/engines.txt:
# U-Net 21 s, ResNet-50 encoder 116 s on a loaded 2-core machine), the faster engine saves
# 0.02-0.05 s an image, so it pays back from about one Sentinel-2 tile (1,849 patches of
# 256 px); smaller runs (the demo: 49 patches) keep TensorFlow, which trained the model
EXPORT_PAYS_FROM = 2000

_sha_cache: dict[tuple[str, float, int], str] = {}
_export_lock = threading.Lock()


def have_onnxruntime(module: str = "onnxruntime") -> bool:
    """Whether ONNX Runtime (or ``module``, e.g. ``openvino``) is installed here, found without importing it."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def choose_engine(setting: str, task: str, precision: str = "float32", gpu: bool = False) -> str:
    """Return the engine (``tensorflow``, ``onnx`` or ``openvino``) that predicts ``task`` at ``precision``.

    ``setting`` is ``runtime.engine``; ``task`` ``embedding`` or ``segmentation``;
    ``precision`` the Keras policy the stage would use in TensorFlow (``float32``,
    ``mixed_bfloat16``, ``mixed_float16``); ``gpu``: the workers have GPUs. An explicit
    ``onnx`` computes in float32 whatever the precision; ``openvino`` in bfloat16 for
    ``mixed_bfloat16``, else float32.

    ``auto`` follows ``bench/bench_engines.py`` (bench/results/engines.txt: 2-core Intel Xeon with
    AVX-512, AVX512-BF16 and AMX, the demo's trained encoder and U-Net, batches 1-64, engines
    alternated in one process; images/s as a multiple of TensorFlow float32):

    * encoder, float32 (``inference_precision: float32``, or a CPU without native bfloat16):
      ONNX Runtime 1.25-1.64x (OpenVINO float32 0.93-1.42x, less steady), max |d| 5e-7, and
      it starts in under 1 s against TensorFlow's ~8 s (import, load, first call); without
      onnxruntime, OpenVINO;
    * bfloat16 (``inference_precision: auto`` on a CPU computing it natively): the U-Net in
      OpenVINO bfloat16 3.9-6.7x (TensorFlow bfloat16: 2.0-3.5x), 100 % equal masks, max
      |d| 3e-4 (TensorFlow's 4e-4); the encoder in OpenVINO bfloat16 2.6-8.6x (TensorFlow
      bfloat16 1.2-2.0x), max |d| 1.7e-3; without OpenVINO, TensorFlow (ONNX Runtime has no
      faster bfloat16 path here);
    * U-Net, float32: ONNX Runtime 0.96-1.15x, OpenVINO 0.75-1.33x, equal within the
      machine's noise, so the start decides: ONNX Runtime (0.4 s to import and load against
      TensorFlow's 7 s), as for the encoder;
    * GPU workers (or float16), or neither runtime installed: TensorFlow.

    Raises
    ------
    MissingDependency
        ``onnx`` or ``openvino`` was asked for and its runtime is not installed.
    """
    if setting == "tensorflow":
        return "tensorflow"
    if setting in _ONNX_ENGINES:
        if not have_onnxruntime(_ONNX_ENGINES[setting]):
            raise MissingDependency(
                f"runtime.engine is {setting} but {_ONNX_ENGINES[setting]} is not installed in this "
                "Python: install agriland-scale's [infer] extra (pip install 'agriland-scale[infer]') "
                "or set runtime.engine to tensorflow"
            )
        return setting
    if setting != "auto":
        raise ValueError(f"unknown engine {setting!r}: one of {', '.join(ENGINES)}")
    if gpu or precision not in ("float32", "mixed_bfloat16"):
        return "tensorflow"
    openvino, ort = have_onnxruntime("openvino"), have_onnxruntime()
    if precision == "mixed_bfloat16":
        return "openvino" if openvino else "tensorflow"
    return "onnx" if ort else "openvino" if openvino else "tensorflow"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (kept per process by path, modification time and size)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime, st.st_size)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def artifact_path(model_path: str | Path) -> Path:
    """``MODEL.onnx`` beside ``MODEL.keras``."""
    p = Path(model_path)
    return p.with_name(p.stem + ".onnx")


def record_onnx(model_path: str | Path, onnx_path: str | Path) -> dict[str, Any]:
    """Return the sidecar record of an ONNX artifact: its file and sha256, and its source's sha256."""
    return {
        "file": Path(onnx_path).name,
        "sha256": sha256_file(onnx_path),
        "source_sha256": sha256_file(model_path),
        "exporter": "keras.Model.export(format='onnx') (tf2onnx)",
        "input": "float32 (batch, height, width, bands)",
    }


def _export_in_child(model_path: Path, out: Path, input_size: int | None) -> None:
    """Export in a child process, so that this one never imports TensorFlow."""
    cmd = [sys.executable, "-m", "agriland_scale.models.onnx_export", str(model_path), str(out)]
    if input_size is not None:
        cmd.append(str(input_size))
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0 or not out.is_file():
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise CorruptInput(
            f"cannot export the Keras model {model_path} to ONNX ({' | '.join(tail)[:400]}): "
            "the export needs TensorFlow and tf2onnx (the [cpu] extra) on this machine; or set "
            "runtime.engine to tensorflow"
        )


def ensure_onnx(model_path: str | Path, input_size: int | None = None, *, export: bool = True) -> Path:
    """Return an ONNX artifact of the ``.keras`` file ``model_path`` that is not stale.

    The artifact beside the model (recorded in its sidecar) when its recorded source sha256
    is the model's own and its own sha256 matches; else the export cached for this machine
    under the model's sha256 (made now by a child process when missing and ``export``).
    ``input_size``: windows of that side (px) when it is not the model's own.

    Raises
    ------
    CorruptInput
        No usable artifact (``export`` False), or the export failed.
    """
    from agriland_scale.files import cache_dir, is_object_url, local_copy
    from agriland_scale.models.files import read_sidecar

    p = local_copy(model_path)
    source = sha256_file(p)
    try:
        meta = read_sidecar(model_path)
    except CorruptInput:
        meta = {}
    rec = (meta.get("artifacts") or {}).get("onnx") or {}
    own = meta.get("patch_size")
    if (input_size is None or input_size == own) and rec.get("source_sha256") == source:
        beside = p.with_name(str(rec.get("file") or artifact_path(p).name))
        if is_object_url(model_path):  # the artifact beside the model on object storage, cached
            try:
                beside = local_copy(str(model_path).rsplit("/", 1)[0] + "/" + str(rec.get("file")))
            except Exception:  # noqa: BLE001 - no artifact there: export one into the cache
                beside = Path("/nonexistent")
        if (
            rec.get("source_sha256") == source
            and beside.is_file()
            and sha256_file(beside) == rec.get("sha256")
        ):
            return beside
    suffix = "" if input_size is None or input_size == own else f"-{input_size}"
    cached = cache_dir() / "onnx" / f"{source}{suffix}.onnx"
    if cached.is_file():
        return cached
    if not export:
        raise CorruptInput(
            f"the model {model_path} has no up-to-date ONNX artifact (its sidecar records "
            f"source sha256 {str(rec.get('source_sha256'))[:12]}..., the file's is {source[:12]}...) "
            "and none is cached: let the engine export it (TensorFlow and tf2onnx, the [cpu] "
            "extra, on this machine once) or set runtime.engine to tensorflow"
        )
    with _export_lock:  # threads of one worker: one export
        if not cached.is_file():
            _export_in_child(p, cached, None if not suffix else input_size)
    return cached


def has_artifact(model_path: str | Path, input_size: int | None = None) -> bool:
    """Whether ``model_path`` has an ONNX artifact that is not stale (beside it, or cached here); exports nothing."""
    try:
        ensure_onnx(model_path, input_size, export=False)
    except CorruptInput:
        return False
    except OSError:  # the model itself is missing: the stage that needs it says so
        return False
    return True


def resolve(
    setting: str,
    task: str,
    model_path: str | Path,
    precision: str = "float32",
    input_size: int | None = None,
    *,
    units: int | None = None,
    gpu: bool = False,
) -> str:
    """Return the engine that predicts ``task`` with ``model_path``: :func:`choose_engine`, for ``auto`` by cost.

    ``auto`` takes the engine of the table only where its artifact is at hand
    (:func:`has_artifact`) or the stage is large enough for a one-time export to pay back:
    ``units`` (images the stage predicts; None: not known yet, as at a warm-up) of at least
    :data:`EXPORT_PAYS_FROM`. Otherwise TensorFlow. An explicit ``onnx`` or ``openvino`` is
    always honoured (exporting when needed).
    """
    engine = choose_engine(setting, task, precision, gpu)
    if setting != "auto" or engine not in _ONNX_ENGINES:
        return engine
    if (units or 0) >= EXPORT_PAYS_FROM or has_artifact(model_path, input_size):
        return engine
    return "tensorflow"


def prepare(
    setting: str,
    task: str,
    model_path: str,
    precision: str,
    input_size: int | None = None,
    gpu: bool = False,
    *,
    units: int | None = None,
) -> tuple[str, str]:
    """Choose a stage's engine (:func:`resolve`) and, for ``onnx``, make its artifact here once.

    Run where the stage's graph is built, with ``units`` the images the stage predicts: a
    model on a local path gets its ONNX artifact (beside it, or exported into this machine's
    cache, which local workers share) before any task, so that workers find it and an export
    failure stops the stage at once. Returns the engine and the precision its predictions
    compute in (``float32`` for ``onnx``).
    """
    from agriland_scale.files import is_object_url

    engine = resolve(setting, task, model_path, precision, input_size, units=units, gpu=gpu)
    if engine not in _ONNX_ENGINES:
        return engine, precision
    if not is_object_url(model_path):
        ensure_onnx(model_path, input_size)
    return engine, precision if engine == "openvino" and precision == "mixed_bfloat16" else "float32"


class OnnxModel:
    """An ONNX Runtime session predicting float32 batches ``(n, h, w, bands)``, numpy in and out.

    ``spinning``: let ONNX Runtime's threads spin between calls (its default; see
    bench/bench_engines.py, ``ort`` against ``ortspin``).
    """

    def __init__(self, path: str | Path, *, spinning: bool = False) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if not spinning:  # idle threads sleep between calls: they take no core from the worker's reads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        n = os.environ.get("TF_NUM_INTRAOP_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if n:
            opts.intra_op_num_threads = int(n)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.name = Path(self.path).stem

    def predict(self, batch: Any) -> Any:
        """Return the model's (first) output for ``batch`` (float32)."""
        import numpy as np

        x = np.ascontiguousarray(batch, dtype="float32")
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoModel:
    """OpenVINO (CPU plugin) on the ONNX artifact, float32 batches in and out, as :class:`OnnxModel`.

    ``precision``: ``mixed_bfloat16`` computes in bfloat16 (OpenVINO's ``bf16`` inference
    precision: AMX / AVX512-BF16 kernels), anything else in float32.
    """

    def __init__(self, path: str | Path, precision: str = "float32") -> None:
        import openvino as ov

        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "mixed_bfloat16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        n = os.environ.get("TF_NUM_INTRAOP_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if n:
            config["INFERENCE_NUM_THREADS"] = int(n)
        self.path = str(path)
        self.compiled = ov.Core().compile_model(self.path, "CPU", config)
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.input(0).get_partial_shape()
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in shape)
        self.name = Path(self.path).stem

    def predict(self, batch: Any) -> Any:
        """Return the model's (first) output for ``batch`` (float32)."""
        import numpy as np

        x = np.ascontiguousarray(batch, dtype="float32")
        return self.request.infer({0: x})[self.compiled.output(0)].copy()


def load_onnx(
    model_path: str | Path, input_size: int | None = None, engine: str = "onnx", precision: str = "float32"
) -> OnnxModel | OpenVinoModel:
    """Return an :class:`OnnxModel` (or, for ``engine`` ``openvino``, an :class:`OpenVinoModel`) of ``model_path``.

    The model runs its ONNX artifact (:func:`ensure_onnx`); ``precision`` matters to OpenVINO only.
    """
    choose_engine(engine, "")  # raises MissingDependency with the install hint
    path = ensure_onnx(model_path, input_size)
    try:
        return OpenVinoModel(path, precision) if engine == "openvino" else OnnxModel(path)
    except Exception as e:  # noqa: BLE001 - any loader failure means a bad file here
        raise CorruptInput(
            f"cannot load the ONNX artifact {path} of {model_path} ({type(e).__name__}: {str(e)[:200]}): "
            "delete it to export it again, or set runtime.engine to tensorflow"
        ) from None
