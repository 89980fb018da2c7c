"""VGG Image Annotator (VIA 2.x): export the patches of chosen clusters, import the polygons.

The seed project picked patches of arable-looking clusters, drew polygons on them in VIA
and rasterised the VIA JSON into masks. :func:`export_via` writes those patches as PNGs with
a ready VIA project (``via_project.json``) and a ``patches.json`` sidecar that remembers
where every PNG lies in the cube; :func:`import_via` turns the saved annotations back
into a label mask on the cube grid (same CRS and transform as the cube).

Image pixel coordinates in VIA have their origin at the top-left corner of the patch,
x to the right and y down, one unit a pixel: image pixel ``(px, py)`` is cube pixel
``(x0 + px, y0 + py)``.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features
import xarray as xr
from affine import Affine

from agriland_scale.errors import (
    ConfigError,
    CorruptInput,
    EmptyRegion,
    IgnoredRegion,
    OutputExists,
)
from agriland_scale.files import write_json
from agriland_scale.labels.classes import IGNORE
from agriland_scale.patches import read_windows
from agriland_scale.render import RGB, stretch_limits, to_rgb8
from agriland_scale.store import open_cube, open_product, write_georef

__all__ = ["export_via", "import_via", "parse_patch_filename", "patch_filename", "read_via_regions"]

log = logging.getLogger(__name__)

PROJECT = "via_project.json"
SIDECAR = "patches.json"
VIA_VERSION = "2.0.12"
_NAME = re.compile(r"^patch_(\d+)_r(\d+)_c(\d+)\.png$")
_USABLE = ("polygon", "rect", "circle", "ellipse")


# ---------------------------------------------------------------------------- names


def patch_filename(patch: int, y0: int, x0: int) -> str:
    """PNG name of a patch that keeps its id and top-left pixel offsets: ``patch_000123_r0512_c0384.png``."""
    return f"patch_{int(patch):06d}_r{int(y0):04d}_c{int(x0):04d}.png"


def parse_patch_filename(name: str) -> tuple[int, int, int]:
    """``(patch, y0, x0)`` from a name written by :func:`patch_filename`."""
    m = _NAME.match(Path(name).name)
    if m is None:
        raise CorruptInput(f"'{name}' is not a patch PNG name like patch_000123_r0512_c0384.png")
    return int(m[1]), int(m[2]), int(m[3])


# ---------------------------------------------------------------------------- export


def _via_project(entries: list[tuple[str, int]], name: str, image_dir: Path) -> dict[str, Any]:
    """Build a VIA 2 project (what *Project → Save* writes) listing ``(filename, bytes)`` images."""
    meta = {
        f"{fn}{size}": {"filename": fn, "size": size, "regions": [], "file_attributes": {}}
        for fn, size in entries
    }
    return {
        "_via_settings": {
            "ui": {
                "annotation_editor_height": 25,
                "annotation_editor_fontsize": 0.8,
                "leftsidebar_width": 18,
                "image_grid": {
                    "img_height": 80,
                    "rshape_fill": "none",
                    "rshape_fill_opacity": 0.3,
                    "rshape_stroke": "yellow",
                    "rshape_stroke_width": 2,
                    "show_region_shape": True,
                    "show_image_policy": "all",
                },
                "image": {
                    "region_label": "class",
                    "region_color": "class",
                    "region_label_font": "10px Sans",
                    "on_image_annotation_editor_placement": "NEAR_REGION",
                },
            },
            "core": {"buffer_size": 18, "filepath": {}, "default_filepath": f"{image_dir.resolve()}/"},
            "project": {"name": name},
        },
        "_via_img_metadata": meta,
        "_via_attributes": {
            "region": {
                "class": {
                    "type": "radio",
                    "description": "arable = agricultural land",
                    "options": {"arable": "agricultural land", "other": "anything else"},
                    "default_options": {"arable": True},
                }
            },
            "file": {},
        },
        "_via_data_format_version": VIA_VERSION,
        "_via_image_id_list": list(meta),
    }


def _has_regions(project: Path) -> bool:
    try:
        meta = _img_metadata(json.loads(project.read_text()), project)
    except (CorruptInput, json.JSONDecodeError, OSError):
        return False
    return any(e.get("regions") for e in meta.values() if isinstance(e, dict))


def export_via(
    store: str | Path, out_dir: str | Path, clusters: list[int], *, overwrite: bool = False, batch: int = 16
) -> Path:
    """Write the patches of ``clusters`` as PNGs plus a VIA 2 project to annotate them.

    Parameters
    ----------
    store : a run (its --out, or a reader of its store) with groups ``cube``, ``patches``
        and ``clusters``.
    out_dir : folder for the PNGs, ``via_project.json`` and the ``patches.json`` sidecar.
    clusters : DEC cluster ids; every clustered patch whose label is one of them is written.
    overwrite : replace a ``via_project.json`` that already holds drawn regions.
    batch : patches read from the cube at a time.

    PNGs are 8-bit RGB (red, green, blue) with a 2–98 % stretch a band computed over the
    whole region, named by :func:`patch_filename`. The sidecar maps each PNG to its patch
    id, pixel offsets ``y0``/``x0``, size and cluster, with the cube's CRS, transform
    (affine ``a, b, c, d, e, f``, metres) and shape. PNGs of an earlier export to the
    same folder that are no longer selected are removed. Returns the project's path.
    """
    cube = open_cube(store)
    index = open_product(store, "patches").load()
    cl = open_product(store, "clusters")
    labels = cl["labels"].values.astype("int64")
    k = int(cl.sizes["cluster"])
    clusters = sorted({int(c) for c in clusters})
    if not clusters:
        raise ConfigError("no cluster chosen: pass at least one cluster id (see OUT/clusters/gallery.png)")
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    bad = [c for c in clusters if not 0 <= c < k]
    if bad:
        raise ConfigError(f"cluster id(s) {bad} do not exist: this run has clusters 0..{k - 1}")
    empty = [c for c in clusters if sizes[c] == 0]
    if empty:
        raise ConfigError(f"cluster(s) {empty} hold no patch (sizes: {sizes.tolist()}): choose others")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    project = out / PROJECT
    if project.exists() and not overwrite and _has_regions(project):
        raise OutputExists(
            f"{project} already holds drawn regions: import it first, export to "
            "another folder, or pass overwrite=True"
        )
    sel = np.flatnonzero(np.isin(labels, clusters))
    size = int(index.attrs["patch_size"])
    lo, hi = stretch_limits(cube)
    rgb = cube["reflectance"].sel(band=list(RGB))
    pid, y0, x0 = index["patch"].values, index["y0"].values, index["x0"].values
    from PIL import Image

    records: dict[str, dict[str, int]] = {}
    entries: list[tuple[str, int]] = []
    for start in range(0, len(sel), batch):
        ids = sel[start : start + batch]
        win = read_windows(rgb, y0[ids], x0[ids], size)
        for i, w in zip(ids, win):
            fn = patch_filename(pid[i], y0[i], x0[i])
            Image.fromarray(to_rgb8(w, lo, hi), mode="RGB").save(out / fn, format="PNG")
            entries.append((fn, (out / fn).stat().st_size))
            records[fn] = {
                "patch": int(pid[i]),
                "y0": int(y0[i]),
                "x0": int(x0[i]),
                "size": size,
                "cluster": int(labels[i]),
            }
    _remove_stale(out, set(records))
    t = cube.rio.transform()
    sidecar = {
        "format": "agriland-scale VIA export 1",
        "store": str(Path(store).resolve()) if isinstance(store, (str, Path)) else "",
        "crs": cube.rio.crs.to_string(),
        "crs_wkt": cube.rio.crs.to_wkt(),
        "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "height": int(cube.sizes["y"]),
        "width": int(cube.sizes["x"]),
        "bands": list(RGB),
        "stretch": {"percentiles": [2, 98], "low": lo.tolist(), "high": hi.tolist()},
        "clusters": clusters,
        "patches": records,
    }
    write_json(sidecar, out / SIDECAR)
    name = "agriland_clusters_" + "-".join(map(str, clusters))
    write_json(_via_project(entries, name, out), project)
    log.info("exported %d patches of clusters %s to %s", len(records), clusters, out)
    return project


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Remove patch PNGs of an earlier export (listed in its sidecar) not in ``keep``."""
    old = out / SIDECAR
    if not old.exists():
        return
    try:
        names = json.loads(old.read_text()).get("patches", {})
    except (json.JSONDecodeError, OSError, AttributeError):
        return
    for fn in names:
        if fn not in keep and _NAME.match(fn) and (out / fn).is_file():
            (out / fn).unlink()


