"""Run report: one self-contained HTML page describing a run's output folder.

:func:`write_report` reads only the output folder (``run.json``, ``items.json``,
``agriland.zarr``, ``models/*.json``, ``clusters/*.png``) and writes ``OUT/report.html``:
run name and status, stage timings, inputs, configuration, quicklooks of every product,
the cluster gallery and embedding map when another step made them, training curves,
validation metrics, models and package versions. Pictures are PNGs embedded as base64 and
the page has no external CSS or script, so it can be mailed or archived as one file. A run
whose later stages failed gets a report of what exists.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .inspect_run import STAGE_ORDER, load_items, load_run_record, summarise_run, zones_of

__all__ = ["write_report"]

log = logging.getLogger(__name__)

DPI = 80
MAX_PIXELS = 800  # quicklooks are subsampled to at most this many pixels a side
_STATUS_COLOURS = {"done": "#2e7d32", "failed": "#c62828", "running": "#ef6c00", "not run": "#9e9e9e"}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1180px;padding:0 24px 48px;color:#212121;line-height:1.4}
h1{margin:24px 0 4px}h2{border-bottom:2px solid #e0e0e0;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.status{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
figure{margin:0}figcaption{font-size:13px;color:#555}img{max-width:100%;height:auto}
pre{background:#f7f7f7;border:1px solid #e0e0e0;padding:10px;overflow:auto;font-size:12px}
.error{background:#ffebee;border-left:4px solid #c62828;padding:8px 12px}
.muted{color:#757575}.cols{display:flex;gap:32px;flex-wrap:wrap}
"""


# --- pictures -------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    """Render a matplotlib figure to a base64 PNG string (``dpi`` = :data:`DPI`) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
            f"{cap}</figure>")


def _open_group(store: Path, group: str) -> xr.Dataset | None:
    """Open a product group lazily with its CRS, or None when it was not written."""
    import rioxarray  # noqa: F401  (the .rio accessor)

    if not (store / group / "zarr.json").is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(store, group=group, decode_coords="all", consolidated=False)
    except Exception as e:  # a half-written group: show the rest of the run
        log.warning("cannot open group %s of %s: %s", group, store, e)
        return None


def _step(da: xr.DataArray) -> int:
    return max(1, int(np.ceil(max(da.sizes["y"], da.sizes["x"]) / MAX_PIXELS)))


def _thin(da: xr.DataArray, step: int) -> np.ndarray:
    """Every ``step``-th pixel of a (…, y, x) array, loaded (bounded memory for quicklooks)."""
    return da.isel(y=slice(None, None, step), x=slice(None, None, step)).values


def _extent(ds: xr.Dataset | xr.DataArray) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in the product's CRS, metres, for ``imshow``."""
    left, bottom, right, top = ds.rio.bounds()
    return left, right, bottom, top


