"""Write units of bounded size, and their tasks planned at the cost of their own graph.

A product written by :meth:`~agriland_scale.store.resume.Products.write_blocks` is cut
into **blocks**: along each block dimension (``("y", "x")`` for a raster, ``("patch",)`` for
a table of patches) consecutive Dask chunks are grouped until the next one would pass
``block`` elements (a chunk larger than ``block`` is a block of its own). A raster block is
therefore a square of at most ``block`` x ``block`` px (``runtime.block_px``, 2048 by default:
32 MB of a 4-band int16 cube), whatever the region's width, and blocks are numbered in row-major order.

The product's task graph is optimised and materialised **once** (:class:`BlockGraph`, cost
linear in the graph). The tasks of any set of blocks are then culled from it by walking the
dependencies back from the blocks' chunks, which costs what those blocks' own tasks cost, never
a pass over the whole graph. That is what lets the writer hand the scheduler a bounded wave
of blocks at a time (:func:`~agriland_scale.store.resume.Products.write_blocks`): the
scheduler holds a few thousand tasks, not the region's million.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr

__all__ = ["BlockGraph", "BlockGrid", "signature", "template", "write_block"]


def signature(
    ds: xr.Dataset, dims: tuple[str, ...], block: int | None, settings: dict[str, Any] | None
) -> str:
    """Hash what a product's blocks depend on: variables, shapes, dtypes, chunks, block layout, settings."""
    sig = {
        "dim": dims[0] if len(dims) == 1 and block is None else list(dims),
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
    if block is not None:
        sig["block"] = block
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:32]


def template(ds: xr.Dataset) -> xr.Dataset:
    """Return ``ds`` with each dask array replaced by one lazy chunk of zeros, stored chunks kept.

    What ``to_zarr(compute=False)`` needs to write a product's metadata (attributes,
    encoding, numpy-backed coordinates, the Zarr chunks of each array: the dask chunks, as
    xarray would choose them, put in the encoding) without planning a task a chunk: the
    product's own graph costs as much as planning its write (1 s CPU for a 9,801-task
    segmentation), a store task a chunk still O(chunks); one task a variable costs nothing.
    """
    import dask.array as da

    out = {}
    for n, v in ds.data_vars.items():
        if v.chunks is None:
            continue
        enc = dict(v.encoding)
        enc.setdefault("chunks", tuple(int(c[0]) for c in v.chunks))
        out[n] = xr.Variable(v.dims, da.zeros(v.shape, chunks=v.shape or (), dtype=v.dtype), v.attrs, enc)
    return ds.assign(out)


def group_chunks(chunks: tuple[int, ...], block: int | None) -> list[tuple[int, int, int, int]]:
    """Group consecutive chunks of one dimension into blocks of at most ``block`` elements.

    Returns ``(first chunk, last chunk + 1, start, stop)`` per block (``start:stop`` in
    elements). ``block=None``: one chunk a block. A chunk larger than ``block`` is a block.
    """
    edges = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
    out: list[tuple[int, int, int, int]] = []
    lo = 0
    for i in range(1, len(chunks) + 1):
        last = i == len(chunks)
        if last or block is None or int(edges[i + 1] - edges[lo]) > block:
            out.append((lo, i, int(edges[lo]), int(edges[i])))
            lo = i
    return out


