"""Segmentation on Dask: U-Net windows predicted once each, blended into a seamless probability map.

The windows and their blend are :mod:`.blend`'s (one global grid, a smooth weight: tiled
inference equals a whole-image pass). On Dask (:func:`segment_region`) each window is
predicted once: a first layer of tasks
predicts the windows whose centre falls in one output block and returns their weighted sum
over the windows' span; a second layer makes each output block from the sums of the spans
that reach it. (Predicting, in each block, every window touching it would repeat the windows
that straddle block borders: with 1024 px blocks and 256/64 px windows, 19 % more
predictions on 2048 x 2048 px, 49 % on 10240 x 10240 px.)

A span's sum is held until every block it reaches is blended. Written row by row, that is a
row of spans, so a worker's memory would follow the region's width; in column **bands**
(``segment.band_px``) that share no task, written band by band
(:meth:`~agriland_scale.store.blocks.BlockGrid.order`), it follows the band's width. The
price: the windows across a band's edge are predicted once for each band.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from agriland_scale.config.bands import ReflectanceMax, reflectance_scale
from agriland_scale.models import engines
from agriland_scale.models import worker as _worker
from agriland_scale.models.blend import (  # noqa: F401  (predict_block, _predicted_pixels: this module's face too)
    MAX_INFERENCE_WINDOW,
    _grid,
    _predicted_pixels,
    _touching,
    _weight_sum,
    _weighted_sum,
    choose_inference_window,
    predict_block,
)
from agriland_scale.models.embed import check_model
from agriland_scale.models.files import model_threshold
from agriland_scale.store import open_cube, write_georef

__all__ = ["MAX_INFERENCE_WINDOW", "choose_inference_window", "predict_block", "segment_region"]


def _open(cube_store: str, group: str, bands: list[str]):
    cube = open_cube(cube_store, group, dask=False)
    # lazily indexed: only the window span is read
    return cube["reflectance"].sel(band=bands), cube["clear_count"]


def _predict_task(
    model_path: str,
    cube_store: str,
    rs: np.ndarray,
    cs: np.ndarray,
    bands: list[str],
    window: int,
    reflectance_max: float | Sequence[float],
    batch_size: int,
    group: str = "cube",
    input_size: int | None = None,
    precision: str = "float32",
    engine: str = "tensorflow",
) -> np.ndarray | None:
    """Return the weighted sum of the predictions of windows ``rs x cs`` over their span.

    See :func:`_weighted_sum`; runs on a worker, with its cached model.
    """
    model, lock = _worker.get_model(model_path, precision, input_size, engine)
    refl, clear = _open(cube_store, group, bands)
    return _weighted_sum(
        model,
        refl,
        clear,
        rs,
        cs,
        window=window,
        reflectance_max=reflectance_max,
        batch_size=batch_size,
        lock=lock,
    )


def _blend_task(
    cube_store: str,
    group: str,
    gy: int,
    gx: int,
    h: int,
    w: int,
    rs: np.ndarray,
    cs: np.ndarray,
    window: int,
    origins: list[tuple[int, int]],
    *sums: np.ndarray | None,
) -> np.ndarray:
    """Blend the block at (gy, gx): the spans' weighted sums that reach it, over the summed weight."""
    clear = open_cube(cube_store, group, dask=False)["clear_count"]
    ok = np.asarray(clear[gy : gy + h, gx : gx + w]) > 0
    if not ok.any():
        return np.full((h, w), np.nan, dtype="float32")
    acc = np.zeros((h, w), dtype="float64")
    for (y_lo, x_lo), s in zip(origins, sums):
        if s is None:
            continue
        y0, y1 = max(y_lo, gy), min(y_lo + s.shape[0], gy + h)
        x0, x1 = max(x_lo, gx), min(x_lo + s.shape[1], gx + w)
        if y0 < y1 and x0 < x1:
            acc[y0 - gy : y1 - gy, x0 - gx : x1 - gx] += s[y0 - y_lo : y1 - y_lo, x0 - x_lo : x1 - x_lo]
    prob = acc / np.maximum(_weight_sum(rs, cs, window, gy, gx, h, w), 1e-12)
    return np.where(ok, prob, np.nan).astype("float32")


