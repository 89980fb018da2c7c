"""Blended window inference on the real cube with a real (small, untrained) Keras U-Net."""

import warnings

import numpy as np
import pytest

from agriland_scale.models.segment import predict_block
from agriland_scale.models.unet import build_unet


@pytest.fixture(scope="module")
def small_unet():
    import keras

    keras.utils.set_random_seed(1)
    return build_unet("plain", 64, 3, weights="none", filters=(4, 8, 16))


@pytest.fixture(scope="module")
def region(cube):
    sub = cube.isel(y=slice(0, 200), x=slice(0, 160))
    return (sub["reflectance"].sel(band=["red", "green", "blue"]).values, sub["clear_count"].values)


def test_tiled_equals_whole_image(small_unet, region):
    refl, clear = region
    kw = dict(window=64, overlap=16, reflectance_max=0.3, batch_size=32)
    whole = predict_block(small_unet, refl, clear, 0, 0, 200, 160, **kw)
    tiled = np.zeros_like(whole)
    for gy in range(0, 200, 48):
        for gx in range(0, 160, 48):
            h, w = min(48, 200 - gy), min(48, 160 - gx)
            tiled[gy : gy + h, gx : gx + w] = predict_block(small_unet, refl, clear, gy, gx, h, w, **kw)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert np.isfinite(whole).all() and 0 <= whole.min() and whole.max() <= 1


def test_nodata_stays_nodata(small_unet, region):
    refl, clear = region
    clear = clear.copy()
    clear[10:20, 30:40] = 0
    p = predict_block(
        small_unet, refl, clear, 0, 0, 200, 160, window=64, overlap=16, reflectance_max=0.3, batch_size=32
    )
    assert np.isnan(p[10:20, 30:40]).all() and np.isfinite(p[30:, :]).all()


