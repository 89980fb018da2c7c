"""agriland-scale: find agricultural land in Sentinel-2 imagery at region scale.

Search (STAC) -> Zarr cube -> 256 px patches -> CAE embeddings -> k-means + DEC clusters ->
U-Net segmentation -> georeferenced Zarr/COG mosaics, on dask.distributed.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .config import RunConfig, load_config  # noqa: E402
from .errors import AgrilandError  # noqa: E402

try:
    __version__ = version("agriland-scale")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["AgrilandError", "RunConfig", "__version__", "load_config"]
