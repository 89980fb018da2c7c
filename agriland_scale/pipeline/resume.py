"""Resumable products that are never visible half-written, on a transactional Zarr store.

A product is one group of the run's store (:mod:`agriland_scale.store`: an Icechunk
repository, ``OUT/agriland.icechunk`` or a bucket prefix). Readers open the branch ``main``,
which only ever points at snapshots where every product is complete. A product is built on
a second branch, ``wip``, started at ``main``'s tip:

1. its metadata (arrays, coordinates, attributes) is committed first, with the product's
   signature (variables, shapes, chunks, the settings its blocks depend on);
2. its blocks (a block is one Dask chunk along one dimension: a row of cube chunks, a batch
   of patches) are written by the Dask workers, each into a fork of the session
   (:meth:`icechunk.Session.fork`); the client merges the forks as they come back and
   commits them every few seconds, naming the blocks in the commit's metadata;
3. the commit of the last blocks marks the product complete, and ``main`` is moved to it
   (a fast-forward: ``wip`` descends from ``main``), so readers see the whole product at
   once.

After a crash or a kill the next attempt walks ``wip``'s commits since ``main``'s tip: with
the same signature it writes only the blocks no commit names (a block that a worker wrote
but no commit recorded is written again, whole, at the same place; its first copy is an
unreferenced object that the engine's garbage collection can remove). Any other signature
starts the product over from ``main``'s tip. Every move of ``main`` is one version:
:func:`agriland_scale.store.history` lists them and ``open_run(OUT, version=...)`` reads one.

One process writes a run at a time (the run lock); the engine's commits are atomic on local
disk and on object storage alike, which is what makes the same code serve both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import icechunk
import numpy as np
import xarray as xr
import zarr

from agriland_scale.errors import BlockFailed, RunLocked
from agriland_scale.store import has_group, main_version, open_repo, store_location, with_checksums

__all__ = ["WIP", "Products"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

# the branch products are built on before ``main`` is moved to them
WIP = "wip"


def _signature(ds: xr.Dataset, dim: str, settings: dict[str, Any] | None) -> str:
    """Hash what a product's blocks depend on: variables, shapes, dtypes, chunks and settings."""
    sig = {
        "dim": dim,
        "vars": {
            name: {
                "dims": list(v.dims),
                "shape": list(v.shape),
                "dtype": str(v.dtype),
                "chunks": [list(c) for c in v.chunks] if v.chunks else None,
            }
            for name, v in sorted(ds.variables.items())
        },
        "settings": json.loads(json.dumps(settings, default=str)) if settings is not None else None,
    }
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:32]


def _write_block(
    fork: Any,
    group: str,
    dim: str,
    start: int,
    stop: int,
    shell: xr.Dataset,
    parts: dict[str, tuple[tuple[str, ...], list, dict, dict]],
) -> Any:
    """Write one block into ``fork`` (runs on a worker) and return the fork.

    ``shell`` is the block's coordinates; ``parts`` gives each data variable as its dims, its
    computed Dask chunks (nested lists that :func:`numpy.block` joins), attributes and encoding
    (see :func:`_block_parts`). xarray encodes the block as it encoded the product's metadata
    (CF scale factors, fill values, dtypes), except for a variable that is already packed
    (:func:`_is_packed`): its values are written as they are.
    """
    packed = {name for name, (_, _, attrs, _) in parts.items() if _is_packed(attrs)}
    block = shell.assign(
        {
            name: xr.Variable(dims, np.block(chunks), attrs, encoding)
            for name, (dims, chunks, attrs, encoding) in parts.items()
            if name not in packed
        }
    )
    if block.data_vars:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
            block.to_zarr(
                fork.store, group=group, region={dim: slice(start, stop)}, mode="r+", consolidated=False
            )
    for name in sorted(packed):
        dims, chunks, _, _ = parts[name]
        arr = zarr.open_array(fork.store, path=f"{group}/{name}", mode="r+")
        arr[tuple(slice(start, stop) if d == dim else slice(None) for d in dims)] = np.block(chunks)
    return fork


def _is_packed(attrs: dict[str, Any]) -> bool:
    """Tell whether a variable's values are already CF-packed integers.

    Their CF ``scale_factor`` / ``add_offset`` are attributes (as ``decode_cf=False`` shows
    them, e.g. :func:`~agriland_scale.cube.load.load_cube` with ``encoded=True``), not
    xarray encoding: xarray writes such a variable whole as it is, but refuses to write a
    region of it, where it would pack the store's values again.
    """
    return "scale_factor" in attrs or "add_offset" in attrs


