"""The product store: every product of a run, versioned, in one Icechunk repository (Zarr v3).

Modules, from the bottom up (an ``import-linter`` contract keeps this order):

* :mod:`.repo`: the Icechunk repository: open or create it (local or object storage), its
  versions (snapshots and tags), readers at a version;
* :mod:`.checksums`: CRC32C checksums on every stored chunk, checked on read;
* :mod:`.groups`: products as Zarr groups: write and open them with their CRS (CF), the cube,
  the run as one ``DataTree``; :mod:`.export`: copies to plain Zarr;
* :mod:`.blocks`: a product's graph cut into square blocks of bounded size; :mod:`.waves`:
  handed to the scheduler in bounded waves, in order;
* :mod:`.resume`: :class:`~.resume.Products`, the writer of a run: blocks committed as they
  finish, a resumed run writes only what is missing.

The public face is here: open (:func:`open_run`, :func:`open_product`, :func:`open_cube`,
:func:`reader`), write (:func:`write_georef`, :func:`write_group`, and the run's writer
:class:`~.resume.Products`), versions (:func:`history`, :func:`main_version`), export
(:func:`export_zarr`).
"""

from __future__ import annotations

from typing import Any

from agriland_scale.store.export import export_zarr
from agriland_scale.store.groups import (
    CF_CONVENTIONS,
    CLUSTER_IDS,
    ICECHUNK_MEDIA_TYPE,
    StoreLike,
    fast_compressors,
    gdal_crs,
    has_group,
    history,
    is_repo,
    main_version,
    open_cube,
    open_product,
    open_repo,
    open_run,
    product_groups,
    reader,
    repo_storage,
    run_relative,
    store_location,
    try_open_product,
    with_checksums,
    write_georef,
    write_group,
)

__all__ = [
    "CF_CONVENTIONS",
    "CLUSTER_IDS",
    "ICECHUNK_MEDIA_TYPE",
    "Products",
    "StoreLike",
    "export_zarr",
    "fast_compressors",
    "gdal_crs",
    "has_group",
    "history",
    "is_repo",
    "main_version",
    "open_cube",
    "open_product",
    "open_repo",
    "open_run",
    "product_groups",
    "reader",
    "repo_storage",
    "run_relative",
    "store_location",
    "try_open_product",
    "with_checksums",
    "write_georef",
    "write_group",
]


def __getattr__(name: str) -> Any:
    """``Products`` (the run's writer) on first use: it imports Dask's distributed machinery."""
    if name == "Products":
        from agriland_scale.store.resume import Products

        return Products
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
