"""Compositing a stack of observations into one cube block.

Pure functions over numpy blocks (called through ``dask.array.map_blocks``): the median of
the clear observations per pixel and band, counted in ``clear_count``. Masks over the cube
grid are in :mod:`agriland_scale.cube.masks`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

# packed reflectance (int16) holds +-PACK_LIMIT steps; PACK_FILL is its fill value (no data)
PACK_LIMIT = 32767
PACK_FILL = -32768

__all__ = ["PACK_FILL", "PACK_LIMIT", "composite_block", "pack_reflectance"]


# per-thread scratch arrays reused from block to block (see _buffer), at most this many bytes
BUFFER_BYTES = 64 * 2**20
_buffers = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Return this thread's scratch array ``name`` of ``shape`` and ``dtype`` (uninitialised).

    The memory of the last call with that name comes back when it is large enough (a
    smaller edge block takes the front of it), so a task's temporaries are not fresh memory
    each block. Fresh memory costs page faults: a packed 4 band x 4 date 1024 px block took
    20 ms with fresh temporaries against 9.6 ms in a loop on one thread, and in the cube
    benchmark's workers 14.8 against 10.8 ms of CPU (minor faults a build: 1870 against
    184). Callers use the array only until their task returns and never return it. A thread
    keeps at most :data:`BUFFER_BYTES`; beyond, arrays are fresh ones, not kept.
    """
    pool = getattr(_buffers, "pool", None)
    if pool is None:
        pool = _buffers.pool = {}
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = pool.get(name)
    if raw is None or raw.nbytes < nbytes:
        pool.pop(name, None)
        raw = np.empty(nbytes, dtype="uint8")
        if nbytes + sum(x.nbytes for x in pool.values()) <= BUFFER_BYTES:
            pool[name] = raw
    return raw[:nbytes].view(dtype).reshape(shape)


def _sort_small(x: np.ndarray | Sequence[np.ndarray], *, inplace: bool = False) -> list[np.ndarray]:
    """Sort along axis 0 with an odd-even transposition network of whole-plane min/max.

    Returns the sorted planes.
    For the few dates of a season this is many times faster than ``np.sort`` along a short
    last axis (which pays a per-pixel call); it costs T^2 / 2 plane operations, so beyond 24
    planes ``np.sort`` is used instead. ``inplace``: the planes of ``x`` (the caller's own
    array) are overwritten and one spare plane serves every compare, instead of two new
    arrays a compare (fresh 2 MB planes cost more in page faults than the min/max).
    """
    planes = list(x)
    n = len(planes)
    if n > 24:
        return list(np.sort(np.asarray(planes), axis=0))
    spare = _buffer("sort_spare", planes[0].shape, planes[0].dtype) if inplace and n > 1 else None
    for r in range(n):
        for i in range(r % 2, n - 1, 2):
            a, b = planes[i], planes[i + 1]
            if spare is None:
                planes[i], planes[i + 1] = np.minimum(a, b), np.maximum(a, b)
                continue
            np.minimum(a, b, out=spare)
            np.maximum(a, b, out=b)
            planes[i], spare = spare, a
    return planes


