"""Reading the items' assets with odc-stac, every failure naming the item, band and file.

:func:`check_assets` probes the assets before anything is computed (existence, grid against
the item's ``proj:*`` fields, the first and last blocks); :func:`read_items` is
``odc.stac.load`` with a reader that names the item and href of a block that fails to read.
With ``cube.on_bad_asset: skip``, :class:`SkippedReads` collects, from the Dask workers, the
reads that reader left out, for the run's record.
"""

from __future__ import annotations

import logging
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import numpy as np
import odc.stac
import pystac
import rasterio
import xarray as xr
from odc.loader import RioDriver

from agriland_scale.config.schema import CubeConfig
from agriland_scale.errors import AgrilandWarning, CorruptInput
from agriland_scale.search.items import asset_epsg

_StacMDParser: type | None
try:  # the parser odc.stac.load uses by default (private: without it, failed reads are unnamed)
    from odc.stac._mdtools import StacMDParser as _Parser

    _StacMDParser = _Parser
except ImportError:  # pragma: no cover
    _StacMDParser = None

__all__ = [
    "GDAL_CLOUD_OPTIONS",
    "GRID_TOLERANCE_PX",
    "READ_SKIPPED",
    "SKIPPED_READS_TOPIC",
    "SkippedReads",
    "check_assets",
    "configure_rio",
    "describe_skipped",
    "read_items",
]

log = logging.getLogger(__name__)


# GDAL's settings for reading COGs over HTTP(S) and object storage: odc-stac's cloud defaults
# (no directory listing on open; 10 retries of 429/5xx answers and dropped connections, from
# 0.5 s apart) and ranges of one read merged into one request
GDAL_CLOUD_OPTIONS: dict[str, Any] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "10",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
}


def configure_rio() -> None:
    """Set :data:`GDAL_CLOUD_OPTIONS` as odc-stac's GDAL configuration, for every read of a cube.

    ``odc.stac.configure_rio(cloud_defaults=True, ...)``: odc-stac copies the configuration
    into each load's Dask tasks, so the workers (local or remote) read with it too.
    """
    odc.stac.configure_rio(cloud_defaults=True, **GDAL_CLOUD_OPTIONS)


# the file's grid and the item's proj:transform may place a corner of the asset this fraction of
# a pixel apart (1 cm at 10 m): float rounding passes, a shifted or rescaled grid does not
GRID_TOLERANCE_PX = 1e-3


