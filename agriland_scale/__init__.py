"""agriland-scale: find agricultural land in Sentinel-2 imagery at region scale.

Search (STAC) -> Zarr cube -> 256 px patches -> CAE embeddings -> k-means + DEC clusters ->
U-Net segmentation -> georeferenced Zarr/COG mosaics, on dask.distributed.

In a notebook::

    import agriland_scale as ag

    cfg = ag.load_config("pipelines/demo.yaml", seed=1)
    record = ag.run(cfg, "demo-out")           # the run record (run.json)
    tree = ag.open_run("demo-out")              # every product, lazily, with its CRS
    tree["segmentation"].ds.rio.crs

Errors are :class:`AgrilandError` subclasses (``ag.errors``), each with an actionable message.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agriland_scale import errors  # noqa: E402
from agriland_scale.config import RunConfig, load_config  # noqa: E402
from agriland_scale.errors import (  # noqa: E402
    AgrilandError,
    AgrilandWarning,
    BandMismatch,
    ConfigError,
    CorruptInput,
    EmptyRegion,
    NoItemsFound,
    OutputError,
    OutputExists,
    RunLocked,
)

if TYPE_CHECKING:
    from agriland_scale.pipeline.runner import run
    from agriland_scale.store import open_run

try:
    __version__ = version("agriland-scale")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AgrilandError",
    "AgrilandWarning",
    "BandMismatch",
    "ConfigError",
    "CorruptInput",
    "EmptyRegion",
    "NoItemsFound",
    "OutputError",
    "OutputExists",
    "RunConfig",
    "RunLocked",
    "__version__",
    "errors",
    "load_config",
    "open_run",
    "run",
]

# imported on first use: `import agriland_scale` (and `agriland --help`) stays fast
_LAZY = {"run": "agriland_scale.pipeline.runner", "open_run": "agriland_scale.store"}


def __getattr__(name: str) -> Any:
    """Import :func:`run` and :func:`open_run` when first used (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'agriland_scale' has no attribute {name!r}")
