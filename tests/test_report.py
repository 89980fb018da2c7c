"""What users see of a run: the HTML report, the output STAC, the run summary, the notebook.

The slow tests describe the real demo run (``demo_run``: the whole pipeline with short
schedules on a real Dask cluster); the fast ones use small hand-made run folders.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from agriland_scale.errors import CorruptInput, EmptyRegion, OutputError
from agriland_scale.publish.inspect import format_summary, summarise_run
from agriland_scale.publish.report import write_report
from agriland_scale.publish.stac import write_stac

ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = (
    "search",
    "cube",
    "patches",
    "cae",
    "embeddings",
    "clusters",
    "unet",
    "segmentation",
    "publish",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def published(demo_run):
    """The demo run's folder with the report and the STAC catalog written (as publish will)."""
    cfg, out, record = demo_run
    return cfg, Path(out), record, write_report(out), write_stac(out)


def _images(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)


# --- fast: folders that are not (complete) runs -----------------------------------------------


def test_not_a_run_folder_is_refused(tmp_path):
    for call in (summarise_run, write_report, write_stac):
        with pytest.raises(CorruptInput, match="run.json"):
            call(tmp_path)
    with pytest.raises(CorruptInput, match="not a folder"):
        summarise_run(tmp_path / "missing")


def test_invalid_run_json_is_refused(tmp_path):
    (tmp_path / "run.json").write_text('{"config": {"name": "x"}, "stages": {')
    with pytest.raises(OutputError, match="run.json is damaged .*JSONDecodeError"):
        summarise_run(tmp_path)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(OutputError, match="it holds a JSON list, not an object"):
        write_report(tmp_path)


def test_run_that_failed_at_search(tmp_path):
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "config": {"name": "broken", "search": {"bbox": [1, 2, 3, 4]}},
                "stages": {"search": "failed"},
                "timings_s": {"search": 0.5, "total": 0.7},
                "error": "search: no STAC API answers at http://127.0.0.1:9",
            }
        )
    )
    s = summarise_run(tmp_path)
    assert [r["status"] for r in s["stages"]] == ["failed"] + ["not run"] * (len(STAGE_NAMES) - 1)
    assert s["region"]["shape"] is None and s["items"] == [] and s["models"] == []
    assert "no STAC API answers" in format_summary(s)
    page = write_report(tmp_path).read_text()
    assert "Run failed" in page and "no STAC API answers" in page
    assert page.count("not run") >= 6 and "No product written yet" in page
    with pytest.raises(CorruptInput):
        write_stac(tmp_path)
    assert not (tmp_path / "stac").exists()


# --- slow: the real demo run -----------------------------------------------------------------


@pytest.mark.slow
def test_report_is_self_contained(published):
    cfg, out, record, report, _ = published
    assert report == out / "report.html"
    page = report.read_text()
    assert 'src="http' not in page and "<script" not in page and "<link " not in page
    assert "stylesheet" not in page and "@import" not in page
    imgs = _images(page)
    # composite, clusters, probability, mask, stage timings, training curves
    assert len(imgs) >= 6
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert report.stat().st_size < 3 * 2**20
    assert record["inputs"]["items"][0]["id"] in page
    assert cfg.name in page and record["dashboard"] in page
    for stage in STAGE_NAMES:
        assert f"<td>{stage}</td>" in page
    assert page.count(">done<") == len(STAGE_NAMES)
    # the mask's area in the report is the count of agricultural pixels of the COG
    with rasterio.open(out / "cog" / "mask.tif") as src:
        ha = (src.read(1) == 1).sum() * abs(src.transform.a * src.transform.e) / 1e4
    assert f"{ha:,.1f} ha agricultural" in page
    # validation metrics of the U-Net, from its sidecar
    assert f"{record['unet']['validation_metrics']['iou']:.3f}" in page


@pytest.mark.slow
def test_report_shows_gallery_when_present_and_is_idempotent(published, tmp_path):
    _, out, _, report, _ = published
    before = report.read_text()
    assert write_report(out).read_text() == before
    gallery = out / "clusters" / "gallery.png"  # the pipeline writes the cluster products
    assert base64.b64encode(gallery.read_bytes()).decode() in before
    assert 'alt="cluster gallery"' in before and 'alt="embedding map"' in before
    run = tmp_path / "run"  # the same run without them: the report leaves them out
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("*.keras", "stac", "report.html", "clusters"))
    page = write_report(run).read_text()
    assert len(_images(page)) <= len(_images(before)) - 2
    assert 'alt="cluster gallery"' not in page and 'alt="embedding map"' not in page