# ---------------------------------------------------------------------------- import


def _img_metadata(data: Any, path: Path) -> dict[str, Any]:
    """Return the ``filename+size → entry`` dict of a VIA project or of a VIA annotation export."""
    if isinstance(data, dict) and "_via_img_metadata" in data:
        data = data["_via_img_metadata"]
    if not isinstance(data, dict) or not all(isinstance(e, dict) and "filename" in e for e in data.values()):
        raise CorruptInput(
            f"{path} is not a VIA 2 project or annotation file (expected "
            "'_via_img_metadata' or entries with 'filename' and 'regions'): save it "
            "from VIA with Project → Save or Annotation → Export (as json)"
        )
    return data


def _ellipse_ring(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0, n: int = 64) -> list:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    ct, st = np.cos(theta), np.sin(theta)
    x = cx + rx * np.cos(t) * ct - ry * np.sin(t) * st
    y = cy + rx * np.cos(t) * st + ry * np.sin(t) * ct
    return list(zip(x.tolist(), y.tolist()))


def _region_ring(shape: dict[str, Any]) -> list[tuple[float, float]] | None:
    """Outline of a VIA region in image pixels ``[(x, y), ...]``; None for shapes without area."""
    name = shape.get("name")
    if name == "polygon":
        xs, ys = shape["all_points_x"], shape["all_points_y"]
        return list(zip(map(float, xs), map(float, ys))) if len(xs) == len(ys) and len(xs) >= 3 else None
    if name == "rect":
        x, y, w, h = (float(shape[a]) for a in ("x", "y", "width", "height"))
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if name == "circle":
        r = float(shape["r"])
        return _ellipse_ring(float(shape["cx"]), float(shape["cy"]), r, r)
    if name == "ellipse":
        return _ellipse_ring(
            float(shape["cx"]),
            float(shape["cy"]),
            float(shape["rx"]),
            float(shape["ry"]),
            float(shape.get("theta", 0.0)),
        )
    return None