def check_assets(
    items: Sequence[pystac.Item], bands: Sequence[str], on_bad_asset: str = "fail", *, full: bool = False
) -> tuple[list[pystac.Item], list[dict]]:
    """Open every asset of ``bands``, check its grid and decode two of its blocks.

    The grid is compared with the item's ``proj:*`` fields; the two blocks are
    full-resolution ones. Per asset, in threads (8 at a time):

    - **georeferencing**: the file's CRS (EPSG code), size (height, width) and transform must
      match what the item declares, when it does: the asset's (else the item's)
      ``proj:epsg``/``proj:code``, ``proj:shape`` and ``proj:transform`` (corners within
      :data:`GRID_TOLERANCE_PX` of a pixel). odc-stac places pixels with the item's fields
      and never reads the file's, so a wrong field silently shifts, crops or blanks the data;
    - **integrity**: the full-resolution block whose data comes first in the file and the one
      whose data ends last (from the TIFF tile index, which the header holds; first and last
      block of the grid for other formats). A file cut short anywhere fails the second read;
      damage at the start of the full-resolution data fails the first. Damage inside another
      block is found only when that block is read: then the cube's reader raises
      :class:`CorruptInput` naming the item, asset and href (or, with ``on_bad_asset="skip"``,
      leaves those pixels out with a warning). ``full=True`` decodes every full-resolution
      block instead, so that nothing corrupt reaches the cube.

    Cost: one header read (the tile index included) and two block reads an asset, whatever
    its size (over HTTP, one request for the header and one a block): measured on local disk,
    7 ms an asset for the four 1024 x 1024 COGs of the embedded Virginia window (27 ms in
    all one after the other, 70-120 ms through the thread pool on 2 busy cores, where
    starting GDAL in each thread dominates), 12 ms for a full 10980 x 10980 Sentinel-2 band
    (512 px tiles). ``full=True`` reads and decodes the whole file: 80 ms for the four
    Virginia COGs one after the other, 1.9 s for one full Sentinel-2 band (192 MB), i.e. as
    much I/O and decoding again as a cube over the whole tiles.

    ``on_bad_asset="fail"`` raises :class:`CorruptInput` naming the item, asset and href, what
    is wrong and what to do; ``"skip"`` drops the item with an :class:`AgrilandWarning` and
    reports it in the returned list of skipped assets (dicts with ``item``, ``asset``,
    ``href``, ``problem`` (``"unreadable"`` or ``"georeferencing"``) and ``error``).

    Parameters
    ----------
    items : sequence of pystac.Item
        The items to load.
    bands : sequence of str
        The asset keys to check in each item.
    on_bad_asset : {"fail", "skip"}
        What a bad asset does: raise, or drop its item with a warning.
    full : bool
        Decode every full-resolution block instead of two.

    Returns
    -------
    items : list of pystac.Item
        The items kept (all of them with ``"fail"``).
    skipped : list of dict
        One record per bad asset (``item``, ``asset``, ``href``, ``problem``, ``error``).

    Raises
    ------
    CorruptInput
        With ``on_bad_asset="fail"``, for the first bad asset.
    """
    jobs = [(i, b) for i in items for b in bands]
    with ThreadPoolExecutor(8) as pool:
        bad = [r for r in pool.map(lambda job: _probe_asset(*job, full=full), jobs) if r]
    if bad and on_bad_asset == "fail":
        b = bad[0]
        raise CorruptInput(
            f"item {b['item']}: {_asset_problem(b)}; {len(bad)} bad asset(s) in all. "
            f"{_BAD_ASSET_FIX[b['problem']]}"
        )
    dropped = {b["item"] for b in bad}
    for b in bad:
        warnings.warn(f"skipping item {b['item']}: {_asset_problem(b)}", AgrilandWarning, stacklevel=2)
    return [i for i in items if i.id not in dropped], bad


_BAD_ASSET_FIX = {
    "unreadable": "Download the file again or fix the asset's href, or set cube.on_bad_asset: skip to "
    "leave such items out",
    "georeferencing": "Fix the item's proj:* fields (proj:epsg / proj:code, proj:shape, proj:transform) "
    "to match the file, or set cube.on_bad_asset: skip to leave such items out",
}


def _asset_problem(b: dict) -> str:
    what = "cannot be read" if b["problem"] == "unreadable" else "does not match the item's georeferencing"
    return f"asset '{b['asset']}' ({b['href']}) {what}: {b['error']}"


def describe_skipped(s: dict[str, Any]) -> str:
    """One line for a record of ``inputs.skipped_assets``: a skipped item, or parts left out of an asset.

    ``s`` is a record of :func:`check_assets` (its item left out) or of
    :meth:`SkippedReads.records` (``problem`` :data:`READ_SKIPPED`: parts of the asset left as
    nodata while the cube was computed).
    """
    if s.get("problem") == READ_SKIPPED:
        return (
            f"skipped unreadable parts of item {s['item']}, asset '{s['asset']}' ({s['href']}): {s['error']} "
            f"— {s['chunks']} chunk(s) left as nodata (cube.on_bad_asset: skip)"
        )
    return f"skipped item {s['item']}: {_asset_problem(s)} (cube.on_bad_asset: skip)"


def _read_error_text(e: BaseException) -> str:
    """Describe a rasterio read error with GDAL's own reason.

    Rasterio's message often only says 'Read failed. See previous exception for details.'.
    """
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and "previous exception" in str(e):
        return f"{type(e).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"