def _block_parts(
    ds: xr.Dataset, dim: str, edges: np.ndarray, blocks: list[int]
) -> list[tuple[xr.Dataset, dict]]:
    """Split ``ds`` into the arguments of :func:`_write_block` for each of ``blocks``.

    The graph is optimised once for every block together and each block's tasks refer to its
    chunks by their keys, so that a task that several blocks need (a U-Net window reaching
    two blocks, a cloud mask's dilated neighbourhood) runs once. Handing each block's
    Dataset to a task instead would give every block its own renamed copy of the whole graph
    (``dask.delayed`` finalises each collection apart), and run the shared tasks per block.
    """
    import dask

    (ds,) = dask.optimize(ds)
    lazy = {name: v.variable for name, v in ds.data_vars.items() if v.chunks is not None}
    chunks = {name: v.data.to_delayed(optimize_graph=False) for name, v in lazy.items()}
    coords = ds.drop_vars(list(lazy))
    return [
        (
            coords.isel({dim: slice(int(edges[i]), int(edges[i + 1]))}),
            {
                name: (
                    v.dims,
                    np.take(chunks[name], [i], axis=v.dims.index(dim)).tolist(),
                    v.attrs,
                    v.encoding,
                )
                for name, v in lazy.items()
            },
        )
        for i in blocks
    ]


