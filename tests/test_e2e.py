"""End-to-end: the demo pipeline (short schedules) on a real multi-process Dask cluster."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from agriland_scale.errors import OutputExists
from agriland_scale.pipeline.runner import run
from agriland_scale.store import reader

from .conftest import ORIGIN_X, ORIGIN_Y, SIZE


@pytest.mark.slow
def test_products_present_and_georeferenced(demo_run):
    cfg, out, record = demo_run
    store = reader(out)
    tree = xr.open_datatree(store, engine="zarr")
    assert {"cube", "patches", "embeddings", "clusters", "labels", "segmentation"} <= set(tree.children)
    for group in ("cube", "clusters", "labels", "segmentation"):
        ds = xr.open_zarr(store, group=group)
        assert ds.rio.crs is not None and ds.rio.crs.to_epsg() == 32618, group
        for name in ds.data_vars:
            if {"y", "x"} <= set(ds[name].dims):
                assert ds[name].rio.crs.to_epsg() == 32618, (group, name)
    seg = xr.open_zarr(store, group="segmentation")
    t = seg.rio.transform()
    assert (t.a, t.e, t.c, t.f) == (10.0, -10.0, ORIGIN_X, ORIGIN_Y)
    assert seg.sizes == {"y": SIZE, "x": SIZE}
    p = seg["probability"].values
    assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
    assert set(np.unique(seg["mask"].values)) <= {0, 1}
    left, b, r, tp = seg.rio.bounds()
    assert (left, b, r, tp) == (ORIGIN_X, ORIGIN_Y - 10 * SIZE, ORIGIN_X + 10 * SIZE, ORIGIN_Y)
    # the raster the U-Net learnt from (read by the training task from the store) is the one
    # published beside the probability, on the same grid
    lab = xr.open_zarr(store, group="labels")["label"]
    assert lab.dtype == np.uint8 and lab.rio.transform() == t
    np.testing.assert_array_equal(lab.values, seg["training_label"].values)
    assert set(np.unique(lab.values)) == {0, 1, 255}


@pytest.mark.slow
def test_embeddings_and_clusters_as_configured(demo_run):
    cfg, out, record = demo_run
    store = reader(out)
    emb = xr.open_zarr(store, group="embeddings")["embedding"]
    assert emb.shape == (49, cfg.embed.embedding_dim) and np.isfinite(emb.values).all()
    cl = xr.open_zarr(store, group="clusters")
    assert cl["soft"].shape == (49, cfg.cluster.k)
    np.testing.assert_allclose(cl["soft"].values.sum(1), 1, rtol=1e-5)
    assert cl["cluster_map"].shape == (7, 7)
    assert cl["cluster_map"].rio.crs.to_epsg() == 32618
    m = cl["cluster_map"].rio.transform()
    assert (m.a, m.c, m.f) == (1280.0, ORIGIN_X + 640, ORIGIN_Y - 640)
    np.testing.assert_array_equal(cl["cluster_map"].values.ravel(), cl["labels"].values)


@pytest.mark.slow
def test_cogs_models_and_run_record(demo_run):
    cfg, out, record = demo_run
    for name in ("cluster_map", "probability", "mask"):
        with rasterio.open(out / "cog" / f"{name}.tif") as ds:
            assert ds.crs.to_epsg() == 32618
    seg = xr.open_zarr(reader(out), group="segmentation", consolidated=False)["probability"].values
    with rasterio.open(out / "cog" / "probability.tif") as ds:  # compact: uint8 x 1/254, 255 nodata
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255 and ds.scales[0] == pytest.approx(1 / 254)
        assert ds.overviews(1) == [2]
        raw = ds.read(1)
    assert np.array_equal(raw == 255, np.isnan(seg))
    np.testing.assert_allclose(raw[raw != 255] / 254, seg[~np.isnan(seg)], atol=0.5 / 254 + 1e-6)
    assert (out / "quicklook.png").stat().st_size > 10_000
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["name"] == cfg.name
    assert set(saved["stages"].values()) == {"done"}
    assert saved["inputs"]["items"][0]["id"] == "S2_L1C_18S_virginia_demo_window"
    assert "xarray" in saved["versions"] and saved["timings_s"]["total"] > 0
    assert saved["dashboard"].startswith("http")
    # one inference precision for the run (bfloat16 only on CPUs that compute it natively),
    # recorded with the products it made
    from agriland_scale.models.worker import cpu_has_bfloat16

    assert saved["precision"] == dict.fromkeys(
        ("embeddings", "segmentation"), "mixed_bfloat16" if cpu_has_bfloat16() else "float32"
    )
    for group, var in (("segmentation", "probability"), ("embeddings", "embedding")):
        assert xr.open_zarr(reader(out), group=group)[var].attrs["precision"] == saved["precision"][group]
    run_logs = sorted((out / "logs").glob("run-*.log"))
    assert len(run_logs) == 1 and "[embeddings]" in run_logs[0].read_text()
    assert len(list((out / "logs").glob("dask-performance-*.html"))) == 1
    for m in ("encoder.keras", "unet.keras"):
        assert (out / "models" / m).exists() and (out / "models" / f"{m}.json").exists()


@pytest.mark.slow
def test_field_polygons_match_the_mask(demo_run):
    """segment.vectorize: the mask's agricultural pixels as GeoParquet polygons in the zone's CRS."""
    import geopandas as gpd

    from agriland_scale.store import open_product

    cfg, out, record = demo_run
    fields = gpd.read_parquet(out / "vector" / "fields.parquet")
    mask = open_product(out, "segmentation")["mask"].values
    assert fields.crs.to_epsg() == 32618
    np.testing.assert_allclose(fields["area_m2"].sum(), (mask == 1).sum() * 100.0)
    saved = json.loads((out / "run.json").read_text())
    assert saved["vector"][next(iter(saved["vector"]))]["polygons"] == len(fields)


@pytest.mark.slow
def test_output_folder_of_another_run_is_refused(demo_run, demo_cfg):
    _, out, _ = demo_run
    other = demo_cfg.with_overrides(name="another-run")
    with pytest.raises(OutputExists, match="holds another run"):
        run(other, out)
    cli = subprocess.run(
        [Path(sys.executable).parent / "agriland", "demo", "--out", str(out)], capture_output=True, text=True
    )
    # the same run name with other settings (the full demo schedule): finished stages are not
    # silently redone or mixed; the error names the first changed key and the flag to use
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
    assert "the config differs" in cli.stderr and "--force" in cli.stderr and "--overwrite" in cli.stderr


@pytest.mark.slow
def test_same_seed_same_outputs_across_worker_counts(demo_run, tmp_path):
    """The session run (external cluster, 2 workers) and a run of the same config on a
    LocalCluster with 1 worker give identical embeddings, clusters and probabilities.

    The second run applies the session run's trained models (training runs in one task, on
    one worker, whatever the cluster): what differs between the runs is how the cube,
    embedding, clustering and segmentation blocks are spread over workers and threads."""
    cfg, out, record = demo_run
    one = cfg.with_overrides(
        **{
            "runtime.n_workers": 1,
            "runtime.threads_per_worker": 2,
            "runtime.dashboard_address": ":0",
            "embed.model": str(out / "models" / "encoder.keras"),
            "segment.model": str(out / "models" / "unet.keras"),
        }
    )
    again = run(one, tmp_path / "again")
    workers = {again["scheduler"], record["scheduler"]}
    assert len(workers) == 2  # really two different clusters
    for group, var in [
        ("embeddings", "embedding"),
        ("clusters", "labels"),
        ("clusters", "soft"),
        ("segmentation", "probability"),
    ]:
        a = xr.open_zarr(reader(out), group=group)[var].values
        b = xr.open_zarr(reader(tmp_path / "again"), group=group)[var].values
        np.testing.assert_array_equal(a, b, err_msg=f"{group}/{var}")


@pytest.mark.slow
def test_open_run_gives_every_product_with_its_crs(demo_run):
    """``agriland_scale.open_run`` (the notebook entry point) opens the run as one DataTree."""
    import agriland_scale as ag

    _, out, _ = demo_run
    tree = ag.open_run(out)
    assert {"cube", "patches", "embeddings", "clusters", "segmentation"} <= set(tree.children)
    for group in ("cube", "clusters", "segmentation"):
        assert tree[group].to_dataset().rio.crs.to_epsg() == 32618, group
    assert tree["clusters"]["cluster_map"].dtype == "int16"  # ids kept, -1 where not clustered
    np.testing.assert_array_equal(
        tree["segmentation"]["probability"].values,
        ag.open_run(out / "agriland.icechunk")["segmentation"]["probability"].values,
    )