def _probe_asset(item: pystac.Item, band: str, *, full: bool = False) -> dict | None:
    """One asset of :func:`check_assets`: ``None`` when it is sound, else a bad-asset record."""
    href = item.assets[band].get_absolute_href() or item.assets[band].href
    record = {"item": item.id, "asset": band, "href": href}
    try:
        with rasterio.Env(**GDAL_CLOUD_OPTIONS), rasterio.open(href) as ds:
            mismatch = _grid_mismatch(item, band, ds)
            if mismatch:
                return record | {"problem": "georeferencing", "error": mismatch}
            for window in ds.block_windows(1) if full else _end_blocks(ds):
                if isinstance(window, tuple):
                    window = window[1]
                ds.read(1, window=window)
    except Exception as e:  # noqa: BLE001 - every reader failure is reported the same way
        return record | {"problem": "unreadable", "error": _read_error_text(e)}
    return None


def _end_blocks(ds) -> list:
    """Return the windows of the full-resolution blocks whose data start first and end last.

    The order in the file comes from the TIFF tile index; the grid's first and last block
    are used when the driver has none.
    """
    from rasterio.windows import Window

    bh, bw = ds.block_shapes[0]
    ny, nx = -(-ds.height // bh), -(-ds.width // bw)
    first, last = (0, 0), (ny - 1, nx - 1)
    if ds.driver == "GTiff":
        spans = []
        for r in range(ny):
            for c in range(nx):
                off = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1)
                size = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1)
                if off and size and int(size) > 0:  # 0: a sparse (empty) block
                    spans.append((int(off), int(off) + int(size), r, c))
        if spans:
            first = min(spans)[2:]
            last = max(spans, key=lambda s: s[1])[2:]
    return [
        Window(c * bw, r * bh, min(bw, ds.width - c * bw), min(bh, ds.height - r * bh))
        for r, c in dict.fromkeys([first, last])
    ]


def _grid_mismatch(item: pystac.Item, band: str, ds) -> str | None:
    """Describe what differs between the grid ``item`` declares for ``band`` and the file's ``ds``.

    Compares CRS, size and transform; ``None`` when they agree. Fields the item lacks are
    not compared.
    """
    from affine import Affine

    fields = {
        **{k: v for k, v in item.properties.items() if k.startswith("proj:")},
        **item.assets[band].extra_fields,
    }
    problems = []
    want = asset_epsg(item, band)
    got = ds.crs.to_epsg() if ds.crs is not None else None
    same = got == want or (ds.crs is not None and want is not None and ds.crs == rasterio.CRS.from_epsg(want))
    if want is not None and not same:
        found = f"EPSG:{got}" if got else ("no CRS" if ds.crs is None else f"'{ds.crs.to_string()[:80]}'")
        problems.append(f"the item says EPSG:{want} (proj:epsg / proj:code), the file's CRS is {found}")
    shape = fields.get("proj:shape")
    if shape is not None and [int(v) for v in list(shape)[-2:]] != [ds.height, ds.width]:
        problems.append(
            f"the item says proj:shape {list(shape)}, the file is {[ds.height, ds.width]} "
            "pixels (height, width)"
        )
    tr = fields.get("proj:transform")
    if tr is not None and len(tr) >= 6:
        declared, actual = Affine(*[float(v) for v in tr[:6]]), ds.transform
        pixel = max(abs(actual.a), abs(actual.e), abs(actual.b), abs(actual.d)) or 1.0
        corners = [(0, 0), (ds.width, 0), (0, ds.height), (ds.width, ds.height)]
        off = max(float(np.hypot(*np.subtract(declared @ c, actual @ c))) for c in corners)
        if not off <= GRID_TOLERANCE_PX * pixel:
            unit = "m" if ds.crs is not None and ds.crs.is_projected else "CRS units"
            problems.append(
                f"the item says proj:transform {[float(v) for v in tr[:6]]}, the file's is "
                f"{list(actual)[:6]}: corners {off:.6g} {unit} ({off / pixel:.4g} pixels) "
                "apart"
            )
    return "; ".join(problems) or None


# -- named reads in the cube's tasks -----------------------------------------------------------
_READ_ERRORS = (rasterio.errors.RasterioError, rasterio.errors.WindowEvaluationError)

# the Dask event topic of the reads left out with ``skip``, and the ``problem`` of their records
SKIPPED_READS_TOPIC = "agriland-skipped-reads"
READ_SKIPPED = "unreadable_parts"
# the tag of the :class:`SkippedReads` that collects the reads of the cubes planned now
_COLLECTOR: ContextVar[str | None] = ContextVar("agriland_skipped_reads", default=None)