def _rgb(cube: xr.Dataset) -> tuple[np.ndarray, tuple[float, float, float, float], str] | None:
    """A 2–98 % stretched true-colour image (y, x, 3) of the composite, its extent, CRS text."""
    refl = cube.get("reflectance")
    if refl is None:
        return None
    bands = [str(b) for b in refl["band"].values]
    pick = [b for b in ("red", "green", "blue") if b in bands]
    pick = pick if len(pick) == 3 else bands[:3]
    arr = np.moveaxis(_thin(refl.sel(band=pick), _step(refl)), 0, -1).astype("float32")
    arr[arr <= 0] = np.nan
    if not np.isfinite(arr).any():
        return None
    lo, hi = np.nanpercentile(arr, [2, 98])
    arr = np.clip((np.nan_to_num(arr, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1)
    return arr, _extent(cube), str(cube.rio.crs)


def _map_axes(ax: Any, extent: tuple[float, float, float, float], crs: str, title: str) -> None:
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(f"x (m, {crs})", fontsize=8)
    ax.set_ylabel("y (m)", fontsize=8)
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.tick_params(labelsize=7)


def _map_figure(draw: Callable[[Any, Any], None]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5.0), constrained_layout=True)
    draw(fig, ax)
    return _png(fig)


def _quicklooks(store: Path, prefix: str = "") -> list[str]:
    """HTML figures: composite, clusters over it, probability over it, mask (those that exist).

    ``prefix`` selects a zone's groups in a multi-zone store (``"utm18n/"``).
    """
    cube = _open_group(store, prefix + "cube")
    clusters = _open_group(store, prefix + "clusters")
    seg = _open_group(store, prefix + "segmentation")
    rgb = _rgb(cube) if cube is not None else None
    figs: list[str] = []
    if rgb is None:
        return figs
    img, ext, crs = rgb
    bands = "B04, B03, B02" if cube is not None and "red" in cube["band"].values else "first 3 bands"

    def composite(fig: Any, ax: Any) -> None:
        ax.imshow(img, extent=ext)
        _map_axes(ax, ext, crs, f"composite ({bands})")

    figs.append(_img(_map_figure(composite), "RGB composite",
                     f"Median composite, true colour, 2–98 % stretch; {crs}."))

    if clusters is not None and "cluster_map" in clusters:
        cm = clusters["cluster_map"]
        vals = np.ma.masked_less(cm.values, 0)
        k = int(clusters.sizes.get("cluster", int(vals.max()) + 1 if vals.count() else 1))

        def cluster_fig(fig: Any, ax: Any) -> None:
            ax.imshow(img, extent=ext)
            cmap = _plt().get_cmap("tab10" if k <= 10 else "tab20", k)
            im = ax.imshow(vals, extent=_extent(cm), cmap=cmap, vmin=-0.5, vmax=k - 0.5, alpha=0.55,
                           interpolation="nearest")
            cb = fig.colorbar(im, ax=ax, shrink=0.8, label="DEC cluster")
            if k <= 20:
                cb.set_ticks(range(k))
            _map_axes(ax, ext, crs, f"clusters (k = {k}, one cell a patch)")

        figs.append(_img(_map_figure(cluster_fig), "cluster map over composite",
                         "DEC cluster of each patch (one cell a patch, centred on it) over the composite."))

    if seg is not None and "probability" in seg:
        prob = seg["probability"]

        def prob_fig(fig: Any, ax: Any) -> None:
            ax.imshow(img, extent=ext)
            im = ax.imshow(_thin(prob, _step(prob)), extent=_extent(prob), cmap="magma", vmin=0, vmax=1,
                           alpha=0.6)
            fig.colorbar(im, ax=ax, shrink=0.8, label="probability")
            _map_axes(ax, ext, crs, "U-Net agricultural-land probability")

        figs.append(_img(_map_figure(prob_fig), "probability over composite",
                         "U-Net probability of agricultural land, blended windows, over the composite."))

    if seg is not None and "mask" in seg:
        mask = seg["mask"]
        full = mask.values
        res_x, res_y = (abs(v) for v in mask.rio.resolution())
        arable = int(np.nansum(full == 1))
        valid = int(np.isfinite(full).sum())
        ha = arable * res_x * res_y / 1e4
        share = 100 * arable / valid if valid else float("nan")
        thr = mask.attrs.get("threshold", "?")

        def mask_fig(fig: Any, ax: Any) -> None:
            from matplotlib.colors import ListedColormap
            from matplotlib.patches import Patch

            colours = {"other": "#e0e0e0", "agricultural": "#558b2f"}
            cmap = ListedColormap(list(colours.values()))
            ax.imshow(_thin(mask, _step(mask)), extent=_extent(mask), cmap=cmap, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.legend(handles=[Patch(color=c, label=lab) for lab, c in reversed(colours.items())],
                      loc="lower right", fontsize=8)
            _map_axes(ax, ext, crs, f"mask (p ≥ {thr}): {ha:,.0f} ha, {share:.0f} %")

        figs.append(_img(_map_figure(mask_fig), "agricultural land mask",
                         f"Mask: {arable:,} pixels of {res_x:g} × {res_y:g} m = {ha:,.1f} ha agricultural "
                         f"({share:.1f} % of {valid:,} valid pixels)."))
    return figs


def _timings_chart(rows: list[dict[str, Any]]) -> str | None:
    rows = [r for r in rows if r["seconds"] is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.0), constrained_layout=True)
    names = [r["stage"] for r in rows][::-1]
    secs = [r["seconds"] for r in rows][::-1]
    colours = [_STATUS_COLOURS.get(r["status"], "#9e9e9e") for r in rows][::-1]
    ax.barh(names, secs, color=colours)
    for i, s in enumerate(secs):
        ax.text(s, i, f" {s:.1f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds (wall clock)")
    ax.set_xlim(0, max(secs) * 1.18 or 1)
    ax.tick_params(labelsize=8)
    return _png(fig)


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; skipped", path)
        return {}


def _training_chart(models: Path) -> str | None:
    """CAE loss and U-Net loss / IoU per epoch, from the models' JSON sidecars."""
    cae = _read_sidecar(models / "cae.keras.json") or _read_sidecar(models / "encoder.keras.json")
    cae_loss = (cae.get("history") or {}).get("loss") or []
    unet = _read_sidecar(models / "unet.keras.json")
    per_epoch = unet.get("per_epoch") or []
    if not cae_loss and not per_epoch:
        return None
    plt = _plt()
    panels = (["cae"] if cae_loss else []) + (["unet_loss", "unet_iou"] if per_epoch else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), constrained_layout=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "cae":
            ax.plot(range(1, len(cae_loss) + 1), cae_loss, marker="o", label="train MSE")
            ax.set_title(f"CAE ({cae.get('model', '?')}) reconstruction loss", fontsize=10)
            ax.set_ylabel("MSE")
        else:
            epochs = [e.get("epoch", i + 1) for i, e in enumerate(per_epoch)]
            keys = (["loss", "val_loss"] if panel == "unet_loss"
                    else ["masked_iou", "val_masked_iou", "iou"])
            labels = {"loss": "train loss", "val_loss": "validation loss", "masked_iou": "train IoU",
                      "val_masked_iou": "validation IoU", "iou": "validation IoU (thresholded)"}
            for key in keys:
                ys = [e.get(key) for e in per_epoch]
                if any(y is not None for y in ys):
                    ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=labels[key])
            ax.set_title(f"U-Net ({unet.get('model', '?')}) " + ("loss" if panel == "unet_loss" else "IoU"),
                         fontsize=10)
            if panel == "unet_iou":
                ax.set_ylim(0, 1)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.tick_params(labelsize=8)
    return _png(fig)


