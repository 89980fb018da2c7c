"""Files that are not Zarr (JSON, CSV, PNG, HTML, GeoParquet, COG): never half-written.

Each is built under a temporary name beside its destination (``NAME.tmp``, which the run's
file bookkeeping ignores) and renamed over it only when complete, so a reader or a rerun
sees the old file or the new one, never a part.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["TMP_SUFFIX", "atomic_path", "write_json", "write_text"]

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Give a temporary path beside ``path`` to write; rename it to ``path`` when the block ends.

    Parameters
    ----------
    path : str or Path
        The destination. Its folder is created if missing.

    Yields
    ------
    Path
        ``path`` with ``.tmp`` appended. On an exception it is removed and ``path`` is left
        as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(obj: Any, path: str | Path, *, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically; values JSON cannot hold are written as ``str``."""
    write_text(json.dumps(obj, indent=indent, default=str), path)
