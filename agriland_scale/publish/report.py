"""Run report: one self-contained HTML page describing a run's output folder.

:func:`write_report` reads only the output folder (``run.json``, ``items.json``,
``agriland.icechunk``, ``models/*.json``, ``clusters/*.png``) and writes ``OUT/report.html``:
run name and status, stage timings, inputs, configuration, quicklooks of every product,
links to the COGs, the STAC collection and the product store,
the cluster gallery and embedding map when another step made them, training curves,
validation metrics, models and package versions. Pictures are PNGs embedded as base64 and
the page has no external CSS or script, so it can be mailed or archived as one file. A run
whose later stages failed gets a report of what exists.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

from agriland_scale.files import write_text
from agriland_scale.layout import (
    COG_DIR,
    STAGES,
    STORE,
    RunRecord,
    load_items,
    load_run_record,
    local_folder,
    zones_of,
)
from agriland_scale.publish.figures import (
    STATUS_COLOURS,
    image,
    model_meta,
    quicklooks,
    timings_chart,
    training_chart,
)
from agriland_scale.publish.inspect import summarise_run

__all__ = ["write_report"]

log = logging.getLogger(__name__)


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


# --- HTML pieces ----------------------------------------------------------------------------


def _e(v: Any) -> str:
    return html.escape("-" if v is None else str(v))


def _table(
    header: list[str] | None, rows: list[list[Any]], num: set[int] | frozenset[int] = frozenset()
) -> str:
    """Make an HTML table; cells are HTML already (escape text with :func:`_e`); ``num`` right-aligns."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table>{head}{body}</table>"


def _status(s: str) -> str:
    return f'<span class="status" style="background:{STATUS_COLOURS.get(s, "#9e9e9e")}">{_e(s)}</span>'


def _config_text(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)


def _file_image(path: Path, alt: str, caption: str) -> str | None:
    if not path.is_file():
        return None
    return image(base64.b64encode(path.read_bytes()).decode("ascii"), alt, caption)


def _section_run(summary: dict[str, Any], record: RunRecord) -> str:
    r = summary["region"]
    shape = ", ".join(f"{k} {v}" for k, v in (r.get("shape") or {}).items()) or "no cube written"
    rows = [
        ["output folder", _e(summary["out_dir"])],
        ["started / finished", f"{_e(summary.get('started'))} / {_e(summary.get('finished'))}"],
        ["region bbox (lon/lat, EPSG:4326)", _e(r.get("bbox"))],
        ["cube", f"{_e(shape)} in {_e(r.get('crs'))} at {_e(r.get('resolution_m'))} m"],
        ["cube bounds (m)", _e(r.get("bounds"))],
    ]
    if summary.get("patches"):
        p = summary["patches"]
        rows.append(
            ["patches", f"{_e(p.get('count'))} on a {_e(p.get('grid'))} grid, {_e(p.get('valid'))} valid"]
        )
    dash = record.get("dashboard")
    live = "<span class='muted'>(live only while the run's cluster runs)</span>"
    rows.append(["Dask dashboard", f'<a href="{_e(dash)}">{_e(dash)}</a> {live}' if dash else "-"])
    perf = record.get("performance_report")
    if perf:  # relative to the run folder, like report.html itself
        rows.append(
            [
                "Dask performance report",
                f'<a href="{_e(perf)}">{_e(perf)}</a> '
                "<span class='muted'>(task stream, worker profiles and memory of the last run)</span>",
            ]
        )
    rows.append(["scheduler", _e(record.get("scheduler"))])
    rows.append(["GPU", _e(record.get("gpu"))])
    return "<h2>Run</h2>" + _table(None, rows)


def _section_stages(summary: dict[str, Any]) -> str:
    rows = [
        [_e(s["stage"]), _status(s["status"]), "" if s["seconds"] is None else f"{s['seconds']:.1f}"]
        for s in summary["stages"]
    ]
    if summary.get("total_s") is not None:
        rows.append(["<b>total</b>", "", f"<b>{summary['total_s']:.1f}</b>"])
    chart = timings_chart(summary["stages"])
    out = "<h2>Stages</h2><div class='cols'><div>" + _table(["stage", "status", "seconds"], rows, {2})
    if chart:
        out += "</div><div>" + image(
            chart, "stage timings", "Wall-clock seconds a stage, coloured by status."
        )
    out += "</div>"
    return out + "</div>"


