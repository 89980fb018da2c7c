"""The report's figures, as base64 PNGs: maps of a run's products over its composite, charts.

Rasters are read every n-th pixel (at most :data:`MAX_PIXELS` a side): each map's image is
an overview made window by window by Dask tasks (:mod:`.overview`; on the workers, with a
client), all maps and the mask's pixel counts in one computation, so only images of at most
:data:`MAX_PIXELS` a side reach this process, whatever the region's size.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agriland_scale.errors import CorruptInput, EmptyRegion
from agriland_scale.files import atomic_path
from agriland_scale.models.files import read_sidecar, sidecar_path
from agriland_scale.publish.overview import Count, Thin, compute_overviews
from agriland_scale.render import display_bands, figure_png, percentile_limits, to_rgb
from agriland_scale.store import try_open_product

__all__ = [
    "MAP_INCHES",
    "MAX_PIXELS",
    "STATUS_COLOURS",
    "image",
    "model_meta",
    "product_maps",
    "quicklooks",
    "timings_chart",
    "training_chart",
    "write_quicklook",
]

log = logging.getLogger(__name__)


DPI = 80


PNG_COMPRESSION = 1  # zlib level of the report's maps and the quicklook (fast; PIL's default is 6)


MAP_INCHES = (5.6, 5.0)  # one map of the report (448 x 400 px at DPI); the quicklook puts three side by side


MAX_PIXELS = 480  # quicklooks are subsampled to at most this many pixels a side (~ their size on the page)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_bytes(fig: Any) -> bytes:
    """Render a matplotlib figure to an RGB PNG (``dpi`` = :data:`DPI`) and close it.

    zlib level :data:`PNG_COMPRESSION`: the report's four maps encode in 0.35 s less than at
    PIL's default 6, for 9 % more bytes.
    """
    png = figure_png(fig, DPI, compress_level=PNG_COMPRESSION)
    _plt().close(fig)
    return png


def _png(fig: Any) -> str:
    """Render a matplotlib figure as :func:`_png_bytes` does, base64-encoded (for ``<img src>``)."""
    return base64.b64encode(_png_bytes(fig)).decode("ascii")


def image(b64: str, alt: str, caption: str = "") -> str:
    """Return an HTML ``<figure>`` showing a base64 PNG inline, with alt text and an optional caption.

    Parameters
    ----------
    b64 : str
        The PNG, base64-encoded (as the figure functions return it).
    alt : str
        The image's alt text (escaped here).
    caption : str
        A caption (escaped here); none when empty.

    Returns
    -------
    str
        The ``<figure>`` element.
    """
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _step(da: xr.DataArray) -> int:
    return max(1, int(np.ceil(max(da.sizes["y"], da.sizes["x"]) / MAX_PIXELS)))


def _thin(da: xr.DataArray, group: str, bands: tuple[str, ...] = ()) -> Thin:
    """Every n-th pixel (:func:`_step`) of ``da`` (variable of ``group``): an overview to compute."""
    return Thin(group, str(da.name), da.sizes["y"], da.sizes["x"], _step(da), bands)


def _extent(ds: xr.Dataset | xr.DataArray) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in the product's CRS, metres, for ``imshow``."""
    left, bottom, right, top = ds.rio.bounds()
    return left, right, bottom, top


def _rgb(
    cube: xr.Dataset, sample: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float, float], str] | None:
    """Make a 2–98 % stretched true-colour image (y, x, 3) of the composite, with its extent and CRS text.

    One read: the stretch comes from the same every-n-th-pixel ``sample`` the image shows
    (at most :data:`MAX_PIXELS` a side, ~150,000 pixels a band; :func:`product_maps`).
    """
    bands = display_bands(cube)
    sample = sample.astype("float32")
    try:
        lo, hi = percentile_limits(sample, bands)
    except EmptyRegion:
        return None
    return to_rgb(sample, lo, hi), _extent(cube), str(cube.rio.crs)


def _map_axes(ax: Any, extent: tuple[float, float, float, float], crs: str, title: str) -> None:
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(f"x (m, {crs})", fontsize=8)
    ax.set_ylabel("y (m)", fontsize=8)
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.tick_params(labelsize=7)