def _middle_pair(
    x: np.ndarray | Sequence[np.ndarray], scratch: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the two middle values ``((T - 1) // 2, T // 2)`` along axis 0 of ``T`` planes.

    Each is a ``(y, x)`` plane (the same one twice for odd ``T``), found with the fewest
    whole-plane min/max: none for T <= 2, a median-of-three for 3, six for 4; a full sorting
    network beyond. ``scratch``: four planes of the planes' shape and dtype that T = 3 and 4
    write into (and return) instead of new arrays: a fresh 2 MB plane costs more in page
    faults than the min/max that fills it (4 bands of a 1024 px block: 4.1 ms against 10.9).
    """
    p = list(x)
    T = len(p)
    if T <= 2:
        return p[0], p[-1]
    if T not in (3, 4):
        s = _sort_small(np.array(p), inplace=True)  # a copy: x is the caller's input
        return s[(T - 1) // 2], s[T // 2]
    a, b, c, d = scratch if scratch is not None else [np.empty_like(p[0]) for _ in range(4)]
    np.minimum(p[0], p[1], out=a)
    np.maximum(p[0], p[1], out=b)
    if T == 3:  # max(min(p0, p1), min(max(p0, p1), p2))
        np.minimum(b, p[2], out=b)
        np.maximum(a, b, out=a)
        return a, a
    np.minimum(p[2], p[3], out=c)
    np.maximum(p[2], p[3], out=d)
    np.maximum(a, c, out=a)
    np.minimum(b, d, out=b)
    return a, b


def _picker(idx: np.ndarray, T: int, name: str = "pick"):
    """Build a function returning ``planes[idx[y, x]][y, x]`` (``idx`` in 0..T-1).

    It is built once per block and applied to every band, instead of fancy indexing: the
    plane itself where ``idx`` is constant (e.g. every date clear), else one blend per other
    index value present, made of whole-plane bitwise operations for integers (a masked copy
    costs a branch per pixel). The blend is written into the thread's buffer ``name``
    (:func:`_buffer`): valid until the picker is applied again.
    """
    if T > 24:
        return lambda planes: np.take_along_axis(np.asarray(planes), idx[None], 0)[0]
    i0, i1 = int(idx.min()), int(idx.max())
    if i0 == i1:
        return lambda planes: planes[i0]  # a view: callers only read it
    masks = [(i, idx == i) for i in range(i0 + 1, i1 + 1)]
    ones: dict = {}  # integer dtype -> [(i, all bits set where idx == i)]

    def pick(planes) -> np.ndarray:
        res = _buffer(name, planes[i0].shape, planes[i0].dtype)
        np.copyto(res, planes[i0])
        dt = res.dtype
        if not np.issubdtype(dt, np.integer):
            for i, m in masks:
                np.copyto(res, planes[i], where=m)
            return res
        if dt not in ones:
            ones[dt] = [(i, np.negative(m.astype(dt))) for i, m in masks]
        for i, m in ones[dt]:  # res = m ? planes[i] : res
            res ^= (res ^ planes[i]) & m
        return res

    return pick


def composite_block(
    dn: np.ndarray | Sequence[np.ndarray],
    clear: np.ndarray,
    *,
    scale: np.ndarray,
    offset: np.ndarray,
    method: str,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Composite one block of observations into reflectance.

    ``dn (band, time, y, x)`` digital numbers and ``clear (time, y, x)`` give reflectance
    ``(band, y, x)`` float32 (``dn * scale + offset``), NaN where no observation is clear.
    The median is taken on the digital numbers (scaling is linear and increasing, so it
    commutes) with a sorting network of whole-plane min/max: every operation runs on
    contiguous (y, x) planes.

    Parameters
    ----------
    dn : numpy.ndarray or sequence of numpy.ndarray
        Digital numbers ``(band, time, y, x)``: an array, or one ``(time, y, x)`` array a band.
    clear : numpy.ndarray
        ``(time, y, x)`` bool, True where an observation is clear.
    scale, offset : numpy.ndarray
        ``(band,)`` factors: reflectance = ``dn * scale + offset`` (unitless).
    method : {"median", "mean", "first", "last"}
        ``median`` (of the clear observations; the mean of the two middle ones for an even
        count), ``mean``, ``first`` or ``last`` (in time order).
    out : numpy.ndarray, optional
        ``(band, y, x)`` float32 array written into when given.

    Returns
    -------
    numpy.ndarray
        The composite ``(band, y, x)`` float32 (``out`` when given).
    """
    n = _clear_count(clear)  # (y, x)
    if out is None:
        out = np.empty((len(dn),) + clear.shape[1:], dtype="float32")
    _composite(dn, clear, n, out, scale=scale, offset=offset, method=method)
    return out


def _clear_count(clear: np.ndarray) -> np.ndarray:
    """Count the clear observations per pixel of a ``(time, y, x)`` mask, ``(y, x)``.

    Summed in int16 (signed, so that ``n - 1`` stays -1 for no observation), ten times
    faster than int64.
    """
    return np.add.reduce(clear, axis=0, dtype="int16" if clear.shape[0] < 2**15 else "int64")


def _band_values(dn: np.ndarray | Sequence[np.ndarray], clear: np.ndarray, n: np.ndarray, method: str):
    """Yield, band by band, what the composite of each pixel is made of.

    ``(lo, hi)`` integer or float planes ``(y, x)``, valid until the next band is asked
    for (they may be reused), whose mean is the composite: the middle
    pair of the clear values for ``median`` (the same plane twice for an odd count), the
    picked value twice (the same object) for ``first`` and ``last``; ``(v, None)`` with
    ``v`` the float mean for ``mean``. Pixels without a clear observation (``n == 0``) hold
    arbitrary values: callers mask them.
    """
    T = clear.shape[0]
    all_clear = bool(n.min() == T)  # the common case: no masking to apply
    if method == "median" and not all_clear:  # every date clear: the middle pair is the same everywhere
        pick_lo = _picker(np.clip((n - 1) // 2, 0, None), T, "pick_lo")
        pick_hi = _picker(np.clip(n // 2, 0, None), T, "pick_hi")
    elif method in ("first", "last") and all_clear:  # the first or last date everywhere
        pick = (lambda planes: planes[0]) if method == "first" else (lambda planes: planes[-1])
    elif method == "first":
        pick = _picker(np.argmax(clear, axis=0), T)
    elif method == "last":
        pick = _picker(T - 1 - np.argmax(clear[::-1], axis=0), T)
    masked_max: dict = {}  # unsigned dtype -> its max where not clear, 0 elsewhere (and the converse)
    for b in range(len(dn)):
        dt = dn[b].dtype
        fill = np.iinfo(dt).max if np.issubdtype(dt, np.integer) else np.inf
        with np.errstate(invalid="ignore", divide="ignore"):
            if method == "median":
                if all_clear:  # T = 3, 4: the middle pair in this thread's planes, band after band
                    yield _middle_pair(
                        dn[b],
                        [_buffer(f"pair{i}", dn[b].shape[1:], dt) for i in range(4)] if T in (3, 4) else None,
                    )
                    continue
                # clear values sort first: the others are set to the dtype's max (np.where
                # costs a branch per pixel; for unsigned integers an OR with all ones does it)
                x = _buffer("masked", dn[b].shape, dt)
                if np.issubdtype(dt, np.unsignedinteger):
                    if dt not in masked_max:
                        m = masked_max[dt] = _buffer(f"masked_max_{dt}", clear.shape, dt)
                        np.logical_not(clear, out=m, casting="unsafe")
                        np.negative(m, out=m)  # 1 -> all bits set
                    np.bitwise_or(dn[b], masked_max[dt], out=x)
                else:
                    np.copyto(x, dn[b])
                    np.copyto(x, fill, where=~clear)
                s = _sort_small(x, inplace=True)  # x is this band's own masked copy
                yield pick_lo(s), pick_hi(s)
            elif method == "mean":
                if dn[b].dtype.kind == "u" and dn[b].dtype.itemsize <= 2:  # exact integer sums
                    if ("and", dn[b].dtype) not in masked_max:
                        masked_max["and", dn[b].dtype] = np.negative(clear.astype(dn[b].dtype))
                    x = dn[b] if all_clear else np.bitwise_and(dn[b], masked_max["and", dn[b].dtype])
                    yield x.sum(0, dtype="uint32") / n, None
                else:
                    yield np.where(clear, dn[b], 0).sum(0, dtype="float64") / n, None
            else:
                v = pick(dn[b])
                yield v, v


def _composite(
    dn: np.ndarray | Sequence[np.ndarray],
    clear: np.ndarray,
    n: np.ndarray,
    out: np.ndarray,
    *,
    scale: np.ndarray,
    offset: np.ndarray,
    method: str,
) -> None:
    """Run :func:`composite_block` into ``out``, given ``n = _clear_count(clear)``.

    Every step keeps the float32 arithmetic of the plain expressions (in place where it
    saves a copy).
    """
    for b, (lo, hi) in enumerate(_band_values(dn, clear, n, method)):
        with np.errstate(invalid="ignore", divide="ignore"):
            if hi is not None and hi is not lo:  # a median's middle pair
                # (lo + hi) * (scale / 2): one rounding, as (lo + hi) / 2 * scale (halving is exact)
                v = np.add(lo, hi, out=_buffer("float_sum", lo.shape, "float32"), dtype="float32")
                np.multiply(v, np.float32(0.5) * scale[b], out=out[b], dtype="float32", casting="unsafe")
                if offset[b]:
                    out[b] += offset[b]
                continue
            np.multiply(lo, scale[b], out=out[b], dtype="float32", casting="unsafe")
            out[b] += offset[b]
    if not n.min():
        out[:, n == 0] = np.nan


def pack_reflectance(refl: np.ndarray, step: float, out: np.ndarray | None = None) -> np.ndarray:
    """Encode float32 reflectance as int16 steps of ``step``, as xarray's CF encoding does.

    ``round(refl / step)`` in float32 arithmetic, clipped to +-:data:`PACK_LIMIT`, with
    :data:`PACK_FILL` where ``refl`` is NaN: the values ``to_zarr`` stores for a float
    variable encoded with ``dtype="int16"``, ``scale_factor=step`` and ``_FillValue=PACK_FILL``
    (``tests/test_composite.py`` checks it against xarray).
    """
    with np.errstate(invalid="ignore"):
        q = np.round(refl / np.float32(step))
        np.clip(q, -PACK_LIMIT, PACK_LIMIT, out=q)
    q[np.isnan(q)] = PACK_FILL
    if out is None:
        return q.astype("int16")
    out[...] = q
    return out


def _composite_packed(
    dn: np.ndarray | Sequence[np.ndarray],
    clear: np.ndarray,
    n: np.ndarray,
    out: np.ndarray,
    *,
    scale: np.ndarray,
    offset: np.ndarray,
    method: str,
    step: float,
) -> None:
    """Run the composite into ``out`` ``(band, y, x)`` int16 as packed steps of ``step``.

    The stored value is ``round(reflectance / step)``, clipped to +-:data:`PACK_LIMIT`, and
    :data:`PACK_FILL` where no observation is clear: what :func:`pack_reflectance` makes of
    the float32 composite. With ``step`` half of every band's DN scale and each ``offset`` a
    whole number of steps (Sentinel-2: scale 1e-4, offset 0 or -0.1), a median, first or last
    composite is the integer ``lo + hi + offset / step`` (see :func:`_band_values`),
    computed in integers without a float pass; a mean, or other factors, go through the
    float32 composite and :func:`pack_reflectance`.
    """
    k = offset / np.float32(step)
    exact = (
        method != "mean"
        and all(np.issubdtype(d.dtype, np.integer) for d in dn)
        and bool(np.allclose(scale * np.float32(0.5), step, rtol=1e-6))
        and bool(np.all(np.abs(k - np.round(k)) < 1e-3))
    )
    if not exact:
        refl = np.empty(out.shape, dtype="float32")
        _composite(dn, clear, n, refl, scale=scale, offset=offset, method=method)
        pack_reflectance(refl, step, out=out)
        return
    v = _buffer("packed_sum", out.shape[1:], "int32")
    for b, (lo, hi) in enumerate(_band_values(dn, clear, n, method)):
        kb = int(np.round(k[b]))
        if _sum_fits_int16(lo, hi, kb):  # no clipping: add straight into the int16 output
            np.add(lo, hi, out=out[b], dtype="int16", casting="unsafe")
            if kb:
                out[b] += np.int16(kb)
            continue
        np.add(lo, hi, out=v, dtype="int32")
        if kb:
            v += kb
        np.clip(v, -PACK_LIMIT, PACK_LIMIT, out=v)
        out[b] = v
    if not n.min():
        out[:, n == 0] = PACK_FILL


def _sum_fits_int16(lo: np.ndarray, hi: np.ndarray, k: int) -> bool:
    """Whether ``lo + hi + k`` fits in +-:data:`PACK_LIMIT` at every pixel (int16 is exact).

    For unsigned ``lo <= hi`` of at most 16 bits.
    One maximum of ``hi`` (0.15 ms a 1024 px plane) decides it; with it the packing of a
    band is one int16 add (and one for ``k``) instead of an int32 sum, a clip and a cast.
    Pixels without a clear observation (filled later) may hold the dtype's maximum and
    then send the band through the general path.
    """
    if lo.dtype.kind != "u" or hi.dtype.kind != "u" or max(lo.dtype.itemsize, hi.dtype.itemsize) > 2:
        return False
    return 2 * int(hi.max()) + k <= PACK_LIMIT and k >= -PACK_LIMIT


def _as_dtype(value: float, dtype: np.dtype) -> float | np.generic:
    """Return ``value`` as a scalar of ``dtype`` when it holds it exactly, else unchanged.

    Comparing uint16 digital numbers with a Python float (a nodata of ``0.0`` from the
    asset's metadata) converts every element to float64 first: five times slower than with
    a uint16 scalar, for the same result.
    """
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if float(value).is_integer() and info.min <= value <= info.max:
            return dtype.type(int(value))
    return value


def _joined(blocks: np.ndarray | list) -> np.ndarray:
    """Join the blocks dask passes for a contracted time axis (``concatenate=False``).

    One block, the usual case, is returned without a copy.
    """
    if not isinstance(blocks, list):
        return blocks
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)


def _cube_block(
    *arrays: np.ndarray | list[np.ndarray],
    n_bands: int,
    nodata: Sequence[float | None],
    scl_classes: np.ndarray | None,
    cloud: bool,
    region: bool,
    part: str,
    limit: float | None = None,
    step: float | None = None,
    **composite,
) -> np.ndarray:
    """Compute one spatial chunk of the cube.

    The inputs are ``n_bands`` arrays ``(time, y, x)`` of digital numbers (or lists of
    their blocks along time, :func:`_joined`), then the SCL band
    (if ``scl_classes``), a cloud mask ``(time, y, x)`` (if ``cloud``) and a region mask
    ``(y, x)`` (if ``region``). With ``part="reflectance"`` the result is the composite
    ``(n_bands, y, x)`` float32, with ``part="packed"`` the composite as stored: int16
    steps of ``step`` reflectance (:func:`_composite_packed`), with ``part="clear_count"``
    the number of clear observations ``(y, x)`` uint16. ``limit``: reflectance is clipped to
    ``[-limit, limit]`` (what packed int16 storage holds, :data:`PACK_LIMIT` steps).
    """
    joined = tuple(_joined(a) for a in arrays)
    bands, rest = joined[:n_bands], list(joined[n_bands:])
    clear = None
    for b, nd in zip(bands, nodata):  # clear: this thread's buffers (_buffer), not fresh memory
        if nd is not None:
            value = _as_dtype(nd, b.dtype)
            if clear is None:
                clear = np.not_equal(b, value, out=_buffer("clear", b.shape, bool))
                continue
            other = np.not_equal(b, value, out=_buffer("clear_other", b.shape, bool))
            np.logical_and(clear, other, out=clear)
    if clear is None:
        clear = np.ones(bands[0].shape, dtype=bool)
    if scl_classes is not None:
        clear &= ~np.isin(rest.pop(0), scl_classes)
    if cloud:
        clear &= ~rest.pop(0)
    if region:
        clear &= rest.pop(0)
    n = _clear_count(clear)
    if part == "clear_count":
        return n.astype("uint16")
    if part == "packed":
        assert step is not None
        packed = np.empty((n_bands,) + bands[0].shape[1:], dtype="int16")
        _composite_packed(bands, clear, n, packed, step=step, **composite)
        return packed
    out = np.empty((n_bands,) + bands[0].shape[1:], dtype="float32")
    _composite(bands, clear, n, out, **composite)
    if limit is not None:
        np.clip(out, np.float32(-limit), np.float32(limit), out=out)  # NaN stays NaN
    return out
