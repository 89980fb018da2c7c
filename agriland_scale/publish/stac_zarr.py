"""The Zarr assets of the output STAC: the run's Icechunk store, and its plain Zarr exports.

:func:`icechunk_asset` describes a group of the run's store (which plain Zarr readers cannot
open: the asset says how to open it with ``icechunk``); :func:`zarr_asset` a group of a plain
Zarr export (``agriland export``), opened by ``xarray.open_dataset(href, **xarray:open_kwargs)``
(the xarray-assets extension). :func:`~.stac.write_stac` adds them to its Items.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pystac

from agriland_scale.store import ICECHUNK_MEDIA_TYPE, product_groups

__all__ = [
    "XARRAY_ASSETS",
    "ZARR_MEDIA_TYPE",
    "add_zarr_assets",
    "icechunk_asset",
    "zarr_asset",
    "zarr_exports",
]

log = logging.getLogger(__name__)

ZARR_MEDIA_TYPE = "application/vnd+zarr"
XARRAY_ASSETS = "https://stac-extensions.github.io/xarray-assets/v1.0.0/schema.json"


def _open_kwargs(group: str | None, *, consolidated: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"engine": "zarr", "consolidated": consolidated, "decode_coords": "all"}
    if group:
        kwargs["group"] = group
    return kwargs


def icechunk_asset(store: str, group: str | None, title: str) -> pystac.Asset:
    """Make the asset of a group (or the whole) of the run's store, an Icechunk repository.

    An Icechunk repository is not a plain Zarr store: ``xarray.open_dataset(href)`` cannot
    open it, so the asset carries no ``xarray:open_kwargs`` (the xarray-assets extension's
    kwargs are for ``open_dataset(href, ...)``). It says how to open it instead: in its
    ``description`` (the code) and in ``agriland:icechunk`` (machine-readable: the storage
    function of ``icechunk``, the branch, and the ``open_kwargs`` of ``xarray.open_dataset`` on
    the session's store). :func:`zarr_asset` describes a plain Zarr export, which
    ``xarray.open_dataset(href, **xarray:open_kwargs)`` opens.
    """
    kwargs = _open_kwargs(group, consolidated=False)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return pystac.Asset(
        href=store,
        media_type=ICECHUNK_MEDIA_TYPE,
        title=title,
        roles=["data"],
        description=(
            "Zarr v3 groups in an Icechunk repository (branch main), not a plain Zarr store: "
            "xarray.open_dataset(href) cannot open it. Open it with icechunk: store = "
            "icechunk.Repository.open(icechunk.local_filesystem_storage(href))"
            f".readonly_session('main').store; xarray.open_dataset(store, {args}); "
            "or agriland_scale.store.reader(href) for the store, agriland_scale.open_run(href) "
            "for every group. 'agriland export RUN --zarr DEST' writes a plain Zarr copy."
        ),
        extra_fields={
            "agriland:icechunk": {
                "storage": "local_filesystem_storage",
                "branch": "main",
                "open_kwargs": kwargs,
            }
        },
    )


def zarr_asset(path: str | Path, group: str | None, title: str) -> pystac.Asset:
    """Make the asset of a group (or the root) of a plain Zarr store (``agriland export``).

    The export's metadata is consolidated, so ``xarray.open_dataset(href, **open_kwargs)``
    with the asset's ``xarray:open_kwargs`` (xarray-assets extension: engine ``zarr``,
    ``consolidated``, ``group``, ``decode_coords``) opens the group with its CRS.
    """
    return pystac.Asset(
        href=str(Path(path).resolve()),
        media_type=ZARR_MEDIA_TYPE,
        title=title,
        roles=["data"],
        description="plain Zarr copy of the run's products (agriland export): open with "
        "xarray.open_dataset(href, **xarray:open_kwargs)",
        extra_fields={"xarray:open_kwargs": _open_kwargs(group, consolidated=True)},
    )


def zarr_exports(out: Path) -> dict[Path, list[str]]:
    """Plain Zarr exports in the run folder (``OUT/*.zarr``, from ``agriland export``) -> their groups."""
    found = {}
    for path in sorted(out.glob("*.zarr")):
        if path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists()):
            try:
                found[path] = product_groups(str(path))
            except Exception as e:  # not ours to describe: say so and go on
                log.warning("%s is not a readable Zarr store (%s); left out of the STAC catalog", path, e)
    return found


def add_zarr_assets(
    item: pystac.Item, store: str, group: str | None, title: str, exports: dict[Path, list[str]], needs: str
) -> None:
    """Add the Icechunk asset (``zarr``) and one asset per export holding ``needs`` (its ``name``)."""
    item.add_asset("zarr", icechunk_asset(store, group, title))
    for path, groups in exports.items():
        if needs in groups:
            item.add_asset(path.name, zarr_asset(path, needs, f"{title} (plain Zarr copy {path.name})"))
            if XARRAY_ASSETS not in item.stac_extensions:
                item.stac_extensions.append(XARRAY_ASSETS)