def _map_figure(draw: Callable[[Any, Any], None]) -> bytes:
    """Draw one map (:data:`MAP_INCHES` at :data:`DPI`: 448 x 400 px) and return it as PNG bytes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=MAP_INCHES, constrained_layout=True)
    draw(fig, ax)
    return _png_bytes(fig)


def quicklooks(
    store: Any, prefix: str = "", *, quicklook: str | Path | None = None, client: Any = None
) -> list[str]:
    """HTML figures: composite, clusters over it, probability over it, mask (those that exist).

    ``prefix`` selects a zone's groups in a multi-zone store (``"utm18n/"``). With
    ``quicklook``, the first three maps are also written there side by side as one PNG
    (:func:`write_quicklook`): the run's quicklook costs no second read or drawing.
    ``store`` and ``client``: as for :func:`product_maps`.
    """
    maps = product_maps(store, prefix, client=client)
    if quicklook is not None:
        write_quicklook(maps, quicklook)
    return [image(base64.b64encode(png).decode("ascii"), alt, caption) for png, alt, caption in maps]


def write_quicklook(maps: list[tuple[bytes, str, str]], path: str | Path) -> None:
    """Write the first three of ``maps`` (composite, clusters, probability) side by side as one PNG.

    ``maps`` are :func:`product_maps`' ``(PNG, alt, caption)``, all :data:`MAP_INCHES` at
    :data:`DPI`; the quicklook is their width added up (1344 x 400 px for three). Written to a
    temporary name, then renamed.

    Raises
    ------
    EmptyRegion
        If there is no map (the cube holds no valid reflectance).
    """
    from PIL import Image

    if not maps:
        raise EmptyRegion(f"no map to put in {path}: the cube holds no valid reflectance")
    tiles = [Image.open(io.BytesIO(png)).convert("RGB") for png, _, _ in maps[:3]]
    sheet = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="png", compress_level=PNG_COMPRESSION)


def product_maps(store: Any, prefix: str = "", *, client: Any = None) -> list[tuple[bytes, str, str]]:
    """Draw the maps of a zone's products: composite, clusters, probability, mask (those that exist).

    Each is ``(PNG bytes, alt text, caption)``; there are none without a cube to show.
    Every raster is read once, window by window, every n-th pixel (:data:`MAX_PIXELS` a
    side), with the mask's pixel counts in the same computation
    (:func:`.overview.compute_overviews`): on ``client``'s workers when given (``store`` must
    then be readable there: the run's store reader, not a local path), else on the default
    Dask scheduler. Only the overviews reach this process. Each map is :data:`MAP_INCHES` at
    :data:`DPI`. ``prefix`` selects a zone's groups (``"utm18n/"``).
    """
    cube = try_open_product(store, prefix + "cube")
    clusters = try_open_product(store, prefix + "clusters")
    seg = try_open_product(store, prefix + "segmentation")
    figs: list[tuple[bytes, str, str]] = []
    if cube is None or cube.get("reflectance") is None:
        return figs
    specs: dict[str, Thin | Count] = {
        "rgb": _thin(cube["reflectance"], prefix + "cube", tuple(display_bands(cube)))
    }
    if clusters is not None and "cluster_map" in clusters:
        specs["clusters"] = _thin(clusters["cluster_map"], prefix + "clusters")
    if seg is not None and "probability" in seg:
        specs["probability"] = _thin(seg["probability"], prefix + "segmentation")
    if seg is not None and "mask" in seg:
        specs["mask"] = _thin(seg["mask"], prefix + "segmentation")
        specs["mask_counts"] = Count(prefix + "segmentation", "mask", seg.sizes["y"], seg.sizes["x"], 1)
    got = compute_overviews(store, specs, client=client)
    rgb = _rgb(cube, got["rgb"])
    if rgb is None:
        return figs
    img, ext, crs = rgb
    bands = "B04, B03, B02" if cube is not None and "red" in cube["band"].values else "first 3 bands"

    def composite(fig: Any, ax: Any) -> None:
        ax.imshow(img, extent=ext)
        _map_axes(ax, ext, crs, f"composite ({bands})")

    figs.append(
        (_map_figure(composite), "RGB composite", f"Median composite, true colour, 2–98 % stretch; {crs}.")
    )

    if clusters is not None and "cluster_map" in clusters:
        cm = clusters["cluster_map"]
        ids = got["clusters"]  # read with CF masking: NaN where no cluster, as -1 in the store
        vals = np.ma.masked_less(
            np.where(np.isnan(ids), -1, ids).astype("int16") if ids.dtype.kind == "f" else ids, 0
        )
        k = int(clusters.sizes.get("cluster", int(vals.max()) + 1 if vals.count() else 1))

        def cluster_fig(fig: Any, ax: Any) -> None:
            ax.imshow(img, extent=ext)
            cmap = _plt().get_cmap("tab10" if k <= 10 else "tab20", k)
            im = ax.imshow(
                vals,
                extent=_extent(cm),
                cmap=cmap,
                vmin=-0.5,
                vmax=k - 0.5,
                alpha=0.55,
                interpolation="nearest",
            )
            cb = fig.colorbar(im, ax=ax, shrink=0.8, label="DEC cluster")
            if k <= 20:
                cb.set_ticks(range(k))
            _map_axes(ax, ext, crs, f"clusters (k = {k}, one cell a patch)")

        figs.append(
            (
                _map_figure(cluster_fig),
                "cluster map over composite",
                "DEC cluster of each patch (one cell a patch, centred on it) over the composite.",
            )
        )

    if seg is not None and "probability" in seg:
        prob = seg["probability"]

        def prob_fig(fig: Any, ax: Any) -> None:
            ax.imshow(img, extent=ext)
            im = ax.imshow(got["probability"], extent=_extent(prob), cmap="magma", vmin=0, vmax=1, alpha=0.6)
            fig.colorbar(im, ax=ax, shrink=0.8, label="probability")
            _map_axes(ax, ext, crs, "U-Net agricultural-land probability")

        figs.append(
            (
                _map_figure(prob_fig),
                "probability over composite",
                "U-Net probability of agricultural land, blended windows, over the composite.",
            )
        )

    if seg is not None and "mask" in seg:
        mask = seg["mask"]
        res_x, res_y = (abs(v) for v in mask.rio.resolution())
        arable, valid = got["mask_counts"]
        ha = arable * res_x * res_y / 1e4
        share = 100 * arable / valid if valid else float("nan")
        thr = mask.attrs.get("threshold", "?")

        def mask_fig(fig: Any, ax: Any) -> None:
            from matplotlib.colors import ListedColormap
            from matplotlib.patches import Patch

            colours = {"other": "#e0e0e0", "agricultural": "#558b2f"}
            cmap = ListedColormap(list(colours.values()))
            ax.imshow(
                got["mask"],
                extent=_extent(mask),
                cmap=cmap,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.legend(
                handles=[Patch(color=c, label=lab) for lab, c in reversed(colours.items())],
                loc="lower right",
                fontsize=8,
            )
            _map_axes(ax, ext, crs, f"mask (p ≥ {thr}): {ha:,.0f} ha, {share:.0f} %")

        figs.append(
            (
                _map_figure(mask_fig),
                "agricultural land mask",
                f"Mask: {arable:,} pixels of {res_x:g} × {res_y:g} m = {ha:,.1f} ha agricultural "
                f"({share:.1f} % of {valid:,} valid pixels).",
            )
        )
    return figs


def timings_chart(rows: list[dict[str, Any]]) -> str | None:
    """Draw the stages' wall-clock times as a horizontal bar chart, coloured by status.

    Parameters
    ----------
    rows : list of dict
        One per stage: ``stage``, ``seconds`` (None: not timed, left out) and ``status``
        (a key of :data:`STATUS_COLOURS`).

    Returns
    -------
    str or None
        The chart as a base64 PNG; None when no stage was timed.
    """
    rows = [r for r in rows if r["seconds"] is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.0), constrained_layout=True)
    names = [r["stage"] for r in rows][::-1]
    secs = [r["seconds"] for r in rows][::-1]
    colours = [STATUS_COLOURS.get(r["status"], "#9e9e9e") for r in rows][::-1]
    ax.barh(names, secs, color=colours)
    for i, s in enumerate(secs):
        ax.text(s, i, f" {s:.1f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds (wall clock)")
    ax.set_xlim(0, max(secs) * 1.18 or 1)
    ax.tick_params(labelsize=8)
    return _png(fig)


def model_meta(model: Path) -> dict[str, Any]:
    """Read a model's metadata sidecar, or {} (logged) when it is missing or damaged."""
    if not sidecar_path(model).is_file():
        return {}
    try:
        return read_sidecar(model)
    except CorruptInput as e:
        log.warning("%s; skipped", e)
        return {}