def _section_inputs(out: Path, summary: dict[str, Any]) -> str:
    feats = {f.get("id"): f for f in load_items(out)}
    rows = []
    for it in summary.get("items") or []:
        props = (feats.get(it.get("id")) or {}).get("properties") or {}
        cc = it.get("cloud_cover")
        rows.append(
            [
                _e(it.get("id")),
                _e(it.get("datetime")),
                "-" if cc is None else f"{cc:.1f}",
                _e(props.get("platform")),
                _e(props.get("proj:code") or props.get("proj:epsg")),
            ]
        )
    if not rows:
        return "<h2>Inputs</h2><p class='muted'>No items recorded (the search stage did not finish).</p>"
    header = ["item id", "datetime", "cloud cover (%)", "platform", "CRS"]
    return "<h2>Inputs</h2>" + _table(header, rows, {2})


def _section_products(out: Path, record: RunRecord, drawn: dict[str, list[str]]) -> str:
    zones = zones_of(record) or {"": {"prefix": ""}}
    parts = []
    for name, z in zones.items():
        prefix = z.get("prefix") or ""
        figs = drawn[prefix] if prefix in drawn else quicklooks(out, prefix)
        if figs:
            if z.get("prefix"):
                parts.append(f"<h3>Zone {_e(name)} ({_e(z.get('crs'))}, groups {_e(z.get('prefix'))}*)</h3>")
            parts.append("<div class='grid'>" + "".join(figs) + "</div>")
    if not parts:
        return "<h2>Products</h2><p class='muted'>No product written yet (no cube in the product store).</p>"
    return "<h2>Products</h2>" + "".join(parts)


def _tiles(vrt: Path) -> int:
    """Count the tile COGs beside a product's VRT (``cog/NAME.vrt`` over ``cog/NAME/*.tif``)."""
    return len(list((vrt.parent / vrt.stem).glob("*.tif")))


def _section_files(out: Path, record: RunRecord) -> str:
    """Link the run's files (relative to the run folder, like ``report.html`` itself): COGs, STAC, store."""
    products = record.get("products") or {}
    rows = []
    # one COG a product, or a VRT over a product's tile COGs (cog/NAME/NAME_rRRR_cCCC.tif)
    cogs = (
        sorted(f for ext in ("*.tif", "*.vrt") for f in (out / COG_DIR).glob(ext))
        if (out / COG_DIR).is_dir()
        else []
    )
    if cogs:
        links = "<br>".join(
            f'<a href="{_e(f"{COG_DIR}/{f.name}")}">{_e(f"{COG_DIR}/{f.name}")}</a> '
            + (
                f"<span class='muted'>({f.stat().st_size / 2**20:.1f} MiB)</span>"
                if f.suffix == ".tif"
                else f"<span class='muted'>(GDAL VRT over {_tiles(f)} tile COGs in {COG_DIR}/{f.stem}/, "
                f"{sum(t.stat().st_size for t in (f.parent / f.stem).glob('*.tif')) / 2**20:.1f} MiB)</span>"
            )
            for f in cogs
        )
        rows.append(
            [
                "Cloud-optimised GeoTIFFs",
                links + "<br><span class='muted'>(open in QGIS, GDAL, rasterio)</span>",
            ]
        )
    if (out / "stac" / "collection.json").is_file() or products.get("stac"):
        rows.append(
            [
                "STAC collection",
                '<a href="stac/collection.json">stac/collection.json</a> '
                "<span class='muted'>(items for the products and the models)</span>",
            ]
        )
    if (out / STORE).is_dir() or products.get("zarr"):
        where = products.get("zarr")
        elsewhere = f" <span class='muted'>at {_e(where)}</span>" if where and "://" in str(where) else ""
        rows.append(
            [
                "product store (Icechunk)",
                f'<a href="{STORE}/">{STORE}</a>{elsewhere} '
                "<span class='muted'>(open with <code>agriland_scale.open_run(&quot;RUN&quot;)</code> "
                "or <code>agriland export</code> for plain Zarr)</span>",
            ]
        )
    if not rows:
        return ""
    return "<h2>Files</h2>" + _table(None, rows)


