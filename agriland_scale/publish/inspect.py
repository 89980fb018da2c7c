"""Inspect a finished (or failed) run: what it covered, what it wrote, how each stage went.

:func:`summarise_run` reads only the output folder (``run.json``, ``items.json``, the files
under it); :func:`format_summary` turns the summary into a few readable lines::

    from agriland_scale.publish.inspect import format_summary, summarise_run
    print(format_summary(summarise_run("demo-out")))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agriland_scale.files import is_object_url, join_url, list_objects
from agriland_scale.layout import (
    COG_NAMES,
    LOCK_NAME,
    STAGES,
    STORE,
    RunRecord,
    load_items,
    load_run_record,
    local_folder,
    zones_of,
)
from agriland_scale.search.items import acquired

__all__ = [
    "COG_NAMES",
    "STAGES",
    "format_summary",
    "load_items",
    "load_run_record",
    "summarise_run",
    "zones_of",
]


def _product_rows(out: Path, record: RunRecord) -> list[dict[str, Any]]:
    """Products a run writes, expected or found, with their on-disk size (None when missing)."""
    rels = [STORE]
    for name, z in (zones_of(record) or {"": {}}).items():
        tag = f"{name}_" if z.get("prefix") else ""  # zone-prefixed groups <=> zone-tagged COGs
        # one COG, or (a product larger than one output tile) a VRT over its tile COGs
        rels += [
            f"cog/{tag}{c}.vrt" if (out / "cog" / f"{tag}{c}.vrt").exists() else f"cog/{tag}{c}.tif"
            for c in COG_NAMES
        ]
    if (out / "cog").is_dir():
        found = [p for ext in ("*.tif", "*.vrt") for p in (out / "cog").glob(ext)]
        rels += sorted(f"cog/{p.name}" for p in found if f"cog/{p.name}" not in rels)
    quick = sorted(p.name for p in out.glob("quicklook*.png")) or ["quicklook.png"]
    rels += quick + [
        "items.json",
        "clusters/gallery.png",
        "clusters/embedding_map.png",
        "report.html",
        "stac/collection.json",
    ]
    rows = []
    location = _location(out, record)
    for rel in rels:
        p = out / rel
        size = _size_bytes(p) if p.exists() else None
        if rel == STORE and size is None and is_object_url(location):  # the store is on object storage
            size = sum(list_objects(join_url(location, STORE)).values()) or None
        rows.append({"name": rel.rsplit("/", 1)[-1], "path": rel, "exists": size is not None, "bytes": size})
    return rows


def _location(out: Path, record: RunRecord) -> str:
    """Where the run lives: its folder, or the object-storage URL a working copy stands for."""
    loc = str(record.get("location") or "")
    return loc if is_object_url(loc) else str(out.resolve())


def _size_bytes(path: Path) -> int:
    """On-disk size of a file, or of every file under a folder, in bytes."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _store_damage(out: Path, record: RunRecord) -> str | None:
    """Return why the run's product store cannot be read when it is damaged, else None.

    Checks only that the store opens at its latest version (the engine reads its ref and that
    snapshot); a store that is not there yet, or out of reach, is not damage.
    """
    from agriland_scale.errors import CorruptInput
    from agriland_scale.store.repo import check_store

    try:
        check_store(_location(out, record))
    except CorruptInput as e:
        return str(e)
    except Exception:  # noqa: BLE001 - storage out of reach: the summary is of the folder
        return None
    return None


def _stage_rows(record: RunRecord) -> list[dict[str, Any]]:
    """One row a stage, in pipeline order: status (done/failed/running/not run) and seconds."""
    stages = record.get("stages") or {}
    timings = record.get("timings_s") or {}
    names = list(STAGES) + [s for s in stages if s not in STAGES]
    return [{"stage": s, "status": stages.get(s, "not run"), "seconds": timings.get(s)} for s in names]


def _stale(record: RunRecord) -> list[dict[str, str]]:
    """List the stages whose products are not current, with what it means for their products.

    Not current: not done (failed, interrupted, running, or forced away and not redone).
    """
    stages = record.get("stages") or {}
    if not stages:
        return []
    out = []
    for s in STAGES:
        status = stages.get(s, "not run")
        if status == "done":
            continue
        why = {
            "failed": "failed: its products are removed or were never published",
            "interrupted": "interrupted: finished blocks are kept, the product is not published",
            "running": "was running (a process holds the folder, or one was killed)",
        }.get(status, "not run (or forced and not redone): no product")
        out.append({"stage": s, "status": status, "why": why})
    return out


def _lock_holder(out: Path) -> dict[str, Any] | None:
    """Return the process named in the run folder's lock file when it still runs (None otherwise).

    Read without taking the lock (a probe with ``flock`` could make a run that starts at the
    same moment refuse); a holder on another host cannot be checked and is reported as is.
    """
    import os
    import socket

    try:
        info = json.loads((out / LOCK_NAME).read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict):
        return None
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # a lock left by a killed process: the next run takes it over
        except PermissionError:
            pass
    return info


