"""Where a trained model goes and what its metadata says of it: paths, object storage, extent.

Helpers of :mod:`~agriland_scale.models.train`: a model saved for an object-storage URL is
saved locally on the worker, then uploaded with every file beside it; the sidecar's
normalisation and the training cube's lon/lat extent.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agriland_scale.config.bands import reflectance_record

__all__ = ["lonlat_bounds", "normalisation", "relocated", "saved_to"]


def normalisation(reflectance_max, bands: list[str]) -> dict[str, Any]:
    """Return the sidecar's ``normalisation``: one reflectance_max (as before), or one a band."""
    return {
        "type": "reflectance / reflectance_max, clipped to [0, 1]",
        "reflectance_max": reflectance_record(reflectance_max, bands),
    }


def lonlat_bounds(cube) -> list[float]:
    """Return the cube's extent in lon/lat (EPSG:4326) degrees, rounded to 6 decimals."""
    from rasterio.warp import transform_bounds

    return [round(v, 6) for v in transform_bounds(cube.rio.crs, "EPSG:4326", *cube.rio.bounds())]


@contextlib.contextmanager
def saved_to(out_path: str) -> Iterator[str]:
    """Give the local path a model is saved to; for an object-storage ``out_path``, upload after.

    A model for ``s3://.../models/unet.keras`` is saved in a temporary folder of the worker,
    then every file saved beside it (the model, its encoder, sidecars, MLM items) is put next
    to ``out_path``, one object each, when training succeeded.
    """
    from agriland_scale.files import is_object_url, join_url, upload_file

    if not is_object_url(out_path):
        yield out_path
        return
    with tempfile.TemporaryDirectory(prefix="agriland-model-") as d:
        local = str(Path(d) / out_path.rstrip("/").rpartition("/")[2])
        yield local
        parent = out_path.rstrip("/").rpartition("/")[0]
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                upload_file(f, join_url(parent, f.name))


def relocated(meta: dict[str, Any], local: str, out_path: str) -> dict[str, Any]:
    """Replace the local save paths in a model's metadata by where the model was put."""
    if local == out_path:
        return meta
    parent, here = out_path.rstrip("/").rpartition("/")[0], str(Path(local).parent)
    return json.loads(json.dumps(meta, default=str).replace(here, parent))