@dataclass(frozen=True)
class BlockGrid:
    """The blocks of a product: per block dimension, its groups of chunks (:func:`group_chunks`)."""

    dims: tuple[str, ...]
    groups: tuple[tuple[tuple[int, int, int, int], ...], ...]

    @classmethod
    def of(cls, ds: xr.Dataset, dims: tuple[str, ...], block: int | None) -> BlockGrid:
        """Cut ``ds`` (dask-backed, the same chunks along ``dims`` in every variable) into blocks."""
        groups = []
        for d in dims:
            chunks = ds.chunks.get(d)
            if chunks is None:
                raise ValueError(f"nothing in the dataset is chunked along '{d}'")
            groups.append(tuple(group_chunks(tuple(chunks), block)))
        return cls(tuple(dims), tuple(groups))

    def __len__(self) -> int:
        return int(np.prod([len(g) for g in self.groups]))

    def index(self, i: int) -> tuple[int, ...]:
        """Return the block's position along each block dimension (row-major numbering)."""
        return tuple(int(j) for j in np.unravel_index(i, [len(g) for g in self.groups]))

    def region(self, i: int) -> dict[str, slice]:
        """Return the block's slice of the product along each block dimension, in elements."""
        return {d: slice(g[j][2], g[j][3]) for d, g, j in zip(self.dims, self.groups, self.index(i))}

    def chunk_ranges(self, i: int) -> dict[str, range]:
        """Return the chunks of each block dimension that the block covers."""
        return {d: range(g[j][0], g[j][1]) for d, g, j in zip(self.dims, self.groups, self.index(i))}

    def block_at(self, *position: int) -> int:
        """Return the number of the block that holds the element at ``position`` (one per dim)."""
        idx = [
            int(np.searchsorted([grp[3] for grp in g], p, side="right"))
            for g, p in zip(self.groups, position)
        ]
        return int(np.ravel_multi_index(idx, [len(g) for g in self.groups]))

    def order(self, band: int | None = None) -> list[int]:
        """Return the blocks in the order they are written: row-major, or band by band.

        ``band`` (elements along the last block dimension: px for a raster): column bands of
        that width, one after the other, each written top to bottom (row-major inside it). A
        product whose blocks share data with their neighbours (the segmentation's overlapping
        windows, :func:`~agriland_scale.models.segment.segment_region`) then holds a band's
        width of it at a time, not the region's. ``None`` (or one block dimension): row-major.
        """
        n = len(self)
        if not band or len(self.dims) < 2:
            return list(range(n))
        last = self.groups[-1]
        return sorted(range(n), key=lambda i: (last[self.index(i)[-1]][2] // band, i))

    def describe(self, i: int) -> str:
        """``y 2048:4096, x 0:2048``: the block in words, for messages."""
        return ", ".join(f"{d} {s.start}:{s.stop}" for d, s in self.region(i).items())


class BlockGraph:
    """A product's graph, optimised and materialised once, from which blocks' tasks are culled.

    ``ds``'s dask-backed data variables must each span every block dimension; variables
    without any of them are left out (they are written with the product's metadata).
    """

    def __init__(self, ds: xr.Dataset, grid: BlockGrid):
        lazy = [
            str(n) for n, v in ds.data_vars.items() if v.chunks is not None and set(grid.dims) & set(v.dims)
        ]
        for n in lazy:
            missing = set(grid.dims) - set(ds[n].dims)
            if missing:
                raise ValueError(
                    f"variable '{n}' is not along {sorted(missing)}: it cannot be written by blocks"
                )
        self.grid = grid
        self.vars = {n: (ds[n].variable.dims, ds[n].attrs, ds[n].encoding) for n in lazy}
        self.keys = {n: _key_array(ds[n].data.__dask_keys__()) for n in lazy}
        hlg = ds[lazy].__dask_graph__()
        self.graph = _optimized(hlg, ds[lazy].__dask_keys__())
        # the tasks' annotations (the model tasks' ``resources``): a materialised graph has none
        self.annotations = _annotations(hlg, self.graph)
        self.token = uuid.uuid4().hex[:12]

    def chunk_keys(self, name: str, i: int) -> np.ndarray:
        """Return the keys of variable ``name``'s chunks in block ``i``, as an array shaped like its chunk grid."""
        dims = self.vars[name][0]
        ranges = self.grid.chunk_ranges(i)
        sel = tuple(ranges[d] if d in ranges else slice(None) for d in dims)
        return self.keys[name][np.ix_(*[np.arange(k)[s] for k, s in zip(self.keys[name].shape, sel)])]

    def needs(self, i: int) -> set:
        """Every task key that block ``i`` needs (its chunks and their dependencies, transitively)."""
        seen: set = set()
        stack = [k for n in self.vars for k in self.chunk_keys(n, i).ravel().tolist()]
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            stack.extend(d for d in self.graph[k].dependencies if d not in seen)
        return seen

    def block_key(self, stage: str, i: int) -> str:
        """Return the write task's key: ``cube-block-7-…`` (the dashboard shows ``cube-block``)."""
        return f"{stage}-block-{i}-{self.token}"

    def tasks(
        self, blocks: list[int], stage: str, fork: Any, group: str, needs: dict[int, set] | None = None
    ) -> tuple[dict, list[str], int]:
        """Return the graph that writes ``blocks`` into ``fork``: ``(graph, write keys, tasks)``.

        Culled from the product's graph at the cost of these blocks' own tasks. The fork is
        one node of the graph that every write task refers to (sent once, not once a task).
        ``needs``: the blocks' tasks as :meth:`needs` culled them already (taken out of it).
        """
        from dask._task_spec import DataNode, Dict, Task, TaskRef

        fork_key = f"{stage}-fork-{self.token}-{uuid.uuid4().hex[:8]}"
        dsk: dict = {fork_key: DataNode(fork_key, fork)}
        keys = []
        for i in blocks:
            for k in needs.pop(i) if needs and i in needs else self.needs(i):
                dsk[k] = self.graph[k]
            chunks = Dict({n: _refs(self.chunk_keys(n, i)) for n in self.vars})
            key = self.block_key(stage, i)
            dsk[key] = Task(
                key, write_block, TaskRef(fork_key), group, self.grid.region(i), self.vars, chunks
            )
            keys.append(key)
        return dsk, keys, len(dsk)


def _optimized(hlg: Any, keys: list) -> dict:
    """Return the graph ``hlg`` (of ``keys``), optimised as :func:`dask.array.optimize` does, uncut.

    Blockwise layers fused, root tasks fused and linear chains fused, keeping every chunk's
    key; but not culled: dask's cull of the whole graph costs as much as the rest together
    (0.95 of 0.98 s CPU for a 9,801-task segmentation), and :meth:`BlockGraph.needs` culls
    each wave from its own blocks anyway.
    """
    import dask
    from dask._task_spec import convert_legacy_graph, fuse_linear_task_spec
    from dask.array.optimization import fuse_roots, optimize_blockwise
    from dask.core import flatten
    from dask.utils import ensure_dict

    keys = list(flatten(keys))
    dsk = fuse_roots(optimize_blockwise(hlg, keys=keys), keys=keys)
    graph = convert_legacy_graph(ensure_dict(dsk))
    if dask.config.get("optimization.fuse.active") is False:
        return graph
    return fuse_linear_task_spec(graph, keys=keys)


def _annotations(hlg: Any, graph: dict) -> dict[str, dict]:
    """``{annotation: {key: value}}`` of ``hlg``'s annotated layers, for the tasks of ``graph``.

    What :func:`dask.annotate` gave a layer (``resources`` for the model tasks, so that they
    run on GPU workers): materialising the graph drops it, the waves hand it back
    (:class:`~agriland_scale.store.waves.Waves`). A task fused into another (a model task and
    the chunk cut from it) lends its annotations to the fused task. Only annotated layers are
    walked, and the graph only when one is.
    """
    from dask._task_spec import Task, _execute_subgraph

    annotated = [layer for layer in hlg.layers.values() if layer.annotations]
    if not annotated:
        return {}
    fused_into = {
        inner: key
        for key, task in graph.items()
        if isinstance(task, Task) and task.func is _execute_subgraph
        for inner in task.args[0]
    }
    out: dict[str, dict] = {}
    for layer in annotated:
        for kind, value in layer.annotations.items():
            for k in layer:
                key = k if k in graph else fused_into.get(k)
                if key is not None:
                    out.setdefault(kind, {})[key] = value(k) if callable(value) else value
    return out


def _key_array(keys: list) -> np.ndarray:
    """Dask's nested list of chunk keys as an object array shaped like the chunk grid."""
    shape = []
    level: Any = keys
    while isinstance(level, list):
        shape.append(len(level))
        level = level[0]
    out = np.empty(shape, dtype=object)
    for idx in itertools.product(*[range(s) for s in shape]):
        item: Any = keys
        for j in idx:
            item = item[j]
        out[idx] = item
    return out


def _refs(keys: np.ndarray) -> Any:
    """Nested lists of task references shaped like ``keys`` (what :func:`numpy.block` joins)."""
    from dask._task_spec import List, TaskRef

    if keys.ndim == 1:
        return List(*[TaskRef(k) for k in keys.tolist()])
    return List(*[_refs(sub) for sub in keys])


def write_block(
    fork: Any,
    group: str,
    region: dict[str, slice],
    meta: dict[str, tuple[tuple[str, ...], dict, dict]],
    chunks: dict[str, list],
) -> Any:
    """Write one block into ``fork`` (runs on a worker) and return the fork.

    ``meta`` gives each data variable's dims, attributes and encoding; ``chunks`` its computed
    chunks of the block (nested lists that :func:`numpy.block` joins). xarray encodes the block as it encoded
    the product's metadata (CF scale factors, fill values, dtypes), except for a variable
    that is already packed (:func:`is_packed`): its values are written as they are.
    """
    packed = {name for name, (_, attrs, _) in meta.items() if is_packed(attrs)}
    block = xr.Dataset(
        {
            name: xr.Variable(dims, np.block(chunks[name]), attrs, encoding)
            for name, (dims, attrs, encoding) in meta.items()
            if name not in packed
        }
    )
    if block.data_vars:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
            block.to_zarr(fork.store, group=group, region=region, mode="r+", consolidated=False)
    for name in sorted(packed):
        dims = meta[name][0]
        arr = zarr.open_array(fork.store, path=f"{group}/{name}", mode="r+")
        arr[tuple(region.get(d, slice(None)) for d in dims)] = np.block(chunks[name])
    return fork


def is_packed(attrs: dict[str, Any]) -> bool:
    """Tell whether a variable's values are already CF-packed integers.

    Their CF ``scale_factor`` / ``add_offset`` are attributes (as ``decode_cf=False`` shows
    them, e.g. :func:`~agriland_scale.cube.load.load_cube` with ``encoded=True``), not
    xarray encoding: xarray writes such a variable whole as it is, but refuses to write a
    region of it, where it would pack the store's values again.
    """
    return "scale_factor" in attrs or "add_offset" in attrs