def _groups(starts: np.ndarray, length: int, window: int, block: int) -> list[np.ndarray]:
    """Window starts grouped by the block (of ``block`` px) holding the window's centre."""
    centre = np.clip(starts + window // 2, 0, length - 1)
    n = -(-length // block)
    return [starts[centre // block == b] for b in range(n)]


def segment_region(
    model_path: str,
    cube_store: str,
    cube: xr.Dataset,
    bands: list[str],
    *,
    window: int,
    overlap: int,
    reflectance_max: ReflectanceMax,
    threshold: float | None,
    batch_size: int,
    block: int = 1024,
    resources: dict | None = None,
    group: str = "cube",
    inference_window: int | str | None = None,
    precision: str = "float32",
    engine: str = "tensorflow",
    band: int | None = None,
) -> xr.Dataset:
    """Lazy ``probability`` (float32 0..1, NaN = nodata) and ``mask`` (uint8 1/0, 255 = nodata).

    Output chunks of ``block`` x ``block`` px; every window is predicted once (see the module
    docstring). Compute or write with a Dask client; model tasks carry ``resources``.
    Written to Zarr, both are uint8 (the probability as ``round(p * 254)``, CF ``scale_factor``
    1/254) with 255 as CF ``_FillValue`` and as Zarr ``fill_value``.

    ``window`` is the model's training window; the windows predicted are
    ``inference_window`` px (:func:`choose_inference_window`), in batches of about the same
    number of pixels as ``batch_size`` training windows (bounded memory). ``precision``: the
    Keras dtype policy the U-Net computes in (``float32`` or ``mixed_bfloat16``, see
    :func:`~agriland_scale.models.worker.get_model`); ``engine``: as for :func:`~.embed.embed_patches`.

    ``band``: column bands of ``band`` px (a multiple of ``block``) whose blocks share no
    task: the windows that straddle a band's edge are predicted once for each band they
    reach (one or two window columns an edge), so that a writer going band by band
    (:meth:`~agriland_scale.store.blocks.BlockGrid.order`) holds the overlapping windows'
    sums of a band's width, whatever the region's. ``None``: one band, every window once.

    ``reflectance_max``: per band or one for all (:func:`~agriland_scale.config.bands.reflectance_scale`),
    as the model was trained. ``threshold``: the probability from which the mask is 1;
    ``None`` takes the threshold chosen on validation recorded in the model's sidecar
    (``threshold``), or 0.5 for a model without one.
    """
    meta = check_model(model_path, "segmentation", bands, reflectance_max, window)
    threshold = model_threshold(meta) if threshold is None else float(threshold)
    scale = reflectance_scale(reflectance_max, bands)  # one reflectance a band, for the tasks
    H, W = cube.sizes["y"], cube.sizes["x"]
    trained = window
    window = choose_inference_window(inference_window, trained, overlap, H, W, meta.get("encoder"))
    batch_size = max(1, round(batch_size * (trained / window) ** 2))
    input_size = window if window != trained else None
    rs_all, cs_all = _grid(H, window, overlap), _grid(W, window, overlap)
    engine, precision = engines.prepare(
        engine,
        "segmentation",
        model_path,
        precision,
        input_size,
        bool(resources),
        # in training windows' worth of pixels: what the export's one-time cost is paid back by
        units=round(len(rs_all) * len(cs_all) * (window / trained) ** 2),
    )
    row_groups, col_groups = _groups(rs_all, H, window, block), _groups(cs_all, W, window, block)
    per_band = max(1, band // block) if band else len(col_groups)  # blocks a band holds

    def predict(rs: np.ndarray, cs: np.ndarray, salt: int | None = None):
        # the weighted sum of windows rs x cs over their span: (origin, end, delayed task)
        args = (
            model_path,
            cube_store,
            rs,
            cs,
            bands,
            window,
            scale,
            batch_size,
            group,
            input_size,
            precision,
            engine,
        )
        name = tokenize(*args) if salt is None else tokenize(*args, "band", salt)
        with dask.annotate(resources=resources or {}):
            task = dask.delayed(_predict_task, pure=True)(*args, dask_key_name=f"segment-windows-{name}")
        return (int(rs.min()), int(cs.min())), (int(rs.max()) + window, int(cs.max()) + window), task

    # each window once, in the span of the block holding its centre
    sums = {
        (bi, bj): predict(rs, cs)
        for bi, rs in enumerate(row_groups)
        for bj, cs in enumerate(col_groups)
        if len(rs) and len(cs)
    }
    edges: dict[tuple[int, int, int], tuple | None] = {}

    def span(i: int, j: int, b: int) -> tuple | None:
        """Return the span of block (i, j) as the blocks of band ``b`` see it.

        A block of another band lends band ``b`` its windows that reach into ``b``, predicted
        again for ``b``: its own span is then needed by its own band only, so a band's spans
        are freed when its blocks are written (memory follows the band's width, not the
        region's), at the cost of predicting the windows across a band edge twice.
        """
        if j // per_band == b:
            return sums.get((i, j))
        if (i, j, b) not in edges:
            x0, x1 = b * per_band * block, (b + 1) * per_band * block
            rs, cs = row_groups[i], col_groups[j]
            cs = cs[(cs < x1) & (cs + window > x0)]
            edges[i, j, b] = predict(rs, cs, salt=b) if len(rs) and len(cs) else None
        return edges[i, j, b]

    blend = dask.delayed(_blend_task, pure=True)
    reach = -(-window // block)  # a span reaches at most this many blocks past its own
    rows = []
    for bi, gy in enumerate(range(0, H, block)):
        row = []
        for bj, gx in enumerate(range(0, W, block)):
            h, w = min(block, H - gy), min(block, W - gx)
            near = [
                v
                for i in range(max(bi - reach, 0), min(bi + reach + 1, len(row_groups)))
                for j in range(max(bj - reach, 0), min(bj + reach + 1, len(col_groups)))
                if (v := span(i, j, bj // per_band)) is not None
                and v[0][0] < gy + h
                and v[1][0] > gy
                and v[0][1] < gx + w
                and v[1][1] > gx
            ]
            spans = (
                cube_store,
                group,
                gy,
                gx,
                h,
                w,
                _touching(rs_all, gy, gy + h, window),
                _touching(cs_all, gx, gx + w, window),
                window,
                [v[0] for v in near],
            )
            d = blend(
                *spans,
                *[v[2] for v in near],
                dask_key_name=f"segment-blend-{tokenize(*spans, [v[2].key for v in near])}",
            )
            row.append(da.from_delayed(d, shape=(h, w), dtype="float32"))
        rows.append(row)
    prob = da.block(rows)
    mask = da.where(da.isnan(prob), 255, (prob >= threshold).astype("uint8")).astype("uint8")
    ds = xr.Dataset(
        {"probability": (("y", "x"), prob), "mask": (("y", "x"), mask)}, coords={"y": cube.y, "x": cube.x}
    )
    # the model by its file name, never a path of this machine (the pipeline names it relative
    # to the run: store.run_relative)
    ds["probability"].attrs.update(
        long_name="agricultural land probability",
        units="1",
        model=str(model_path).rstrip("/").rsplit("/", 1)[-1],
        window=window,
        training_window=trained,
        overlap=overlap,
        precision=precision,
        **({"engine": engine} if engine != "tensorflow" else {}),  # tensorflow runs keep their attributes
        valid_range=np.array([0, 254], dtype="uint8"),
    )
    ds["mask"].attrs.update(
        long_name="agricultural land mask",
        threshold=threshold,
        flag_values=np.array([0, 1], dtype="uint8"),
        flag_meanings="other agricultural",
    )
    # nodata agrees everywhere: CF _FillValue == Zarr fill_value == 255, never a valid value
    # (the probability is stored as round(p * 254) in 0..254, its CF valid_range in stored
    # values, the mask as 0/1)
    ds["probability"].encoding.update(
        dtype="uint8",
        scale_factor=np.float32(1 / 254),
        add_offset=np.float32(0),
        _FillValue=np.uint8(255),
        fill_value=np.uint8(255),
    )
    ds["mask"].encoding.update(_FillValue=np.uint8(255), fill_value=np.uint8(255))
    return write_georef(ds, cube.rio.crs)
