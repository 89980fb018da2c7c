"""Reading the items' assets with odc-stac, every failure naming the item, band and file.

:func:`read_items` is ``odc.stac.load`` with a reader that names the item and href of a
block that fails to read. With ``cube.on_bad_asset: skip``, :class:`SkippedReads` collects,
from the Dask workers, the reads that reader left out, for the run's record.
"""

from __future__ import annotations

import logging
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import numpy as np
import odc.stac
import pystac
import rasterio
import xarray as xr
from odc.loader import RioDriver

from agriland_scale.config.schema import CubeConfig
from agriland_scale.cube.assets import READ_SKIPPED, _read_error_text, configure_rio
from agriland_scale.errors import AgrilandWarning, CorruptInput

_StacMDParser: type | None
try:  # the parser odc.stac.load uses by default (private: without it, failed reads are unnamed)
    from odc.stac._mdtools import StacMDParser as _Parser

    _StacMDParser = _Parser
except ImportError:  # pragma: no cover
    _StacMDParser = None

__all__ = ["READ_SKIPPED", "SKIPPED_READS_TOPIC", "SkippedReads", "read_items"]

log = logging.getLogger(__name__)


# -- named reads in the cube's tasks -----------------------------------------------------------
_READ_ERRORS = (rasterio.errors.RasterioError, rasterio.errors.WindowEvaluationError)

# the Dask event topic of the reads left out with ``skip`` (their records' ``problem`` is READ_SKIPPED)
SKIPPED_READS_TOPIC = "agriland-skipped-reads"
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