def test_report_embeds_the_maps_the_publish_stage_drew(published, tmp_path):
    """The publish stage draws the report's maps while the workers draw their pictures; the
    report embeds them as given, and they are the maps the report would draw itself."""
    from agriland_scale.publish.figures import image, quicklooks

    _, out, _, report, _ = published
    drawn = quicklooks(out, "")
    assert write_report(out, product_figures={"": drawn}).read_text() == report.read_text()
    marker = image(base64.b64encode(PNG_SIGNATURE).decode(), "given map", "drawn by publish")
    page = write_report(out, product_figures={"": [marker]}).read_text()
    assert 'alt="given map"' in page and 'alt="RGB composite"' not in page  # not drawn again


def test_the_quicklook_is_the_reports_first_three_maps_side_by_side(published, tmp_path):
    """The publish stage writes ``quicklook.png`` from the maps it draws for the report (no
    second read or drawing): composite, clusters, probability, pixel for pixel."""
    import io

    from PIL import Image

    from agriland_scale.publish.figures import product_maps, write_quicklook

    _, out, _, _, _ = published
    maps = product_maps(out, "")
    assert [alt for _, alt, _ in maps] == [
        "RGB composite",
        "cluster map over composite",
        "probability over composite",
        "agricultural land mask",
    ]
    tiles = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png, _, _ in maps[:3]]
    assert {t.shape for t in tiles} == {(400, 448, 3)}
    sheet = Image.open(out / "quicklook.png")
    assert sheet.mode == "RGB" and sheet.size == (3 * 448, 400)
    np.testing.assert_array_equal(np.asarray(sheet), np.concatenate(tiles, axis=1))
    assert tiles[0].std() > 10 and not np.array_equal(tiles[0], tiles[2])  # real maps, not blanks
    with pytest.raises(EmptyRegion, match="no map to put in .*cube holds no valid reflectance"):
        write_quicklook([], tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()
    write_report(out)


@pytest.mark.slow
def test_report_of_a_run_that_failed_at_segmentation(published, tmp_path):
    _, out, _, _, _ = published
    run = tmp_path / "run"
    shutil.copytree(
        out,
        run,
        ignore=shutil.ignore_patterns("*.keras", "unet*", "stac", "cog", "report.html", "quicklook.png"),
    )
    from agriland_scale.store.resume import Products

    Products(run).discard("segmentation")  # as a --force segmentation that then failed leaves it
    rec = json.loads((run / "run.json").read_text())
    rec["stages"]["segmentation"] = "failed"
    rec["stages"].pop("publish")
    rec["error"] = "segmentation: worker killed"
    for key in ("unet", "products"):
        rec.pop(key, None)
    (run / "run.json").write_text(json.dumps(rec))
    page = write_report(run).read_text()
    assert "worker killed" in page and ">failed<" in page and ">not run<" in page
    assert 'alt="RGB composite"' in page and 'alt="cluster map over composite"' in page
    assert 'alt="probability over composite"' not in page and 'alt="agricultural land mask"' not in page
    import pystac

    coll = pystac.Collection.from_file(str(write_stac(run)))
    assert [i.id.rsplit("-", 1)[-1] for i in coll.get_items()] == ["zarr"]
    s = summarise_run(run)
    assert {r["stage"]: r["status"] for r in s["stages"]}["publish"] == "not run"
    assert not {p["path"]: p["exists"] for p in s["products"]}["cog/mask.tif"]


@pytest.mark.slow
def test_stac_catalog_reads_back(published):
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension
    from pystac.validation import validate_dict

    cfg, out, record, _, coll_path = published
    assert coll_path == out / "stac" / "collection.json"
    coll = pystac.Collection.from_file(str(coll_path))
    items = {i.id: i for i in coll.get_items()}
    assert set(items) == {f"{cfg.name}-{p}" for p in ("cluster_map", "probability", "mask", "zarr")}
    west, south, east, north = cfg.search.bbox
    tol = 2 * cfg.cube.resolution / 111_320 / np.cos(np.radians(north))  # two pixels, in degrees
    source_id = record["inputs"]["items"][0]["id"]
    for item_id, item in items.items():
        proj = ProjectionExtension.ext(item)
        assert proj.epsg == 32618 and item.properties["proj:code"] == "EPSG:32618"
        b = item.bbox
        # every product lies in the region (within two pixels: the grid snaps to the item's pixels)
        assert b[0] >= west - tol and b[1] >= south - tol and b[2] <= east + tol and b[3] <= north + tol
        if not item_id.endswith("cluster_map"):  # one cell a patch centre: inset by half a stride
            assert b[0] <= west + tol and b[1] <= south + tol and b[2] >= east - tol and b[3] >= north - tol
        assert item.geometry["type"] == "Polygon"
        assert item.datetime is None and item.common_metadata.start_datetime is not None
        for asset in item.assets.values():
            assert not Path(asset.href).is_absolute()
            assert Path(asset.get_absolute_href()).exists()
        derived = item.get_links("derived_from")
        assert [lk.title for lk in derived] == [source_id]
        src = pystac.Item.from_file(derived[0].get_absolute_href())
        assert src.id == source_id
        try:  # full validation fetches the extension schemas by URL
            item.validate()
        except pystac.validation.GetSchemaError:
            d = item.to_dict()
            d["stac_extensions"] = []
            validate_dict(d)  # core schema only: pystac bundles it
    prob = items[f"{cfg.name}-probability"]
    assert prob.properties["proj:shape"] == [record["cube"]["shape"]["y"], record["cube"]["shape"]["x"]]
    assert prob.properties["proj:transform"] == record["cube"]["transform"]
    assert prob.properties["proj:bbox"] == record["cube"]["bounds"]
    expect = {
        "cluster_map": ("uint8", 255, None),
        "probability": ("uint8", 255, 1 / 254),
        "mask": ("uint8", 255, None),
    }
    for product, (dtype, nodata, scale) in expect.items():
        asset = items[f"{cfg.name}-{product}"].assets["cog"]
        assert asset.media_type == pystac.MediaType.COG
        band = RasterExtension.ext(asset).bands[0]
        assert band.data_type == dtype and band.nodata == nodata
        assert band.scale == (pytest.approx(scale) if scale else None)  # the probability's 1/254
        with rasterio.open(asset.get_absolute_href()) as src:
            assert src.dtypes[0] == dtype
            assert items[f"{cfg.name}-{product}"].properties["proj:shape"] == [src.height, src.width]
    zarr_asset = prob.assets["zarr"]
    assert zarr_asset.media_type == "application/vnd.zarr+icechunk"
    import xarray as xr

    from agriland_scale.store import reader

    kwargs = {
        k: v for k, v in zarr_asset.extra_fields["agriland:icechunk"]["open_kwargs"].items() if k != "engine"
    }
    seg = xr.open_zarr(reader(zarr_asset.get_absolute_href()), **kwargs)
    assert "probability" in seg and seg.rio.crs.to_epsg() == 32618
    assert Path(items[f"{cfg.name}-zarr"].assets["zarr"].get_absolute_href()) == out / "agriland.icechunk"
    # idempotent: same catalog, no leftovers
    before = {p.relative_to(out): p.read_text() for p in (out / "stac").rglob("*.json")}
    write_stac(out)
    assert {p.relative_to(out): p.read_text() for p in (out / "stac").rglob("*.json")} == before


@pytest.mark.slow
def test_summarise_run(published):
    import xarray as xr

    cfg, out, record, _, _ = published
    s = summarise_run(out)
    from agriland_scale.store import reader

    cube = xr.open_zarr(reader(out), group="cube", consolidated=False)
    assert (
        s["region"]["shape"]
        == {d: cube.sizes[d] for d in ("band", "y", "x")}
        == {"band": 4, "y": 1024, "x": 1024}
    )
    assert s["region"]["crs"] == "EPSG:32618" and s["region"]["resolution_m"] == cfg.cube.resolution
    assert s["region"]["bbox"] == list(cfg.search.bbox)
    assert [(r["stage"], r["status"]) for r in s["stages"]] == [(n, "done") for n in STAGE_NAMES]
    assert all(r["seconds"] > 0 for r in s["stages"])
    assert [i["id"] for i in s["items"]] == [i["id"] for i in record["inputs"]["items"]]
    sizes = {p["path"]: p["bytes"] for p in s["products"]}
    assert sizes["cog/mask.tif"] == (out / "cog" / "mask.tif").stat().st_size
    assert sizes["agriland.icechunk"] > sizes["cog/mask.tif"] > 0
    models = {m["file"] for m in s["models"]}
    assert {"models/cae.keras", "models/encoder.keras", "models/unet.keras"} <= models
    text = format_summary(s)
    for stage in STAGE_NAMES:
        assert stage in text
    assert record["inputs"]["items"][0]["id"] in text
    assert "cube (band 4, y 1024, x 1024)" in text
    json.dumps(s)  # plain data


@pytest.mark.slow
def test_notebook_runs_on_the_demo_output(published, monkeypatch):
    import time

    import nbclient
    import nbformat

    _, out, _, _, _ = published
    path = ROOT / "notebooks" / "explore_run.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "stored with outputs"
    monkeypatch.setenv("AGRILAND_RUN", str(out))
    t0 = time.perf_counter()
    nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    print(f"notebook executed on the demo output in {time.perf_counter() - t0:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    cell = next(c for c in nb.cells if "hectares" in c.metadata.get("tags", []))
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    def value(name: str) -> float:
        return float(re.search(rf"^{name} = ([0-9.]+)$", text, re.M).group(1))

    with rasterio.open(out / "cog" / "mask.tif") as src:
        pixel_ha = abs(src.transform.a * src.transform.e) / 1e4
        mask = src.read(1)
    with rasterio.open(out / "cog" / "probability.tif") as src:  # uint8 x scale, 255 = nodata
        raw = src.read(1, masked=True)
        prob = (raw.astype("float64") * src.scales[0]).filled(np.nan)
    assert value("area_ha_region") == pytest.approx(1024 * 1024 * 0.01, abs=0.05)
    assert (mask != 255).sum() * pixel_ha == pytest.approx(1024 * 1024 * 0.01)
    # the short test schedule may leave the thresholded mask empty; the expected area is positive
    # printed to 0.1 ha: half a unit, and the float sums' last bits (10482.55 printed 10482.5)
    assert value("arable_ha_region") == pytest.approx((mask == 1).sum() * pixel_ha, abs=0.051)
    assert value("expected_arable_ha_region") == pytest.approx(np.nansum(prob) * pixel_ha, abs=0.051)
    assert value("expected_arable_ha_region") > 0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 5  # composite, clusters, probability, cluster gallery, embedding map


@pytest.mark.slow
def test_report_renders_in_headless_chromium(published, tmp_path):
    """The report as a browser draws it (Debian's Chromium, headless; skipped where it is not
    installed): a screenshot that is not blank, and a DOM whose images are all embedded."""
    import subprocess

    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    _, out, _, report, _ = published
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    png = tmp_path / "report.png"
    page = (out / "report.html").resolve().as_uri()
    subprocess.run(
        [chromium, *flags, f"--screenshot={png}", "--window-size=1280,2400", page],
        check=True,
        capture_output=True,
        timeout=120,
    )
    img = np.asarray(Image.open(png).convert("L"), dtype="float32")
    assert img.shape == (2400, 1280) and img.std() > 20  # drawn: text, images, tables
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    srcs = _images(dom)
    assert len(srcs) >= 4 and all(src.startswith("data:image/") for src in srcs)
    assert "dashboard" in dom.lower() and "stage" in dom.lower()


def test_report_links_the_files_and_says_which_epoch_its_iou_is_of(tmp_path):
    """Links to the COGs, the STAC collection and the store; the validation IoU's epoch (the kept one)."""
    from agriland_scale.models.files import write_sidecar

    (tmp_path / "cog").mkdir()
    for name in ("cluster_map.tif", "probability.tif"):
        (tmp_path / "cog" / name).write_bytes(b"\0" * 1024)
    (tmp_path / "stac").mkdir()
    (tmp_path / "stac" / "collection.json").write_text("{}")
    (tmp_path / "agriland.icechunk").mkdir()
    (tmp_path / "models").mkdir()
    per_epoch = [
        {"epoch": e, "loss": 0.5, "val_loss": v, "iou": i}
        for e, v, i in ((1, 0.6, 0.5), (2, 0.3, 0.805), (3, 0.3, 0.7), (4, 0.4, 0.62))
    ]
    write_sidecar(
        str(tmp_path / "models" / "unet.keras"),
        {
            "model": "unet",
            "epochs": 10,
            "steps_per_epoch": 4,
            "batch_size": 2,
            "per_epoch": per_epoch,
            "validation_metrics": {"iou": 0.805, "f1": 0.89},
            "validation_windows": 3,
            "train_windows": 9,
            "validation": {"side": "east", "split_px": 100},
        },
    )
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "config": {"name": "files"},
                "stages": {s: "done" for s in STAGE_NAMES},
                "timings_s": {"total": 1.0},
                "products": {
                    "zarr": str(tmp_path / "agriland.icechunk"),
                    "stac": str(tmp_path / "stac/collection.json"),
                    "cogs": [str(tmp_path / "cog" / "probability.tif")],
                },
            }
        )
    )
    page = write_report(tmp_path).read_text()
    links = re.findall(r'<a href="([^"]*)"', page)
    assert {
        "cog/cluster_map.tif",
        "cog/probability.tif",
        "stac/collection.json",
        "agriland.icechunk/",
    } <= set(links)
    assert not [x for x in links if x.startswith("/")]  # relative to the run folder: the folder can move
    text = re.sub(r"<[^>]+>", "", page)
    # epoch 2 has the lowest validation loss (epoch 3 ties, later): its weights are kept
    assert (
        "IoU 0.805 at epoch 2 (best checkpoint: lowest validation loss) of 4 run (10 scheduled, stopped early)"
        in text
    )
    assert "the last epoch (4) ended at IoU 0.620" in text
