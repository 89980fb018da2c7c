"""Overviews of product rasters, made window by window by Dask tasks (on the workers, with a client).

The report's maps and the quicklook are drawn from every ``step``-th pixel of each raster
(nearest-neighbour decimation: class ids and mask values stay what they are). Each task
(``publish-map-NAME-...``) reads one window of :data:`WINDOW` px a side from the store,
without dask (lazily indexed: Zarr decodes its chunks one at a time into the small
output), and returns its pixels on the global every-``step``-th grid; the client puts the
windows' pieces side by side. Only the overview (at most a few hundred pixels a side) and the
counts reach the client, whatever the region's size; the tasks are a few a window, not one
a stored chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agriland_scale.publish.tiles import tile_grid

__all__ = ["WINDOW", "Count", "Thin", "compute_overviews"]

WINDOW = 4096  # px a side of the window one task reads
PIECE = 1024  # px a side of what a task reads at a time (whole stored chunks)


@dataclass(frozen=True)
class Thin:
    """Every ``step``-th pixel of ``group``/``var`` (``bands`` of it, if given), ``height`` x ``width`` px."""

    group: str
    var: str
    height: int
    width: int
    step: int
    bands: tuple[str, ...] = ()


@dataclass(frozen=True)
class Count:
    """The pixels of ``group``/``var`` equal to ``value`` and those with data (not NaN), over the whole raster."""

    group: str
    var: str
    height: int
    width: int
    value: float


def _read(store: Any, group: str, var: str, bands: tuple[str, ...]) -> Any:
    from agriland_scale.store import open_cube

    da = open_cube(store, group, dask=False)[var]
    return da.sel(band=list(bands)) if bands else da


def _as_dask_reads(v: np.ndarray) -> np.ndarray:
    """Cast packed values decoded to float64 here to float32, as dask reads give them (``store._packed_as_float32``)."""
    return v.astype("float32") if v.dtype == np.float64 else v


def _chunk_windows(
    da: Any, window: tuple[int, int, int, int], piece: int = PIECE
) -> list[tuple[int, int, int, int]]:
    """Cut ``window`` on the stored chunk grid into pieces of whole chunks, about ``piece`` px a side.

    Read one at a time: memory bounded by a piece, few reads (Python's overhead) a window.
    """
    y0, y1, x0, x1 = window
    chunks = da.encoding.get("preferred_chunks") or {}
    cy, cx = (c * max(1, round(piece / c)) for c in (chunks.get("y", 512), chunks.get("x", 512)))
    ys = sorted({y0, y1, *range((y0 // cy + 1) * cy, y1, cy)})
    xs = sorted({x0, x1, *range((x0 // cx + 1) * cx, x1, cx)})
    return [(a, b, c, d) for a, b in zip(ys, ys[1:]) for c, d in zip(xs, xs[1:])]


def _first(start: int, step: int) -> int:
    """Return the first multiple of ``step`` at or after ``start``."""
    return start + (-start) % step


def thin_window(store: Any, spec: Thin, window: tuple[int, int, int, int]) -> np.ndarray:
    """Read the pixels of ``window`` ``(y0, y1, x0, x1)`` on the raster's every-``step``-th grid.

    That is rows and columns ``0, step, 2 step, ...`` of the whole raster: the windows' pieces
    side by side are the whole raster's ``[::step, ::step]``. Read a piece of whole chunks at a time.
    """
    y0, y1, x0, x1 = window
    s = spec.step
    da = _read(store, spec.group, spec.var, spec.bands)
    fy, fx = _first(y0, s), _first(x0, s)
    ny, nx = len(range(fy, y1, s)), len(range(fx, x1, s))
    out = np.empty((*da.shape[:-2], ny, nx), dtype=_as_dask_reads(np.empty(0, da.dtype)).dtype)
    for a, b, c, d in _chunk_windows(da, window):
        ra, ca = _first(a, s), _first(c, s)
        if ra >= b or ca >= d:
            continue
        part = np.asarray(da.isel(y=slice(ra, b, s), x=slice(ca, d, s)).values)
        i, j = (ra - fy) // s, (ca - fx) // s
        out[..., i : i + part.shape[-2], j : j + part.shape[-1]] = part
    return out


def count_window(store: Any, spec: Count, window: tuple[int, int, int, int]) -> tuple[int, int]:
    """Count ``(pixels equal to value, pixels with data)`` in ``window``, a piece of whole chunks at a time."""
    da = _read(store, spec.group, spec.var, ())
    hits = valid = 0
    for a, b, c, d in _chunk_windows(da, window):
        v = np.asarray(da.isel(y=slice(a, b), x=slice(c, d)).values)
        hits += int((v == spec.value).sum())
        valid += int((~np.isnan(v)).sum()) if v.dtype.kind == "f" else v.size
    return hits, valid


def compute_overviews(
    store: Any, specs: dict[str, Thin | Count], *, client: Any = None, window: int = WINDOW
) -> dict[str, Any]:
    """Compute every overview (:class:`Thin`: an array) and count (:class:`Count`: ``(hits, valid)``) of ``specs``.

    One task a window of each raster, all computed together: on ``client``'s workers when
    given (``store`` must be readable there), else on the default Dask scheduler. Returns
    ``{name: result}``.
    """
    from uuid import uuid4

    import dask

    token = uuid4().hex[:12]
    tasks: dict[str, list[Any]] = {}
    grids = {}
    for name, spec in specs.items():
        grid = tile_grid(spec.height, spec.width, window)
        fn = thin_window if isinstance(spec, Thin) else count_window
        label = name.replace("_", "-")
        tasks[name] = [
            dask.delayed(fn, pure=True)(
                store, spec, (t.y0, t.y1, t.x0, t.x1), dask_key_name=f"publish-map-{label}-{token}-{i}"
            )
            for i, t in enumerate(grid)
        ]
        grids[name] = grid
    flat = [t for ts in tasks.values() for t in ts]
    if client is not None:  # before tasks queued earlier (the COGs): this process draws the maps meanwhile
        futures = client.compute(flat, priority=10)
        values = iter(client.gather(futures))
    else:
        values = iter(dask.compute(*flat))
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        parts = [next(values) for _ in tasks[name]]
        if isinstance(spec, Count):
            out[name] = (sum(p[0] for p in parts), sum(p[1] for p in parts))
            continue
        rows: dict[int, list[np.ndarray]] = {}
        for t, p in zip(grids[name], parts, strict=True):
            rows.setdefault(t.row, []).append(p)
        out[name] = np.concatenate([np.concatenate(r, axis=-1) for r in rows.values()], axis=-2)
    return out