def test_cog_overviews_crs_nodata(small_unet, cube, tmp_path):
    """Probability and mask COGs from a real prediction over the whole 1024 px demo cube."""
    import rasterio
    import xarray as xr

    from agriland_scale.publish.cog import write_cog
    from agriland_scale.store import write_georef

    refl = cube["reflectance"].sel(band=["red", "green", "blue"]).values
    clear = cube["clear_count"].values.copy()
    clear[:100, :300] = 0  # a nodata corner
    h, w = clear.shape
    p = predict_block(
        small_unet, refl, clear, 0, 0, h, w, window=64, overlap=16, reflectance_max=0.3, batch_size=32
    )
    prob = xr.DataArray(p, dims=("y", "x"), coords={"y": cube.y, "x": cube.x})
    ds = xr.Dataset(
        {
            "probability": prob,
            "mask": xr.where(prob.isnull(), 255, prob >= float(np.nanmedian(p))).astype("uint8"),
        }
    )
    ds = write_georef(ds, cube.rio.crs)
    write_cog(ds["probability"], tmp_path / "probability.tif", nodata=np.nan)
    write_cog(ds["mask"], tmp_path / "mask.tif", nodata=255)
    write_cog(ds["mask"], tmp_path / "mask_mode.tif", nodata=255, resampling="mode")
    assert ds["probability"].dtype == "float32" and np.isnan(ds["probability"].values[:100, :300]).all()

    with rasterio.open(tmp_path / "probability.tif") as src:
        assert src.overviews(1) == [2]  # 1024 px, 512 px COG tiles
        assert src.crs == cube.rio.crs and src.transform == cube.rio.transform()
        assert np.isnan(src.nodata) and src.dtypes[0] == "float32"
        np.testing.assert_array_equal(src.read(1), p)
    with rasterio.open(tmp_path / "probability.tif", overview_level=0) as ov:
        o = ov.read(1)
    blocks = p.reshape(h // 2, 2, w // 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN block
        expected = np.nanmean(blocks, axis=(1, 3))  # average, nodata left out
    np.testing.assert_allclose(o, expected, atol=1e-6)  # NaN where the whole block is nodata

    for name in ("mask", "mask_mode"):
        with rasterio.open(tmp_path / f"{name}.tif") as src:
            assert src.overviews(1) == [2] and src.nodata == 255 and src.crs == cube.rio.crs
            full = src.read(1)
        with rasterio.open(tmp_path / f"{name}.tif", overview_level=0) as ov:
            o = ov.read(1)
        assert set(np.unique(o)) <= {0, 1, 255}  # categories only, nothing interpolated
        mb = full.reshape(h // 2, 2, w // 2, 2)
        assert ((mb == o[:, None, :, None]).any(axis=(1, 3))).all()  # each value from its block
        assert (o[:50, :150] == 255).all()
        if name == "mask_mode":  # a value held by 3 of a block's 4 pixels wins
            for v in (0, 1):
                major = (mb == v).sum(axis=(1, 3)) >= 3
                assert major.any() and (o[major] == v).all()


def test_segment_region_on_a_cluster_matches_predict_block(small_unet, cube, tmp_path):
    """Two-layer graph (each window predicted once) on a real LocalCluster, 3 x 3 blocks of
    384 px with partial ones, written to Zarr: equals a whole-image predict_block."""
    import xarray as xr

    from agriland_scale.config.schema import RuntimeConfig
    from agriland_scale.models.files import write_sidecar
    from agriland_scale.models.segment import segment_region
    from agriland_scale.pipeline.runtime import dask_client
    from agriland_scale.store import open_product, write_group

    bands = ["red", "green", "blue"]
    model_path = str(tmp_path / "unet.keras")
    small_unet.save(model_path)
    write_sidecar(
        model_path,
        {"task": "segmentation", "bands": bands, "normalisation": {"reflectance_max": 0.3}, "patch_size": 64},
    )
    local = cube.compute().copy(deep=True)  # the session fixture stays as it is
    local["clear_count"].values[200:400, 100:700] = 0  # nodata across block borders
    local["clear_count"].values[768:, 768:] = 0  # a whole block without data
    store = str(tmp_path / "products.zarr")
    write_group(local.chunk({"y": 256, "x": 256}), store, "cube")
    kw = dict(window=64, overlap=16, reflectance_max=0.3, batch_size=32)
    h, w = local.sizes["y"], local.sizes["x"]
    ref = predict_block(
        small_unet, local["reflectance"].sel(band=bands).values, local["clear_count"].values, 0, 0, h, w, **kw
    )
    seg = segment_region(model_path, store, local, bands, threshold=0.5, block=384, **kw)
    assert seg["probability"].data.chunks == ((384, 384, 256), (384, 384, 256))
    from dask.utils import key_split  # the tasks say their stage on the dashboard

    names = {key_split(k) for k in seg["probability"].data.__dask_graph__()}
    assert {"segment-windows", "segment-blend"} <= names, names
    # in bands of one block column: no window task is shared across a band's edge (each band
    # predicts the windows reaching into it), and the map is the same
    banded = segment_region(model_path, store, local, bands, threshold=0.5, block=384, band=384, **kw)
    from dask._task_spec import convert_legacy_graph

    graph = convert_legacy_graph(dict(banded["probability"].data.__dask_graph__()))
    windows: dict[int, set] = {}
    for j in range(3):  # the window tasks each band's chunks need
        stack = [k for row in banded["probability"].data.__dask_keys__() for k in row if k[2] == j]
        seen: set = set()
        while stack:
            k = stack.pop()
            if k not in seen:
                seen.add(k)
                stack.extend(graph[k].dependencies)
        windows[j] = {k for k in seen if key_split(k) == "segment-windows"}
    assert len(windows) == 3 and all(windows.values())
    assert not (windows[0] & windows[1]) and not (windows[1] & windows[2]) and not (windows[0] & windows[2])
    rt = RuntimeConfig(n_workers=1, threads_per_worker=2, memory_limit="4GiB", dashboard_address=":0")
    with dask_client(rt):
        prob = seg["probability"].values
        write_group(seg, store, "segmentation")
        np.testing.assert_allclose(banded["probability"].values, prob, atol=1e-6)
    np.testing.assert_allclose(prob, ref, atol=1e-6)
    assert np.array_equal(np.isnan(prob), local["clear_count"].values == 0)
    out = open_product(store, "segmentation").load()
    assert out.rio.crs == cube.rio.crs
    assert np.array_equal(np.isnan(out["probability"].values), np.isnan(ref))  # uint8 on disk, NaN back
    np.testing.assert_allclose(out["probability"].values, ref, atol=0.5 / 254 + 1e-6)
    raw = xr.open_zarr(store, group="segmentation", mask_and_scale=False, consolidated=False)
    assert raw["probability"].dtype == "uint8" and raw["mask"].dtype == "uint8"  # compact on disk
    mask = raw["mask"].values
    assert set(np.unique(mask[np.isnan(ref)])) == {255}
    assert np.array_equal(mask[~np.isnan(ref)], (ref[~np.isnan(ref)] >= 0.5).astype("uint8"))


def test_unet_training_refuses_labels_off_the_cube_grid(cube_store, demo_cfg, tmp_path):
    from agriland_scale.errors import CorruptInput
    from agriland_scale.models.train import train_unet

    with pytest.raises(CorruptInput, match=r"not on the cube grid \(1024, 1024\).*--force unet"):
        train_unet(
            cube_store, np.zeros((1000, 1024), dtype="uint8"), demo_cfg.segment, str(tmp_path / "unet.keras")
        )
    assert not (tmp_path / "unet.keras").exists()
