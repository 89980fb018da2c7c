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
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import icechunk
import xarray as xr
import zarr

from agriland_scale.errors import RunLocked
from agriland_scale.store.blocks import BlockGrid, signature, template
from agriland_scale.store.groups import has_group, main_version, open_repo, store_location, with_checksums
from agriland_scale.store.waves import Part, Waves

__all__ = ["WIP", "WAVE_TASKS", "Products"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

# the branch products are built on before ``main`` is moved to them
WIP = "wip"

# tasks handed to the scheduler at a time beyond the blocks running (about 10 KB each there)
WAVE_TASKS = 20_000


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
        """Return the blocks of an unfinished ``group`` that commits on ``wip`` hold (any attempt).

        For a product written together with others (:meth:`write_together`), its share of
        their commits' blocks, numbered as its own.
        """
        commits = list(self._since_main())
        out = {int(b) for m in commits if m.get("group") == group for b in m.get("blocks") or []}
        for start in commits:
            lo, n = (start.get("parts") or {}).get(group, (0, 0))
            if start.get("kind") == "start" and n:
                key = start.get("group")
                out |= {
                    int(b) - lo
                    for m in commits
                    if m.get("group") == key
                    for b in m.get("blocks") or []
                    if lo <= int(b) < lo + n
                }
        return out

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
        dims: str | tuple[str, ...],
        client: Any,
        *,
        block: int | None = None,
        label: str | None = None,
        progress: Progress | None = None,
        settings: dict[str, Any] | None = None,
        workers: list[str] | None = None,
        max_tasks: int | None = None,
        band: int | None = None,
    ) -> dict[str, Any]:
        """Write the dask-backed ``ds`` block by block with ``client``, resumably.

        ``dims``: the block dimensions (``("y", "x")`` for a raster, ``"patch"`` for a table);
        every dask-backed variable along one of them must have the same chunks along all of
        them. A block groups consecutive chunks up to ``block`` elements along each
        (:mod:`.blocks`: a square of at most ``block`` x ``block`` px whatever the region's
        width); ``block=None``: one chunk. Blocks committed by an earlier, interrupted attempt
        with the same signature (``settings``: the config values the blocks depend on) are not
        computed again. The scheduler is handed a wave of blocks at a time, at most
        ``max_tasks`` tasks (:data:`WAVE_TASKS`) beside the blocks already running, each wave
        planned at the cost of its own tasks. A failing block raises :class:`BlockFailed`
        naming the group and the block's place; the blocks finished before it are committed
        first. ``workers``: the addresses of the workers that compute and write the blocks
        (all of their tasks); any worker by default. Every array is stored with a CRC32C
        checksum (:func:`~agriland_scale.store.with_checksums`). The blocks are written row by
        row, or band by band with ``band`` (px, :meth:`~.blocks.BlockGrid.order`): every task
        of a block has the block's place as its priority (:mod:`.waves`).

        Returns
        -------
        dict
            ``{"blocks": n, "reused": blocks from an earlier attempt, "commits": commits made,
            "tasks": tasks planned, "waves": graphs handed to the scheduler, "plan_s": client
            CPU seconds spent planning}``.
        """
        return self.write_together(
            [(ds, group, label or group)],
            dims,
            client,
            block=block,
            progress=progress,
            settings=settings,
            workers=workers,
            max_tasks=max_tasks,
            band=band,
        )[group]

    def write_together(
        self,
        products: Sequence[tuple[xr.Dataset, str, str]],
        dims: str | tuple[str, ...],
        client: Any,
        *,
        block: int | None = None,
        progress: Progress | None = None,
        settings: dict[str, Any] | None = None,
        workers: list[str] | None = None,
        max_tasks: int | None = None,
        band: int | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Write several products together, e.g. a stage's UTM zones: ``[(ds, group, label)]``.

        As :meth:`write_blocks` for each, except that their blocks share the waves handed to the
        scheduler (interleaved, so that every zone advances while the cluster has room for
        them all), their commits and their publication: ``main`` moves once, when every one is
        complete. Returns :meth:`write_blocks`'s statistics per group (``tasks``, ``waves``,
        ``plan_s`` and ``commits`` are those of the whole write).
        """
        if not products:
            return {}
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        parts: list[Part] = []
        offset = 0
        for ds, group, label in products:
            ds = with_checksums(ds)
            try:
                grid = BlockGrid.of(ds, dims, block)
            except ValueError as e:
                raise ValueError(f"{group}: {e}") from None
            parts.append(Part(ds, group, label, grid, offset, signature(ds, dims, block, settings), band))
            offset += len(grid)
        n = offset
        key = "+".join(p.group for p in parts)
        sig = parts[0].sig if len(parts) == 1 else _combined([p.sig for p in parts])
        found = self._pending(key, sig)
        commits0 = self.commits
        if found is None:
            session = self._fresh_session()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
                for p in parts:
                    template(p.ds).to_zarr(
                        session.store,
                        group=p.group,
                        mode="w",
                        compute=False,
                        zarr_format=3,
                        consolidated=False,
                    )
            extra = {"parts": {q.group: [q.offset, len(q.grid)] for q in parts}} if len(parts) > 1 else {}
            self._commit(
                session,
                f"start {key}: {n} blocks along {', '.join(dims)}",
                group=key,
                signature=sig,
                kind="start",
                blocks=[],
                **extra,
            )
            done: set[int] = set()
            complete = False
        else:
            done, complete = found
        for p in parts:
            p.written = p.reused = sum(1 for i in done if p.offset <= i < p.offset + len(p.grid))
            if p.reused:
                log.info(
                    "%s: %d of %d blocks already written by an earlier attempt",
                    p.group,
                    p.reused,
                    len(p.grid),
                )
            if progress:
                progress(p.label, p.reused, len(p.grid))
        todo = [] if complete else [i for i in range(n) if i not in done]
        stats: dict[str, Any] = {"tasks": 0, "waves": 0, "plan_s": 0.0}
        if todo:
            waves = Waves(self, key, sig, parts, client, progress, workers)
            waves.run(todo, len(done), max_tasks or WAVE_TASKS, stats)
        self._publish(key, f"complete ({n} blocks, {len(done)} from an earlier attempt)")
        stats["commits"] = self.commits - commits0
        stats["plan_s"] = round(stats["plan_s"], 3)
        return {p.group: {"blocks": len(p.grid), "reused": p.reused, **stats} for p in parts}

    def commit_blocks(
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


def _combined(sigs: list[str]) -> str:
    """One signature for products written together (their own, in order)."""
    return hashlib.sha256("+".join(sigs).encode()).hexdigest()[:32]