def _kept_epoch(unet: dict[str, Any]) -> str:
    """Say which epoch the U-Net's validation metrics come from: the kept (best) weights, and the last."""
    per_epoch = [e for e in unet.get("per_epoch") or [] if isinstance(e, dict)]
    if not per_epoch or any(not isinstance(e.get("val_loss"), (int, float)) for e in per_epoch):
        return ""
    losses = [float(e["val_loss"]) for e in per_epoch]
    best = per_epoch[losses.index(min(losses))]  # the first lowest, as early stopping keeps it
    last = per_epoch[-1]
    iou = (unet.get("validation_metrics") or {}).get("iou")
    said = f"IoU {iou:.3f} " if isinstance(iou, float) else ""
    ran = f"{len(per_epoch)} run" + (
        f" ({unet['epochs']} scheduled, stopped early)"
        if isinstance(unet.get("epochs"), int) and unet["epochs"] > len(per_epoch)
        else ""
    )
    text = (
        f"The metrics below are of the weights kept: {said}at epoch {_e(best.get('epoch'))} "
        f"(best checkpoint: lowest validation loss) of {ran}"
    )
    if last is not best and isinstance(last.get("iou"), float):
        text += (
            f"; the last epoch ({_e(last.get('epoch'))}) ended at IoU {last['iou']:.3f}, where the chart ends"
        )
    return f"<p>{text}.</p>"


def _inputs_and_threshold(unet: dict[str, Any], record: RunRecord) -> str:
    """Say the U-Net's bands and normalisation, the mask's threshold and its over-prediction.

    ``unet`` is the model's sidecar (or run.json's ``unet``): ``bands``,
    ``normalisation.reflectance_max``, ``threshold`` (chosen on validation),
    ``threshold_choice`` and ``validation_metrics`` (``mean_probability``,
    ``labelled_fraction``, ``predicted_fraction``, at the chosen threshold).
    """
    bits = []
    bands = unet.get("bands")
    if isinstance(bands, list) and bands:
        rmax = (unet.get("normalisation") or {}).get("reflectance_max")
        norm = (
            ", ".join(f"{b} {v:g}" for b, v in rmax.items())
            if isinstance(rmax, dict)
            else (f"{rmax:g} for every band" if isinstance(rmax, (int, float)) else "?")
        )
        bits.append(f"Bands {_e(', '.join(map(str, bands)))} (reflectance mapped to 1: {_e(norm)}).")
    setting = ((record.get("config") or {}).get("segment") or {}).get("threshold")
    chosen = unet.get("threshold")
    at05 = ((unet.get("threshold_choice") or {}).get("at_0.5") or {}).get("iou")
    if isinstance(setting, (int, float)):
        bits.append(
            f"Mask threshold {setting:g}, set by segment.threshold"
            + (f" (the validation strip chose {chosen:g})." if isinstance(chosen, (int, float)) else ".")
        )
    elif isinstance(chosen, (int, float)):
        bits.append(
            f"Mask threshold {chosen:g}, chosen on the validation strip (highest IoU of 0.05 ... 0.95"
            + (f"; IoU at 0.5: {at05:.3f}" if isinstance(at05, (int, float)) else "")
            + "); the metrics below are at it."
        )
    else:
        bits.append("Mask threshold 0.5 (the model records no threshold chosen on validation).")
    vm = unet.get("validation_metrics") or {}
    mean_p, lab = vm.get("mean_probability"), vm.get("labelled_fraction")
    if isinstance(mean_p, (int, float)) and isinstance(lab, (int, float)):
        pred = vm.get("predicted_fraction")
        bits.append(
            f"Over-prediction: mean probability {mean_p:.3f} against {lab:.3f} of the labelled "
            f"validation pixels agricultural ({mean_p - lab:+.3f})"
            + (f"; {pred:.3f} of them in the mask." if isinstance(pred, (int, float)) else ".")
        )
    return f"<p>{' '.join(bits)}</p>" if bits else ""


def _section_clusters(out: Path, record: RunRecord) -> str:
    parts = []
    info = record.get("clusters") or {}
    sizes = info.get("sizes")
    if sizes:
        rows = [[str(i), str(n)] for i, n in enumerate(sizes)]
        parts.append(_table(["cluster", "patches"], rows, {0, 1}))
        changed = info.get("changed_vs_kmeans")
        changed = "-" if changed is None else f"{100 * changed:.1f} %"
        parts.append(
            f"<p>DEC: {_e(info.get('dec_iterations'))} iterations, converged "
            f"{_e(info.get('dec_converged'))}; {changed} of the patches changed cluster "
            "from the k-means start.</p>"
        )
    pictures = (
        ("gallery.png", "cluster gallery", "Sample patches of each cluster."),
        ("embedding_map.png", "embedding map", "Patch embeddings in 2-D, coloured by cluster."),
    )
    for name, alt, cap in pictures:
        fig = _file_image(out / "clusters" / name, alt, cap)
        if fig:
            parts.append(fig)
    return "<h2>Clusters</h2>" + "".join(parts) if parts else ""


