"""The waves in which a write's blocks reach the scheduler: bounded, ordered, annotated.

:class:`Waves` hands the blocks of one or more products (:class:`Part`) to the Dask
scheduler a bounded wave at a time (:meth:`~agriland_scale.store.resume.Products.write_together`),
merges the forks that come back and commits them. Three things travel with each wave:

* **the order**: every task of a block gets the block's place in the write as its Dask
  ``priority`` (earlier blocks first, a task shared by several blocks takes the earliest), so
  the workers finish blocks in order instead of in whatever order :func:`dask.order.order`
  prefers. With a product written band by band (:meth:`~.blocks.BlockGrid.order`), the data
  that neighbouring blocks share is held for a band's width, not the region's;
* **the annotations** the product's graph was built with (:func:`dask.annotate`, e.g. the
  ``resources`` that keep model tasks on GPU workers), which a materialised graph drops;
* **the names**: write tasks are ``{stage}-block-…`` on the dashboard.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr
from dask._expr import LLGExpr

from agriland_scale.errors import BlockFailed
from agriland_scale.store.blocks import BlockGraph, BlockGrid

__all__ = ["Part", "Waves"]


class _Wave(LLGExpr):
    """A wave as a Dask expression: a low-level graph carrying per-key annotations.

    ``annotations``: ``{"priority": {key: p}, "resources": {key: {...}}, ...}``, applied by the
    scheduler to those keys only. Named, not hashed: dask would otherwise tokenize the whole
    wave to name it.
    """

    _parameters = ["dsk", "annotations"]

    def __dask_annotations__(self) -> dict[str, dict]:
        return self.operand("annotations")


@dataclass
class Part:
    """One product of a write (one zone's cube, say): its blocks are ``offset + i`` of the write."""

    ds: xr.Dataset
    group: str
    label: str
    grid: BlockGrid
    offset: int
    sig: str
    band: int | None = None  # write band by band (BlockGrid.order), else row by row
    reused: int = 0
    written: int = 0
    graph: BlockGraph | None = None

    @cached_property
    def rank(self) -> np.ndarray:
        """Each block's place in the product's write order (:meth:`BlockGrid.order`)."""
        rank = np.empty(len(self.grid), dtype=int)
        rank[self.grid.order(self.band)] = np.arange(len(self.grid))
        return rank

    @property
    def stage(self) -> str:
        """``cube`` for ``utm18n/cube``: how its tasks are named on the dashboard (``cube-block``)."""
        return self.group.rstrip("/").rsplit("/", 1)[-1]


class Waves:
    """Hands the blocks of one or more products to the scheduler in bounded waves.

    Each wave is planned from its own blocks' tasks (:meth:`BlockGraph.tasks`) and holds at
    most ``max_tasks`` tasks beyond the blocks running; a new wave follows as blocks finish.
    The forks that come back are merged into one session on ``wip`` and committed every
    ``products.commit_every_s`` seconds, naming the blocks (numbered over the whole write).
    """

    def __init__(
        self,
        products: Any,
        key: str,
        sig: str,
        parts: list[Part],
        client: Any,
        progress: Any,
        workers: list[str] | None,
    ):
        self.products, self.key, self.sig, self.parts = products, key, sig, parts
        self.client, self.progress, self.workers = client, progress, workers
        self.starts = [p.offset for p in parts]
        self._needs: dict[int, set] = {}  # a queued block's tasks, culled once (cost, then submit)
        self.order: dict[int, int] = {}  # block -> its priority: minus its place in the write

    def part(self, i: int) -> Part:
        """Return the product that block ``i`` of the write belongs to."""
        return self.parts[int(np.searchsorted(self.starts, i, side="right")) - 1]

    def _graph(self, p: Part, stats: dict[str, Any]) -> BlockGraph:
        if p.graph is None:
            t0 = time.process_time()
            p.graph = BlockGraph(p.ds, p.grid)
            stats["plan_s"] += time.process_time() - t0
        return p.graph

    def _cost(self, i: int, stats: dict[str, Any]) -> int:
        p = self.part(i)
        if i not in self._needs:
            self._needs[i] = self._graph(p, stats).needs(i - p.offset)
        return len(self._needs[i]) + 1

    def _submit(self, wave: list[int], fork: Any, stats: dict[str, Any]) -> list:
        t0 = time.process_time()
        dsk: dict = {}
        keys: list[str] = []
        priority: dict = {}  # every task at its earliest block's place in the write
        resources: dict = {}
        for p in self.parts:
            mine = [i for i in wave if self.part(i) is p]
            if mine:
                graph = self._graph(p, stats)
                needs = {i - p.offset: self._needs.pop(i) for i in mine if i in self._needs}
                for i in mine:
                    local = i - p.offset
                    if local not in needs:  # culled once: by _cost, else here
                        needs[local] = graph.needs(local)
                    for k in needs[local] | {graph.block_key(p.stage, local)}:
                        priority[k] = max(priority.get(k, self.order[i]), self.order[i])
                g, k, _ = graph.tasks([i - p.offset for i in mine], p.stage, fork, p.group, needs)
                dsk.update(g)
                keys += k
                annotated = graph.annotations.get("resources", {})
                resources.update((key, annotated[key]) for key in g if key in annotated)
        annotations = {"priority": priority, **({"resources": resources} if resources else {})}
        stats["plan_s"] += time.process_time() - t0
        stats["tasks"] += len(dsk)
        stats["waves"] += 1
        return self.client.get(
            _Wave(dsk, annotations, _determ_token=uuid.uuid4().hex), keys, sync=False, workers=self.workers
        )

    def run(self, todo: list[int], written: int, max_tasks: int, stats: dict[str, Any]) -> None:
        """Write blocks ``todo`` of the write; ``written``: those an earlier attempt committed."""
        from distributed import as_completed

        products = self.products
        session = products.repo.writable_session("wip")
        fork = session.fork()
        # the products advance together: their blocks interleaved by their place in each
        # product's order (row by row, or band by band); a block's tasks get its place as
        # their priority (earlier first), so that the blocks also finish in that order
        queue = sorted(
            todo, key=lambda i: (self.part(i).rank[i - self.part(i).offset] / len(self.part(i).grid), i)
        )
        self.order = {i: -place for place, i in enumerate(queue)}
        which: dict[str, tuple[int, int]] = {}  # future key -> (block, its tasks)
        in_flight: dict[str, Any] = {}
        pending = as_completed()
        load = 0

        def fill() -> None:
            nonlocal load
            wave: list[int] = []
            costs: list[int] = []
            while queue:
                c = self._cost(queue[0], stats)
                if load + sum(costs) + c > max_tasks and (wave or in_flight):
                    break
                wave.append(queue.pop(0))
                costs.append(c)
            if wave:
                for i, c, f in zip(wave, costs, self._submit(wave, fork, stats)):
                    which[f.key] = (i, c)
                    in_flight[f.key] = f
                    pending.add(f)
                load += sum(costs)

        merged: list[int] = []
        last = time.monotonic()
        n = sum(len(p.grid) for p in self.parts)
        fill()
        try:
            for fut in pending:
                i, c = which.pop(fut.key)
                in_flight.pop(fut.key, None)
                load -= c
                p = self.part(i)
                if fut.status == "error":
                    err = fut.exception()
                    for f in in_flight.values():
                        f.cancel()
                    products.commit_blocks(session, self.key, self.sig, merged, complete=False)
                    assert p.graph is not None
                    raise BlockFailed(
                        f"{p.label}: block {i - p.offset} ({p.graph.grid.describe(i - p.offset)}) failed: "
                        f"{type(err).__name__}: {err}. The {written} blocks written so far are kept: "
                        "fix the cause and run again to continue"
                    ) from err
                session.merge(fut.result())  # finished: the fork comes back at once
                fut.release()
                merged.append(i)
                written += 1
                p.written += 1
                if self.progress:
                    self.progress(p.label, p.written, len(p.grid))
                if written < n and time.monotonic() - last >= products.commit_every_s:
                    session = products.commit_blocks(session, self.key, self.sig, merged, complete=False)
                    merged, last = [], time.monotonic()
                fill()
        except KeyboardInterrupt:  # keep what is merged: the next attempt need not redo it
            products.commit_blocks(session, self.key, self.sig, merged, complete=False)
            raise
        products.commit_blocks(session, self.key, self.sig, merged, complete=True)