# --- HTML pieces ----------------------------------------------------------------------------

def _e(v: Any) -> str:
    return html.escape("-" if v is None else str(v))


def _table(header: list[str] | None, rows: list[list[Any]], num: set[int] = frozenset()) -> str:
    """An HTML table; cells are HTML already (escape text with :func:`_e`); ``num`` right-aligns."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _status(s: str) -> str:
    return f'<span class="status" style="background:{_STATUS_COLOURS.get(s, "#9e9e9e")}">{_e(s)}</span>'


def _config_text(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)


def _file_image(path: Path, alt: str, caption: str) -> str | None:
    if not path.is_file():
        return None
    return _img(base64.b64encode(path.read_bytes()).decode("ascii"), alt, caption)


def _section_run(summary: dict[str, Any], record: dict[str, Any]) -> str:
    r = summary["region"]
    shape = ", ".join(f"{k} {v}" for k, v in (r.get("shape") or {}).items()) or "no cube written"
    rows = [["output folder", _e(summary["out_dir"])],
            ["started / finished", f"{_e(summary.get('started'))} / {_e(summary.get('finished'))}"],
            ["region bbox (lon/lat, EPSG:4326)", _e(r.get("bbox"))],
            ["cube", f"{_e(shape)} in {_e(r.get('crs'))} at {_e(r.get('resolution_m'))} m"],
            ["cube bounds (m)", _e(r.get("bounds"))]]
    if summary.get("patches"):
        p = summary["patches"]
        rows.append(["patches", f"{_e(p.get('count'))} on a {_e(p.get('grid'))} grid, "
                     f"{_e(p.get('valid'))} valid"])
    dash = record.get("dashboard")
    live = "<span class='muted'>(live only while the run's cluster runs)</span>"
    rows.append(["Dask dashboard", f'<a href="{_e(dash)}">{_e(dash)}</a> {live}' if dash else "-"])
    perf = record.get("performance_report")
    if perf:  # relative to the run folder, like report.html itself
        rows.append(["Dask performance report", f'<a href="{_e(perf)}">{_e(perf)}</a> '
                     "<span class='muted'>(task stream, worker profiles and memory of the last run)</span>"])
    rows.append(["scheduler", _e(record.get("scheduler"))])
    rows.append(["GPU", _e(record.get("gpu"))])
    return "<h2>Run</h2>" + _table(None, rows)


def _section_stages(summary: dict[str, Any]) -> str:
    rows = [[_e(s["stage"]), _status(s["status"]), "" if s["seconds"] is None else f"{s['seconds']:.1f}"]
            for s in summary["stages"]]
    if summary.get("total_s") is not None:
        rows.append(["<b>total</b>", "", f"<b>{summary['total_s']:.1f}</b>"])
    chart = _timings_chart(summary["stages"])
    out = "<h2>Stages</h2><div class='cols'><div>" + _table(["stage", "status", "seconds"], rows, {2})
    if chart:
        out += "</div><div>" + _img(chart, "stage timings", "Wall-clock seconds a stage, coloured by status.")
    out += "</div>"
    return out + "</div>"


def _section_inputs(out: Path, summary: dict[str, Any]) -> str:
    feats = {f.get("id"): f for f in load_items(out)}
    rows = []
    for it in summary.get("items") or []:
        props = (feats.get(it.get("id")) or {}).get("properties") or {}
        cc = it.get("cloud_cover")
        rows.append([_e(it.get("id")), _e(it.get("datetime")), "-" if cc is None else f"{cc:.1f}",
                     _e(props.get("platform")), _e(props.get("proj:code") or props.get("proj:epsg"))])
    if not rows:
        return "<h2>Inputs</h2><p class='muted'>No items recorded (the search stage did not finish).</p>"
    header = ["item id", "datetime", "cloud cover (%)", "platform", "CRS"]
    return "<h2>Inputs</h2>" + _table(header, rows, {2})


def _section_products(out: Path, record: dict[str, Any]) -> str:
    zones = zones_of(record) or {"": {"prefix": ""}}
    parts = []
    for name, z in zones.items():
        figs = _quicklooks(out / "agriland.zarr", z.get("prefix") or "")
        if figs:
            if z.get("prefix"):
                parts.append(f"<h3>Zone {_e(name)} ({_e(z.get('crs'))}, groups {_e(z.get('prefix'))}*)</h3>")
            parts.append("<div class='grid'>" + "".join(figs) + "</div>")
    if not parts:
        return "<h2>Products</h2><p class='muted'>No product written yet (no cube in agriland.zarr).</p>"
    return "<h2>Products</h2>" + "".join(parts)


def _section_clusters(out: Path, record: dict[str, Any]) -> str:
    parts = []
    info = record.get("clusters") or {}
    sizes = info.get("sizes")
    if sizes:
        rows = [[str(i), str(n)] for i, n in enumerate(sizes)]
        parts.append(_table(["cluster", "patches"], rows, {0, 1}))
        changed = info.get("changed_vs_kmeans")
        changed = "-" if changed is None else f"{100 * changed:.1f} %"
        parts.append(f"<p>DEC: {_e(info.get('dec_iterations'))} iterations, converged "
                     f"{_e(info.get('dec_converged'))}; {changed} of the patches changed cluster "
                     "from the k-means start.</p>")
    pictures = (("gallery.png", "cluster gallery", "Sample patches of each cluster."),
                ("embedding_map.png", "embedding map", "Patch embeddings in 2-D, coloured by cluster."))
    for name, alt, cap in pictures:
        fig = _file_image(out / "clusters" / name, alt, cap)
        if fig:
            parts.append(fig)
    return "<h2>Clusters</h2>" + "".join(parts) if parts else ""


def _section_training(out: Path, record: dict[str, Any]) -> str:
    models = out / "models"
    parts = []
    chart = _training_chart(models)
    if chart:
        parts.append(_img(chart, "training curves", "Loss and IoU per epoch, from models/*.keras.json."))
    unet = _read_sidecar(models / "unet.keras.json") or record.get("unet") or {}
    vm = unet.get("validation_metrics")
    if vm:
        val = unet.get("validation") or {}
        rows = [[_e(k), f"{v:.3f}"] for k, v in vm.items()]
        parts.append(f"<p>Validation on {_e(unet.get('validation_windows'))} window(s) of the "
                     f"{_e(val.get('side'))} strip (split at pixel {_e(val.get('split_px'))}), "
                     f"{_e(unet.get('train_windows'))} training window(s):</p>")
        parts.append(_table(["metric", "value"], rows, {1}))
    summary_models = []
    for f in sorted(models.glob("*.keras")) if models.is_dir() else []:
        meta = _read_sidecar(f.with_name(f.name + ".json"))
        sched = (f"{meta['epochs']} epoch(s) × {meta.get('steps_per_epoch', '?')} steps × "
                 f"batch {meta.get('batch_size', '?')}" if "epochs" in meta else "-")
        secs = meta.get("seconds")
        summary_models.append([_e(f"models/{f.name}"), f"{f.stat().st_size / 2**20:.1f}",
                               _e(meta.get("model")), _e(meta.get("initial_weights")), _e(sched),
                               "-" if secs is None else f"{secs:.0f}"])
    if summary_models:
        parts.append(_table(["file", "MiB", "model", "initial weights", "schedule", "training s"],
                            summary_models, {1, 5}))
    return "<h2>Training and validation</h2>" + "".join(parts) if parts else ""


def _section_versions(record: dict[str, Any]) -> str:
    v = record.get("versions") or {}
    if not v:
        return ""
    return "<h2>Versions</h2>" + _table(["package", "version"], [[_e(k), _e(x)] for k, x in v.items()])


def write_report(out_dir: str | Path) -> Path:
    """Write ``OUT/report.html``, a self-contained page about the run in ``out_dir``.

    A pure function of the output folder (nothing is recomputed, no network); idempotent.
    Products are read lazily with ``xr.open_zarr(store, group=...)`` and subsampled to at most
    :data:`MAX_PIXELS` a side; pictures are base64 PNGs at :data:`DPI` dpi.

    Returns
    -------
    Path
        ``OUT/report.html``.

    Raises
    ------
    CorruptInput
        ``out_dir`` is not a run folder (no ``run.json``) or ``run.json`` is not valid JSON.
    """
    out = Path(out_dir).resolve()
    summary = summarise_run(out)
    record = load_run_record(out)
    name = summary.get("name") or out.name
    failed = [s["stage"] for s in summary["stages"] if s["status"] == "failed"]
    pending = [s["stage"] for s in summary["stages"] if s["status"] != "done"]
    if failed or summary.get("error"):
        banner = f"<p class='error'><b>Run failed</b>: {_e(summary.get('error') or ', '.join(failed))}</p>"
    elif pending:
        banner = f"<p class='error'>Stages not finished: {_e(', '.join(pending))}</p>"
    else:
        banner = f"<p>All {len(STAGE_ORDER)} stages done.</p>"
    sections = [
        _section_run(summary, record),
        _section_stages(summary),
        _section_inputs(out, summary),
        _section_products(out, record),
        _section_clusters(out, record),
        _section_training(out, record),
        "<h2>Configuration</h2><pre>" + _e(_config_text(record.get("config") or {})) + "</pre>",
        _section_versions(record),
    ]
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>agriland-scale run {_e(name)}</title><style>{_CSS}</style></head><body>"
            f"<h1>agriland-scale run <code>{_e(name)}</code></h1>{banner}"
            + "".join(sections)
            + "<p class='muted'>Contains modified Copernicus Sentinel data. Written by "
              "agriland_scale.report from the output folder.</p></body></html>")
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    log.info("report: %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return path