class Products:
    """The products of one run, in its Icechunk store (see the module doc).

    Parameters
    ----------
    out : str or Path
        The run's ``--out`` (folder or object-storage URL).
    storage_options : dict, optional
        Credentials and endpoint for object storage (:func:`agriland_scale.store.repo_storage`).
    commit_every_s : float
        Seconds between commits of finished blocks: what a kill can lose at most.

    Raises
    ------
    CorruptInput
        The store is there but damaged (its branch ``main``'s ref or snapshot cannot be read):
        the message names the versions that still open and how to recover. Raised before
        anything is read or written, so that no stage is taken as missing or failed.
    """

    def __init__(
        self, out: str | Path, storage_options: dict[str, Any] | None = None, *, commit_every_s: float = 5.0
    ):
        self.location = store_location(out)
        self.repo = open_repo(self.location, create=True, storage_options=storage_options)
        main_version(self.repo, self.location, storage_options)
        self.commit_every_s = commit_every_s
        self._reader: tuple[str, Any] | None = None
        self._base: str | None = None  # main's tip when the product being written was started
        self.commits = 0
        self.commit_seconds = 0.0

    # -- reading -----------------------------------------------------------------------
    def reader(self) -> Any:
        """Return a read-only store at ``main``'s tip (the complete products); it pickles to tasks."""
        tip = self.repo.lookup_branch("main")
        if self._reader is None or self._reader[0] != tip:
            self._reader = (tip, self.repo.readonly_session(snapshot_id=tip).store)
        return self._reader[1]

    def exists(self, group: str) -> bool:
        """Tell whether ``group`` is complete in the run's store (on ``main``)."""
        return has_group(self.reader(), group)

    # -- the wip branch ------------------------------------------------------------------
    def _fresh_session(self) -> icechunk.Session:
        """Open a writable session on ``wip``, reset to ``main``'s tip (unfinished work dropped)."""
        main = self.repo.lookup_branch("main")
        if WIP in self.repo.list_branches():
            self.repo.reset_branch(WIP, main)
        else:
            self.repo.create_branch(WIP, main)
        self._base = main
        return self.repo.writable_session(WIP)

    def _since_main(self) -> Iterator[dict[str, Any]]:
        """Yield the metadata of ``wip``'s commits since ``main``'s tip, newest first.

        Nothing when there is no ``wip``; when ``wip`` does not descend from ``main``'s tip,
        every commit of ``wip`` (which then holds no start of a product on this ``main``).
        """
        if WIP not in self.repo.list_branches():
            return
        main = self.repo.lookup_branch("main")
        for c in self.repo.ancestry(branch=WIP):
            if c.id == main:
                return
            yield dict(c.metadata)

    def _pending(self, group: str, sig: str) -> tuple[set[int], bool] | None:
        """Blocks of ``group`` committed on ``wip`` since ``main``'s tip by an attempt with ``sig``.

        Returns ``(blocks, complete)``, or None when ``wip`` holds no such attempt.
        """
        main = self.repo.lookup_branch("main")
        blocks: set[int] = set()
        complete = False
        for m in self._since_main():
            if m.get("group") != group or m.get("signature") != sig:
                return None  # another product's or another attempt's work: start over
            blocks.update(int(b) for b in m.get("blocks") or [])
            complete = complete or bool(m.get("complete"))
            if m.get("kind") == "start":
                self._base = main
                return blocks, complete
        return None  # wip does not descend from main's tip, or holds no start of this product

    def pending_blocks(self, group: str) -> set[int]:
        """Return the blocks of an unfinished ``group`` that commits on ``wip`` hold (any attempt)."""
        return {int(b) for m in self._since_main() if m.get("group") == group for b in m.get("blocks") or []}

    def _commit(self, session: icechunk.Session, message: str, **metadata: Any) -> str:
        t0 = time.perf_counter()
        snap = session.commit(message, metadata=metadata)
        self.commits += 1
        self.commit_seconds += time.perf_counter() - t0
        return snap

    def _publish(self, group: str, message: str) -> None:
        """Move ``main`` to ``wip``'s tip, which completes ``group`` (a fast-forward).

        Only while ``main`` is where it was when the product was started: a ``main`` that moved
        in between means another process wrote this run (it should hold the run's lock), and
        its version is kept, not overwritten.

        Raises
        ------
        RunLocked
            ``main`` moved while this product was written.
        """
        tip = self.repo.lookup_branch(WIP)
        try:
            self.repo.reset_branch("main", tip, from_snapshot_id=self._base)
        except Exception as e:  # noqa: BLE001 - the engine's conflict, said in the run's words
            now = self.repo.lookup_branch("main")
            if now == self._base:
                raise
            raise RunLocked(
                f"{self.location}: another process changed the products while this one wrote '{group}' "
                f"(version {now}, expected {self._base}); its version is kept and '{group}' is not "
                "published. One process writes a run at a time: check what else writes there, then run "
                f"again ({type(e).__name__})"
            ) from None
        self._base = tip
        log.info("%s: %s (version %s)", group, message, tip)

    def tag_run(self, attempt: int) -> str:
        """Name ``main``'s tip ``run-YYYYMMDDTHHMMSSZ`` (a finished run's products); returns the tag."""
        tag = time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())
        tip = self.repo.lookup_branch("main")
        if tag not in self.repo.list_tags():
            self.repo.create_tag(tag, tip)
        log.info("products of attempt %d: version %s, tag %s", attempt, tip, tag)
        return tag

    # -- writing -------------------------------------------------------------------------
    def discard(self, group: str) -> None:
        """Remove ``group`` from the products (to redo it); earlier versions keep it."""
        if not self.exists(group):
            return
        session = self._fresh_session()
        root = zarr.open_group(session.store, mode="r+")
        del root[group]
        self._commit(session, f"remove {group}", group=group, kind="remove", complete=True)
        self._publish(group, "removed")

    def write(self, ds: xr.Dataset, group: str) -> None:
        """Write a small product at once (computed in this process), then publish it.

        Every array is stored with a CRC32C checksum (:func:`~agriland_scale.store.with_checksums`).
        """
        ds = with_checksums(ds.load())
        session = self._fresh_session()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
            ds.to_zarr(session.store, group=group, mode="w", zarr_format=3, consolidated=False)
        self._commit(session, f"write {group}", group=group, kind="write", complete=True)
        self._publish(group, "written")

    def write_blocks(
        self,
        ds: xr.Dataset,
        group: str,
        dim: str,
        client: Any,
        *,
        label: str | None = None,
        progress: Progress | None = None,
        settings: dict[str, Any] | None = None,
        workers: list[str] | None = None,
    ) -> dict[str, int]:
        """Write the dask-backed ``ds`` block by block along ``dim`` with ``client``, resumably.

        One block is one Dask chunk of ``dim`` (every variable must have the same chunks along
        it). Blocks committed by an earlier, interrupted attempt with the same signature
        (``settings``: the config values the blocks depend on) are not computed again. A
        failing block raises :class:`BlockFailed` naming the group and the block's index range;
        the blocks finished before it are committed first. ``workers``: the addresses of the
        workers that compute and write the blocks (all of their tasks); any worker by default.
        Every array is stored with a CRC32C checksum (:func:`~agriland_scale.store.with_checksums`).

        Returns
        -------
        dict
            ``{"blocks": n, "reused": blocks from an earlier attempt, "commits": commits made}``.
        """
        from distributed import as_completed

        label = label or group
        ds = with_checksums(ds)
        chunks = ds.chunks.get(dim)
        if chunks is None:
            raise ValueError(f"{group}: nothing in the dataset is chunked along '{dim}'")
        edges = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
        n = len(chunks)
        sig = _signature(ds, dim, settings)
        found = self._pending(group, sig)
        commits0 = self.commits
        if found is None:
            session = self._fresh_session()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
                ds.to_zarr(
                    session.store, group=group, mode="w", compute=False, zarr_format=3, consolidated=False
                )
            self._commit(
                session,
                f"start {group}: {n} blocks along {dim}",
                group=group,
                signature=sig,
                kind="start",
                blocks=[],
            )
            done: set[int] = set()
            complete = False
        else:
            done, complete = found
        reused = len(done)
        if reused:
            log.info("%s: %d of %d blocks already written by an earlier attempt", group, reused, n)
        if progress:
            progress(label, reused, n)
        todo = [] if complete else [i for i in range(n) if i not in done]
        session = self.repo.writable_session(WIP)
        if todo:
            self._write_todo(
                ds,
                group,
                dim,
                edges,
                todo,
                session,
                sig,
                client,
                label,
                progress,
                reused,
                n,
                as_completed,
                workers,
            )
        self._publish(group, f"complete ({n} blocks, {reused} from an earlier attempt)")
        return {"blocks": n, "reused": reused, "commits": self.commits - commits0}

    def _commit_or_skip(
        self, session: icechunk.Session, group: str, sig: str, blocks: list[int], *, complete: bool
    ) -> icechunk.Session:
        """Commit the merged ``blocks`` (if any change) and return a new session on ``wip``."""
        if session.has_uncommitted_changes:
            what = "complete" if complete else f"{len(blocks)} block(s)"
            self._commit(
                session,
                f"{group}: {what}",
                group=group,
                signature=sig,
                kind="blocks",
                blocks=sorted(blocks),
                complete=complete,
            )
            return self.repo.writable_session(WIP)
        return session

    def _write_todo(
        self,
        ds: xr.Dataset,
        group: str,
        dim: str,
        edges: np.ndarray,
        todo: list[int],
        session: icechunk.Session,
        sig: str,
        client: Any,
        label: str,
        progress: Progress | None,
        written: int,
        n: int,
        as_completed: Any,
        workers: list[str] | None = None,
    ) -> None:
        import dask

        along = ds.drop_vars([v for v in ds.variables if dim not in ds[v].dims])
        fork = session.fork()
        # named for the dashboard: "cube-block", "segmentation-block"... in the task stream
        stage = group.rstrip("/").rsplit("/", 1)[-1]
        tasks = [
            dask.delayed(_write_block, pure=False)(
                fork,
                group,
                dim,
                int(edges[i]),
                int(edges[i + 1]),
                shell,
                parts,
                dask_key_name=f"{stage}-block-{i}-{uuid.uuid4().hex[:12]}",
            )
            for i, (shell, parts) in zip(todo, _block_parts(along, dim, edges, todo))
        ]
        futures = client.compute(tasks, workers=workers)
        which = {f.key: i for f, i in zip(futures, todo)}
        merged: list[int] = []
        last = time.monotonic()
        try:
            for fut in as_completed(futures):
                i = which[fut.key]
                if fut.status == "error":
                    err = fut.exception()
                    for f in futures:
                        f.cancel()
                    self._commit_or_skip(session, group, sig, merged, complete=False)
                    raise BlockFailed(
                        f"{label}: block {i} ({dim} {edges[i]}:{edges[i + 1]}) failed: "
                        f"{type(err).__name__}: {err}. The {written} blocks written so far are kept: "
                        "fix the cause and run again to continue"
                    ) from err
                session.merge(fut.result())  # finished: the fork comes back at once
                merged.append(i)
                written += 1
                if progress:
                    progress(label, written, n)
                if written < n and time.monotonic() - last >= self.commit_every_s:
                    session = self._commit_or_skip(session, group, sig, merged, complete=False)
                    merged, last = [], time.monotonic()
        except KeyboardInterrupt:  # keep what is merged: the next attempt need not redo it
            self._commit_or_skip(session, group, sig, merged, complete=False)
            raise
        self._commit_or_skip(session, group, sig, merged, complete=True)