class _AssetNames(_StacMDParser or object):  # type: ignore[misc]
    """odc-stac's metadata parser, tagging each raster source with its item id and asset key.

    The tags (``RasterSource.driver_data``) let a failed read name them.
    """

    def driver_data(self, md, band_key):
        data = super().driver_data(md, band_key)
        if data is None and band_key[0] != "_stac_metadata":
            return {"item": md.id, "asset": band_key[0]}
        return data


class _NamedReader:
    """A rasterio reader whose failures name the item, asset and href (see :func:`_load`).

    With ``skip``, a failed read of a chunk is read again in parts of ``part`` px a side (the
    cube's stored chunk: a read chunk holds several), and only the parts that fail are left out.
    Each read that leaves parts out is also sent, with ``tag``, as a Dask event on
    :data:`SKIPPED_READS_TOPIC` (see :class:`SkippedReads`).
    """

    def __init__(self, inner, src, skip: bool, part: int | None = None, tag: str | None = None) -> None:
        self._inner, self._src, self._skip, self._part, self._tag = inner, src, skip, part, tag

    def read(self, cfg, dst_geobox, *, dst=None, selection=None):
        try:
            return self._inner.read(cfg, dst_geobox, dst=dst, selection=selection)
        except _READ_ERRORS as e:
            reason = _read_error_text(e)
        parts = None
        h, w = dst_geobox.shape.yx
        step = self._part or max(h, w)
        lost = -(-h // step) * -(-w // step)  # the parts of part px left out
        if self._skip and self._part and max(h, w) > self._part and dst is None:
            parts, lost = self._read_parts(cfg, dst_geobox, selection)
        # raised outside the except block: rasterio's error chain (GDAL's CPLE errors) does not
        # unpickle, and a Dask worker would then send a bare Exception instead of CorruptInput
        names = self._src.driver_data if isinstance(self._src.driver_data, dict) else {}
        what = (
            f"item {names.get('item', '?')}: asset '{names.get('asset', '?')}' ({self._src.uri}) "
            f"cannot be read ({reason})"
        )
        if not self._skip:
            raise CorruptInput(
                f"{what} while loading the cube: the file is corrupt or cut short where the check before "
                "the cube did not read. Download the file again or fix the asset's href, or set "
                "cube.on_bad_asset: skip to leave its unreadable parts out"
            )
        warnings.warn(
            f"{what}: cube.on_bad_asset is 'skip', so these pixels of the item are left out (nodata)",
            AgrilandWarning,
            stacklevel=2,
        )
        self._report(names, reason, float(dst_geobox.affine.f), float(dst_geobox.affine.c), lost)
        if parts is not None:  # the parts that could be read
            return parts
        out = dst[0:0, 0:0] if dst is not None else np.ndarray((0, 0), dtype=cfg.dtype)
        return np.s_[0:0, 0:0], out

    def _report(self, names: dict, reason: str, top: float, left: float, lost: int) -> None:
        """Send the read left out to the run as a Dask event; nothing outside a Dask worker.

        ``top``, ``left``: the y and x coordinates (CRS units) of the read box's top-left
        corner, which place it in the cube's blocks; ``lost``: the parts of ``part`` px left as nodata.
        """
        if self._tag is None:
            return
        try:
            from distributed import get_worker

            worker = get_worker()
        except (ImportError, ValueError):
            return  # computed without a Dask cluster: the warning alone says it
        worker.log_event(
            SKIPPED_READS_TOPIC,
            {
                "tag": self._tag,
                "item": str(names.get("item", "?")),
                "asset": str(names.get("asset", "?")),
                "href": str(self._src.uri),
                "error": reason[:500],
                "top": top,
                "left": left,
                "chunks": int(lost),
            },
        )

    def _read_parts(self, cfg, dst_geobox, selection):
        """Read ``dst_geobox`` in parts of ``part`` px; the parts that fail keep the fill value.

        Returns ``(roi, pixels)`` over the whole box, or None when every part failed, and the
        number of parts that failed.
        """
        from odc.loader import resolve_dst_nodata, resolve_src_nodata  # odc-loader's public API

        h, w = dst_geobox.shape.yx
        step = int(self._part or 1)
        out = None
        failed = 0
        for r0 in range(0, h, step):
            for c0 in range(0, w, step):
                try:
                    roi, pix = self._inner.read(
                        cfg, dst_geobox[r0 : r0 + step, c0 : c0 + step], selection=selection
                    )
                except _READ_ERRORS:
                    failed += 1
                    continue
                if out is None:
                    fill = resolve_dst_nodata(pix.dtype, cfg, resolve_src_nodata(cfg.fill_value, cfg))
                    fill = pix.dtype.type(0) if fill is None else fill  # as odc-loader fills
                    out = np.full((h, w) + pix.shape[2:], fill, dtype=pix.dtype)
                out[r0 : r0 + step, c0 : c0 + step][roi] = pix
        return (None if out is None else ((slice(0, h), slice(0, w)), out)), failed


class _NamedRioDriver(RioDriver):
    """odc-stac's rasterio driver with :class:`_NamedReader` readers.

    A read error in a Dask task becomes :class:`CorruptInput` naming the item, asset and
    href, or (``skip``) a warning and nodata for that read, reported to the
    :class:`SkippedReads` active when the driver was made (if any).
    """

    def __init__(self, on_bad_asset: str = "fail", part: int | None = None) -> None:
        super().__init__(md_parser=_AssetNames({}))
        self.skip = on_bad_asset == "skip"
        self.part = part
        self.tag = _COLLECTOR.get()

    def open(self, src, ctx):
        return _NamedReader(super().open(src, ctx), src, self.skip, self.part, self.tag)


def read_items(items: Sequence[pystac.Item], cfg: CubeConfig, *, part: int | None = None, **kw) -> xr.Dataset:
    """``odc.stac.load`` with reads that name the failing item, asset and href.

    GDAL reads with :data:`GDAL_CLOUD_OPTIONS` (:func:`configure_rio`), on the workers too.
    ``part``: with ``cube.on_bad_asset: skip``, the side (px of the destination grid) of the
    parts a failed chunk is read again in, so that only those that fail are left out. Called
    inside ``with SkippedReads(client)``, the reads left out are reported to it.
    """
    configure_rio()
    driver = _NamedRioDriver(cfg.on_bad_asset, part) if _StacMDParser is not None else None
    return odc.stac.load(list(items), fail_on_error=True, driver=driver, **kw)


class SkippedReads:
    """Collect the reads that ``cube.on_bad_asset: skip`` left out in a cube's Dask tasks.

    Damage that :func:`check_assets` did not read (a tile in the middle of a COG) is found
    only when the cube is computed, on the workers: the reader leaves those parts as nodata
    with an :class:`AgrilandWarning` there, and sends each such read as a Dask event
    (:data:`SKIPPED_READS_TOPIC`) tagged with this collector's id. Use it as a context
    manager around planning the cubes (:func:`read_items` takes the tag then) and computing
    them; :meth:`records` then gives one record per item and asset, with counts.

    Parameters
    ----------
    client : distributed.Client
        The client the cubes are computed with; its workers' events are received while the
        block is open.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.tag = uuid.uuid4().hex
        self._lock = threading.Lock()
        # (item, asset, href) -> [first error, {(top y, left x) of a read: parts left out}]
        self._found: dict[tuple[str, str, str], tuple[str, dict[tuple[float, float], int]]] = {}
        self._token: Any = None

    def __enter__(self) -> SkippedReads:
        self.client.subscribe_topic(SKIPPED_READS_TOPIC, self._on_event)
        self._token = _COLLECTOR.set(self.tag)
        return self

    def __exit__(self, *exc: object) -> None:
        _COLLECTOR.reset(self._token)
        try:
            self.client.unsubscribe_topic(SKIPPED_READS_TOPIC)
        except Exception as e:  # noqa: BLE001 - a closed client: nothing more can come
            log.debug("unsubscribing from %s: %s", SKIPPED_READS_TOPIC, e)

    def _on_event(self, event: Any) -> None:
        msg = event[1] if isinstance(event, (tuple, list)) and len(event) == 2 else event
        if not isinstance(msg, dict) or msg.get("tag") != self.tag:
            return  # another run's (a cluster shared by several runs)
        with self._lock:
            _, tops = self._found.setdefault(
                (msg["item"], msg["asset"], msg["href"]), (str(msg["error"]), {})
            )
            corner = (float(msg["top"]), float(msg.get("left", "nan")))
            tops[corner] = tops.get(corner, 0) + int(msg["chunks"])

    def records(
        self,
        cubes: Mapping[str, xr.Dataset],
        reused: Mapping[str, set[int]],
        earlier: Sequence[dict[str, Any]] = (),
        block_of: Callable[[str, int, int], int] | None = None,
    ) -> list[dict[str, Any]]:
        """Return one record per zone, item and asset with parts left out, for ``inputs.skipped_assets``.

        Each record holds ``item``, ``asset``, ``href``, ``problem`` (:data:`READ_SKIPPED`),
        ``error`` (the first read's), ``zone``, ``chunks`` (parts of the cube's stored chunk
        size left as nodata) and ``blocks`` (``{block number: chunks}``, the blocks of
        :meth:`~agriland_scale.store.resume.Products.write_blocks`): a few numbers an
        asset, whatever the size of the region.

        Parameters
        ----------
        cubes : mapping of str to xarray.Dataset
            The zones' cubes (zone name -> cube, with its ``items`` attribute and chunks).
        reused : mapping of str to set of int
            Per zone, the blocks an earlier attempt wrote (reused, not computed now): their
            counts come from ``earlier``, and reads of them now (neighbours of computed
            blocks) are not counted again.
        earlier : sequence of dict
            The records of an earlier attempt (run.json); other problems are ignored.
        block_of : callable, optional
            ``block_of(zone, row, col)``: the number of the block that holds the cube's pixel
            ``(row, col)``; by default the index of the chunk of rows that holds ``row``.

        Returns
        -------
        list of dict
            Sorted by zone, item and asset.
        """
        out: dict[tuple[str, str, str, str], dict[str, Any]] = {}

        def entry(zone: str, item: str, asset: str, href: str, error: str) -> dict[str, int]:
            rec = out.setdefault(
                (zone, item, asset, href),
                {
                    "item": item,
                    "asset": asset,
                    "href": href,
                    "problem": READ_SKIPPED,
                    "error": error,
                    "zone": zone,
                    "chunks": 0,
                    "blocks": {},
                },
            )
            return rec["blocks"]

        for e in earlier:
            if e.get("problem") != READ_SKIPPED:
                continue
            keep = {
                str(b): int(n)
                for b, n in (e.get("blocks") or {}).items()
                if int(b) in reused.get(str(e.get("zone")), set())
            }
            if keep:
                entry(e["zone"], e["item"], e["asset"], e["href"], e["error"]).update(keep)
        zone_of = {str(i): name for name, cube in cubes.items() for i in cube.attrs.get("items", [])}
        with self._lock:
            found = {k: (err, dict(tops)) for k, (err, tops) in self._found.items()}
        for (item, asset, href), (error, tops) in found.items():
            zone = zone_of.get(item)
            if zone is None:
                continue
            cube = cubes[zone]
            t = cube.rio.transform()
            ends = np.cumsum(cube.chunks["y"])
            for (top, left), n in tops.items():
                row = int(np.clip(round((top - t.f) / t.e), 0, cube.sizes["y"] - 1))
                col = 0 if np.isnan(left) else int(np.clip(round((left - t.c) / t.a), 0, cube.sizes["x"] - 1))
                if block_of is not None:
                    block = block_of(zone, row, col)
                else:
                    block = int(np.searchsorted(ends, row, side="right"))
                if block in reused.get(zone, set()):
                    continue
                blocks = entry(zone, item, asset, href, error)
                blocks[str(block)] = blocks.get(str(block), 0) + n
        for rec in out.values():
            rec["blocks"] = dict(sorted(rec["blocks"].items(), key=lambda kv: int(kv[0])))
            rec["chunks"] = sum(rec["blocks"].values())
        return [out[k] for k in sorted(out)]