def _section_training(out: Path, record: RunRecord) -> str:
    models = out / "models"
    parts = []
    chart = training_chart(models)
    if chart:
        parts.append(image(chart, "training curves", "Loss and IoU per epoch, from models/*.keras.json."))
    unet = model_meta(models / "unet.keras") or record.get("unet") or {}
    vm = unet.get("validation_metrics")
    if vm:
        val = unet.get("validation") or {}
        rows = [[_e(k), f"{v:.3f}"] for k, v in vm.items() if isinstance(v, (int, float))]
        parts.append(
            f"<p>Validation on {_e(unet.get('validation_windows'))} window(s) of the "
            f"{_e(val.get('side'))} strip (split at pixel {_e(val.get('split_px'))}), "
            f"{_e(unet.get('train_windows'))} training window(s):</p>"
        )
        parts.append(_kept_epoch(unet))
        parts.append(_inputs_and_threshold(unet, record))
        parts.append(_table(["metric", "value"], rows, {1}))
    summary_models = []
    for f in sorted(models.glob("*.keras")) if models.is_dir() else []:
        meta = model_meta(f)
        sched = (
            f"{meta['epochs']} epoch(s) × {meta.get('steps_per_epoch', '?')} steps × "
            f"batch {meta.get('batch_size', '?')}"
            if "epochs" in meta
            else "-"
        )
        secs = meta.get("seconds")
        summary_models.append(
            [
                _e(f"models/{f.name}"),
                f"{f.stat().st_size / 2**20:.1f}",
                _e(meta.get("model")),
                _e(meta.get("initial_weights")),
                _e(sched),
                "-" if secs is None else f"{secs:.0f}",
            ]
        )
    if summary_models:
        parts.append(
            _table(
                ["file", "MiB", "model", "initial weights", "schedule", "training s"], summary_models, {1, 5}
            )
        )
    return "<h2>Training and validation</h2>" + "".join(parts) if parts else ""


def _section_versions(record: RunRecord) -> str:
    v = record.get("versions") or {}
    if not v:
        return ""
    return "<h2>Versions</h2>" + _table(["package", "version"], [[_e(k), _e(x)] for k, x in v.items()])


def write_report(out_dir: str | Path, *, product_figures: dict[str, list[str]] | None = None) -> Path:
    """Write ``OUT/report.html``, a self-contained page about the run in ``out_dir``.

    A pure function of the output folder (nothing is recomputed, no network); idempotent.
    Products are read lazily with ``xr.open_zarr(store, group=...)`` and subsampled to at most
    :data:`MAX_PIXELS` a side; pictures are base64 PNGs at :data:`DPI` dpi.
    ``product_figures`` (``{zone prefix: HTML figures}``, from :func:`.figures.quicklooks` on
    the same folder after its products were written) are embedded instead of drawn again.

    Returns
    -------
    Path
        ``OUT/report.html``.

    Raises
    ------
    CorruptInput
        ``out_dir`` is not a run folder (no ``run.json``) or ``run.json`` is not valid JSON.
    """
    out = local_folder(out_dir)
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
        banner = f"<p>All {len(STAGES)} stages done.</p>"
    sections = [
        _section_run(summary, record),
        _section_stages(summary),
        _section_inputs(out, summary),
        _section_products(out, record, product_figures or {}),
        _section_files(out, record),
        _section_clusters(out, record),
        _section_training(out, record),
        "<h2>Configuration</h2><pre>" + _e(_config_text(record.get("config") or {})) + "</pre>",
        _section_versions(record),
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>agriland-scale run {_e(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>agriland-scale run <code>{_e(name)}</code></h1>{banner}"
        + "".join(sections)
        + "<p class='muted'>Contains modified Copernicus Sentinel data. Written by "
        "agriland_scale.publish.report from the output folder.</p></body></html>"
    )
    path = out / "report.html"
    write_text(page, path)
    log.info("report: %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return path