def summarise_run(out_dir: str | Path) -> dict[str, Any]:
    """Summarise a run's output folder as plain data (JSON-serialisable).

    Returns
    -------
    dict
        ``name``, ``out_dir``, ``started``/``finished``, ``error`` (or None), ``region``
        (``bbox`` lon/lat EPSG:4326 as searched, cube ``crs``, ``shape`` {dim: size},
        ``bounds`` in metres of the cube CRS, ``resolution_m``; the first zone's cube in a
        multi-zone run), ``zones`` ({name: prefix, crs, shape, bounds}), ``items`` (id, datetime,
        cloud cover in %), ``products`` (name, path, ``exists``, ``bytes`` on disk),
        ``stages`` (stage, status, seconds), ``total_s``, ``models`` (file, bytes, and the
        sidecar's ``model`` name), ``patches``, ``validation_metrics``, ``dashboard``,
        ``store_damage`` (why the product store cannot be read, and how to recover; None when
        it opens or is not there).

    Raises
    ------
    CorruptInput
        The folder is not a run (no ``run.json``) or ``run.json`` is not valid JSON.
    """
    out = local_folder(out_dir)
    record = load_run_record(out)
    cfg = record.get("config") or {}
    cube = record.get("cube") or {}
    transform = cube.get("transform")
    items = (record.get("inputs") or {}).get("items")
    if items is None:  # run.json predates the search record: fall back to items.json
        items = [
            {
                "id": f.get("id"),
                "datetime": acquired(f),
                "cloud_cover": (f.get("properties") or {}).get("eo:cloud_cover"),
            }
            for f in load_items(out)
        ]
    products = _product_rows(out, record)
    models = []
    mdir = out / "models"
    for f in sorted(mdir.glob("*.keras")) if mdir.is_dir() else []:
        side = f.with_name(f.name + ".json")
        meta: dict[str, Any] = {}
        if side.is_file():
            try:
                meta = json.loads(side.read_text())
            except json.JSONDecodeError:
                meta = {}
        models.append(
            {
                "file": f"models/{f.name}",
                "bytes": f.stat().st_size,
                "model": meta.get("model"),
                "sidecar": side.is_file(),
            }
        )
    return {
        "name": cfg.get("name"),
        "out_dir": _location(out, record),
        "started": record.get("started"),
        "finished": record.get("finished"),
        "error": record.get("error"),
        "region": {
            "bbox": (cfg.get("search") or {}).get("bbox"),
            "crs": cube.get("crs"),
            "shape": cube.get("shape"),
            "bounds": cube.get("bounds"),
            "resolution_m": abs(transform[0]) if transform else None,
        },
        "zones": {
            name: {k: z.get(k) for k in ("prefix", "crs", "shape", "bounds")}
            for name, z in zones_of(record).items()
        },
        "items": items,
        "products": products,
        "stages": _stage_rows(record),
        "stale": _stale(record),
        "locked_by": _lock_holder(out),
        "total_s": (record.get("timings_s") or {}).get("total"),
        "models": models,
        "patches": record.get("patches"),
        "validation_metrics": (record.get("unet") or {}).get("validation_metrics"),
        "dashboard": record.get("dashboard"),
        "store_damage": _store_damage(out, record),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Format :func:`summarise_run`'s result as plain text lines (for a terminal)."""
    r = summary["region"]
    lines = [f"run '{summary.get('name')}' in {summary['out_dir']}"]
    if summary.get("started"):
        lines.append(f"  started {summary['started']}, finished {summary.get('finished') or '-'}")
    if summary.get("error"):
        lines.append(f"  ERROR: {summary['error']}")
    if summary.get("store_damage"):
        lines.append(f"  DAMAGED: {summary['store_damage']}")
    lines.append(f"region: bbox {r.get('bbox')} (lon/lat)")
    if r.get("shape"):
        shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items())
        lines.append(
            f"  cube ({shape}) in {r.get('crs')} at {r.get('resolution_m'):g} m, bounds {r.get('bounds')} m"
        )
        if len(summary.get("zones") or {}) > 1:
            for name, z in summary["zones"].items():
                zshape = ", ".join(f"{k} {v}" for k, v in (z.get("shape") or {}).items())
                lines.append(f"  zone {name} (groups {z.get('prefix')}*): ({zshape}) in {z.get('crs')}")
    else:
        lines.append("  no cube written")
    lines.append(f"items ({len(summary['items'] or [])}):")
    for it in summary["items"] or []:
        cc = it.get("cloud_cover")
        lines.append(f"  {it.get('id')}  {it.get('datetime')}  cloud {'-' if cc is None else f'{cc:.1f} %'}")
    lines.append("stages:")
    for s in summary["stages"]:
        t = "" if s["seconds"] is None else f"{s['seconds']:8.1f} s"
        lines.append(f"  {s['stage']:<13} {s['status']:<8} {t}")
    if summary.get("total_s") is not None:
        lines.append(f"  {'total':<13} {'':<8} {summary['total_s']:8.1f} s")
    holder = summary.get("locked_by")
    if holder is not None:
        lines.append(
            f"  in use now by '{holder.get('command', '?')}' (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('started', '?')})"
        )
    for st in summary.get("stale") or []:
        lines.append(f"  stale: {st['stage']} {st['why']}")
    if summary.get("stale") and not summary.get("store_damage"):  # a rerun would fail the same way
        lines.append("  rerun the same command to bring every product up to date")
    lines.append("products:")
    for p in summary["products"]:
        lines.append(f"  {p['path']:<28} {_human(p['bytes']) if p['exists'] else 'missing':>10}")
    lines.append("models:" if summary["models"] else "models: none")
    for m in summary["models"]:
        lines.append(f"  {m['file']:<24} {_human(m['bytes']):>10}  {m.get('model') or ''}")
    vm = summary.get("validation_metrics")
    if vm:
        lines.append("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in vm.items()))
    if summary.get("dashboard"):
        lines.append(f"dask dashboard (while the cluster ran): {summary['dashboard']}")
    return "\n".join(lines)
