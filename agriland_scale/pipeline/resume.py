"""Resumable products that are never visible half-written.

A product is one group of the run's Zarr store (``OUT/agriland.zarr/<group>``). It is built
in a staging store ``OUT/.partial/agriland.zarr/<group>``, block by block (a block is a run
of Dask chunks along one dimension: a row of cube chunks, a batch of patches); every block
written is appended to a journal ``OUT/.partial/<group>.blocks`` (one JSON line). When every
block is in, the group directory is moved into the run's store with one ``rename`` on the
same file system, so ``xarray.open_zarr`` never sees a product that is not complete.

After a crash or a kill the next run finds the staging group and its journal and writes only
the missing blocks: a block either is in the journal (its chunks are on disk) or is written
again, whole, at the same place; nothing is duplicated. The journal starts with a signature
(variables, shapes, chunks); a staging group whose signature differs is discarded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.errors import BlockFailed
from agriland_scale.layout import PARTIAL_DIR, STORE
from agriland_scale.store import consolidate

__all__ = ["Products"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def _signature(ds: xr.Dataset, dim: str) -> dict[str, Any]:
    return {"dim": dim, "vars": {name: {"dims": list(v.dims), "shape": list(v.shape), "dtype": str(v.dtype),
                                        "chunks": [list(c) for c in v.chunks] if v.chunks else None}
                                 for name, v in sorted(ds.variables.items())}}


class Products:
    """The products of one run folder ``out`` (see the module doc)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.store = self.out / STORE
        self.staging = self.out / PARTIAL_DIR / STORE

    def exists(self, group: str) -> bool:
        """Tell whether ``group`` is complete in the run's store."""
        return (self.store / group / "zarr.json").exists()

    def _journal(self, group: str) -> Path:
        return self.out / ".partial" / (group.replace("/", "__") + ".blocks")

    def discard(self, group: str) -> None:
        """Remove ``group`` from the store and from staging (to redo it).

        The store's consolidated metadata is rewritten without it, so that no reader opens
        the removed product from a stale listing (its arrays would read as fill values).
        """
        existed = (self.store / group).exists()
        for p in (self.store / group, self.staging / group):
            shutil.rmtree(p, ignore_errors=True)
        self._journal(group).unlink(missing_ok=True)
        if existed:
            self._reconsolidate()

    def _reconsolidate(self) -> None:
        """Keep the root's consolidated metadata equal to the store.

        It is rewritten when the root carries one (the publish stage consolidates; stages
        that change a group later must not leave a listing that disagrees with the groups on
        disk).
        """
        root = self.store / "zarr.json"
        try:
            meta = json.loads(root.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if meta.get("consolidated_metadata"):
            consolidate(self.store)

    def _publish(self, group: str) -> None:
        import zarr

        parent = str(Path(group).parent)
        zarr.open_group(str(self.store), mode="a", zarr_format=3)  # the root group
        if parent != ".":
            zarr.open_group(str(self.store), path=parent, mode="a", zarr_format=3)
        dest = self.store / group
        old = self.out / ".partial" / ("replaced__" + group.replace("/", "__"))
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():  # moved aside, not deleted in place: no reader sees it half-removed
            os.replace(dest, old)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.staging / group, dest)
        shutil.rmtree(old, ignore_errors=True)
        self._journal(group).unlink(missing_ok=True)
        self._reconsolidate()

    def write(self, ds: xr.Dataset, group: str) -> None:
        """Write a small product at once (computed by the active Dask client), then publish it."""
        shutil.rmtree(self.staging / group, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
            ds.to_zarr(str(self.staging), group=group, mode="w", zarr_format=3, consolidated=False)
        self._publish(group)

    def staged(self, group: str) -> Path:
        """Return a fresh staging folder for a product written by other code (then :meth:`publish`)."""
        shutil.rmtree(self.staging / group, ignore_errors=True)
        (self.staging / group).parent.mkdir(parents=True, exist_ok=True)
        return self.staging / group

    def publish(self, group: str) -> None:
        """Move a staged product (see :meth:`staged`) into the run's store."""
        self._publish(group)

    def write_blocks(self, ds: xr.Dataset, group: str, dim: str, client, *, label: str | None = None,
                     progress: Progress | None = None, settings: dict[str, Any] | None = None
                     ) -> dict[str, int]:
        """Write the dask-backed ``ds`` block by block along ``dim`` with ``client``, resumably.

        One block is one Dask chunk of ``dim`` (every variable must have the same chunks
        along it). Blocks listed in the journal of an earlier, interrupted attempt are not
        computed again. A failing block raises :class:`BlockFailed` naming the group and the
        block's index range. ``settings`` (the config values the blocks depend on) are part of
        the journal's signature: blocks of an attempt made with other settings are not reused. Returns ``{"blocks": n, "reused": blocks_from_earlier_attempt}``.
        """
        from distributed import as_completed

        label = label or group
        chunks = ds.chunks.get(dim)
        if chunks is None:
            raise ValueError(f"{group}: nothing in the dataset is chunked along '{dim}'")
        edges = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
        sig = _signature(ds, dim)
        if settings is not None:  # the config the blocks were computed with: other settings, new blocks
            sig["settings"] = json.loads(json.dumps(settings, default=str))
        journal = self._journal(group)
        done: set[int] = set()
        if journal.exists() and (self.staging / group / "zarr.json").exists():
            lines = journal.read_text().splitlines()
            try:
                same = bool(lines) and json.loads(lines[0]) == sig
            except json.JSONDecodeError:
                same = False
            if same:
                for line in lines[1:]:
                    try:  # a line cut by a kill is simply not done
                        done.add(int(json.loads(line)["block"]))
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        pass
        if not done:
            shutil.rmtree(self.staging / group, ignore_errors=True)
            journal.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
                ds.to_zarr(str(self.staging), group=group, mode="w", compute=False, zarr_format=3,
                           consolidated=False)
            journal.write_text(json.dumps(sig) + "\n")
        n = len(chunks)
        todo = [i for i in range(n) if i not in done]
        reused = n - len(todo)
        if reused:
            log.info("%s: %d of %d blocks already written by an earlier attempt", group, reused, n)
        if progress:
            progress(label, reused, n)
        along = ds.drop_vars([v for v in ds.variables if dim not in ds[v].dims])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
            parts = [along.isel({dim: slice(edges[i], edges[i + 1])}).to_zarr(
                str(self.staging), group=group, region={dim: slice(edges[i], edges[i + 1])},
                compute=False, consolidated=False) for i in todo]
        futures = client.compute(parts) if parts else []
        which = {f.key: i for f, i in zip(futures, todo)}
        written = reused
        with journal.open("a") as jf:
            for fut in as_completed(futures):
                i = which[fut.key]
                if fut.status == "error":
                    err = fut.exception()
                    for f in futures:
                        f.cancel()
                    raise BlockFailed(
                        f"{label}: block {i} ({dim} {edges[i]}:{edges[i + 1]}) failed: "
                        f"{type(err).__name__}: {err}. The {written} blocks written so far are kept: "
                        "fix the cause and run again to continue") from err
                jf.write(json.dumps({"block": i}) + "\n")
                jf.flush()
                written += 1
                if progress:
                    progress(label, written, n)
        self._publish(group)
        return {"blocks": n, "reused": reused}