def _valid_polygon(ring: list[tuple[float, float]]) -> Any:
    """Make a valid shapely geometry of a drawn outline (self-intersections repaired, ring closed)."""
    import shapely

    return shapely.make_valid(shapely.Polygon(ring))


def _region_class(attrs: Any) -> str | None:
    """Return the ``class`` region attribute: a string (radio, dropdown, text) or the checked key(s)."""
    value = (attrs or {}).get("class") if isinstance(attrs, dict) else None
    if isinstance(value, dict):  # checkbox: {"arable": true}
        on = [k for k, v in value.items() if v]
        return on[0] if on else None
    return str(value) if value not in (None, "") else None


def read_via_regions(
    via_json_path: str | Path,
) -> dict[str, list[tuple[list[tuple[float, float]], str | None]]]:
    """Regions of every annotated image: ``{filename: [(ring in image pixels, class or None), ...]}``.

    Reads a VIA 2 project (``_via_img_metadata``) or the plain annotation export (the same
    dict at the top level); regions may be a list (VIA 2) or a dict (VIA 1). Polygons,
    rectangles, circles and ellipses are kept; polylines and points are skipped with an
    :class:`IgnoredRegion` warning. Images without a usable region are left out.
    """
    path = Path(via_json_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptInput(f"VIA file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptInput(f"VIA file {path} is not valid JSON ({e}): save it again from VIA") from None
    out: dict[str, list] = {}
    for entry in _img_metadata(data, path).values():
        regions = entry.get("regions") or []
        regions = list(regions.values()) if isinstance(regions, dict) else regions
        kept = []
        for r in regions:
            shape = r.get("shape_attributes") or {}
            try:
                ring = _region_ring(shape)
            except (KeyError, TypeError, ValueError) as e:
                raise CorruptInput(
                    f"region of {entry['filename']} in {path} has a malformed "
                    f"'{shape.get('name')}' shape ({e!r})"
                ) from None
            if ring is None:
                warnings.warn(
                    f"{entry['filename']}: skipped a '{shape.get('name')}' region (only polygon, "
                    "rect, circle and ellipse regions outline land)",
                    IgnoredRegion,
                    stacklevel=2,
                )
                continue
            kept.append((ring, _region_class(r.get("region_attributes"))))
        if kept:
            out.setdefault(entry["filename"], []).extend(kept)
    return out


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = path.parent / SIDECAR
    try:
        data = json.loads(side.read_text())
    except FileNotFoundError:
        raise CorruptInput(
            f"no {SIDECAR} next to {path}: it is written by export_via and places the "
            f"patches in the cube; keep the annotations file in the export folder"
        ) from None
    except json.JSONDecodeError as e:
        raise CorruptInput(f"{side} is not valid JSON ({e}): export the patches again") from None
    if not isinstance(data, dict) or not isinstance(data.get("patches"), dict) or "transform" not in data:
        raise CorruptInput(f"{side} is not an agriland-scale VIA sidecar (no 'patches'/'transform')")
    return data


def _check_grid(side: dict[str, Any], cube: xr.Dataset, side_path: Path) -> None:
    from pyproj import CRS

    t = cube.rio.transform()
    same_crs = CRS.from_user_input(side.get("crs_wkt") or side["crs"]) == CRS.from_user_input(cube.rio.crs)
    same_t = np.allclose(side["transform"], [t.a, t.b, t.c, t.d, t.e, t.f], rtol=0, atol=1e-6)
    if not (same_crs and same_t):
        raise CorruptInput(
            f"the patches of {side_path} were exported from a cube in {side['crs']} with "
            f"transform {side['transform']}, but this cube is in {cube.rio.crs} with "
            f"{list(t)[:6]}: import with the cube of the run you exported from"
        )


def import_via(
    via_json_path: str | Path, cube: xr.Dataset, *, positive: tuple[str, ...] = ("arable",)
) -> xr.DataArray:
    """Rasterise VIA annotations into a uint8 label mask ``(y, x)`` on the cube grid.

    Parameters
    ----------
    via_json_path : a VIA 2 project or annotation export, next to the ``patches.json``
        sidecar written by :func:`export_via`.
    cube : the cube the patches were exported from (its CRS and transform are checked).
    positive : region classes that mean agricultural land.

    Returns
    -------
    DataArray ``label`` with the cube's ``y``/``x`` coordinates, CRS and transform:
    1 inside a region whose ``class`` is in ``positive`` or that has no class, 0 inside
    other regions and in the rest of every annotated patch (the annotator looked at the
    whole patch), 255 (:data:`agriland_scale.labels.IGNORE`) elsewhere. A pixel is inside a
    region when its centre is. Where annotated patches overlap, 1 wins. A patch without
    any region counts as not annotated; to mark a patch with no agricultural land, draw
    one ``other`` region over it.
    """
    path = Path(via_json_path)
    regions = read_via_regions(path)
    side = _read_sidecar(path)
    _check_grid(side, cube, path)
    h, w = cube.sizes["y"], cube.sizes["x"]
    mask = np.full((h, w), IGNORE, dtype="uint8")
    for fn, shapes in sorted(regions.items()):
        rec = side["patches"].get(fn)
        if rec is None:
            raise CorruptInput(
                f"image '{fn}' of {path} is not in {path.parent / SIDECAR}: annotate only "
                "the exported patches, or export them again"
            )
        y0, x0, size = int(rec["y0"]), int(rec["x0"]), int(rec["size"])
        if y0 < 0 or x0 < 0 or y0 + size > h or x0 + size > w:
            raise CorruptInput(f"patch '{fn}' ({y0}, {x0}, size {size}) lies outside the cube ({h} x {w} px)")
        local = np.zeros((size, size), dtype="uint8")  # the whole patch was looked at: 0
        pos = [
            (_valid_polygon(ring), 1) for ring, c in shapes if c is None or c in positive
        ]  # other regions keep 0; positive wins overlaps
        pos = [(g, v) for g, v in pos if not g.is_empty]
        if pos:
            rasterio.features.rasterize(pos, out=local, transform=Affine.identity())
        win = mask[y0 : y0 + size, x0 : x0 + size]
        mask[y0 : y0 + size, x0 : x0 + size] = np.where(win == IGNORE, local, np.maximum(win, local))
    if not regions:
        raise EmptyRegion(
            f"{path} holds no polygon, rect, circle or ellipse region: draw regions in VIA "
            "and save the project before importing"
        )
    da = xr.DataArray(
        mask, dims=("y", "x"), coords={"y": cube["y"].values, "x": cube["x"].values}, name="label"
    )
    da.attrs.update(
        flag_values=[0, 1, IGNORE],
        flag_meanings="other agricultural unlabelled",
        source=str(path),
        annotated_patches=len(regions),
    )
    return write_georef(da.to_dataset(), cube.rio.crs)["label"]