def training_chart(models: Path) -> str | None:
    """CAE loss and U-Net loss / IoU per epoch, from the models' JSON sidecars."""
    cae = model_meta(models / "cae.keras") or model_meta(models / "encoder.keras")
    cae_loss = (cae.get("history") or {}).get("loss") or []
    unet = model_meta(models / "unet.keras")
    per_epoch = unet.get("per_epoch") or []
    if not cae_loss and not per_epoch:
        return None
    plt = _plt()
    panels = (["cae"] if cae_loss else []) + (["unet_loss", "unet_iou"] if per_epoch else [])
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 3.4), constrained_layout=True, squeeze=False
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "cae":
            ax.plot(range(1, len(cae_loss) + 1), cae_loss, marker="o", label="train MSE")
            ax.set_title(f"CAE ({cae.get('model', '?')}) reconstruction loss", fontsize=10)
            ax.set_ylabel("MSE")
        else:
            epochs = [e.get("epoch", i + 1) for i, e in enumerate(per_epoch)]
            keys = ["loss", "val_loss"] if panel == "unet_loss" else ["masked_iou", "val_masked_iou", "iou"]
            labels = {
                "loss": "train loss",
                "val_loss": "validation loss",
                "masked_iou": "train IoU",
                "val_masked_iou": "validation IoU",
                "iou": "validation IoU (thresholded)",
            }
            for key in keys:
                ys = [e.get(key) for e in per_epoch]
                if any(y is not None for y in ys):
                    ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=labels[key])
            ax.set_title(
                f"U-Net ({unet.get('model', '?')}) " + ("loss" if panel == "unet_loss" else "IoU"),
                fontsize=10,
            )
            if panel == "unet_iou":
                ax.set_ylim(0, 1)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.tick_params(labelsize=8)
    return _png(fig)


STATUS_COLOURS = {"done": "#2e7d32", "failed": "#c62828", "running": "#ef6c00", "not run": "#9e9e9e"}
