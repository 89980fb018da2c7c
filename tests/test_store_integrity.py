"""Nothing read silently wrong, nothing advised that fails again (issue 31, items 5 and 13).

Real Icechunk stores on disk, written as the pipeline writes them (``Products``), damaged
the way disks and copies damage them:

- every array is stored with a CRC32C checksum and the same values; flipping 8 bytes in the
  middle of every chunk object makes every read of the product (``open_product``,
  ``open_cube``, ``export_zarr``) raise ``CorruptInput`` naming the product, the variable,
  the chunk and how to recover, for a float array with Zarr's default compressor as for the
  Blosc-compressed cube written block by block on a Dask worker;
- a truncated ``refs/branch.main/ref.json`` or a truncated snapshot: every way in (the
  runner's ``Products``, ``reader``, ``open_run``, ``history``, ``agriland inspect``, ``agriland
  export``) says the store is damaged, which versions still open and how to recover, never
  to rerun into the same folder; and following that advice opens the products again.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from agriland_scale.cli import main
from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.errors import CorruptInput
from agriland_scale.layout import STORE
from agriland_scale.pipeline.runtime import dask_client
from agriland_scale.publish.inspect import format_summary, summarise_run
from agriland_scale.store import (
    export_zarr,
    fast_compressors,
    history,
    open_cube,
    open_product,
    open_run,
    reader,
    write_georef,
)
from agriland_scale.store.resume import Products

RT = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")


def _embeddings(n: int = 64) -> xr.Dataset:
    """Embeddings as the embeddings stage stores them: float32 (patch, feature), Zarr's default codecs."""
    emb = np.random.default_rng(5).normal(size=(n, 100)).astype("float32")
    ds = xr.Dataset({"embedding": (("patch", "feature"), emb)}, coords={"patch": np.arange(n)})
    ds["embedding"].encoding["chunks"] = (16, 100)  # 4 chunk objects of 6.4 kB (small ones go inline)
    return ds


def _clusters(n: int = 64, k: int = 6) -> xr.Dataset:
    """Centroids and soft assignments (float32), cluster ids (int16, -1 where none)."""
    rng = np.random.default_rng(7)
    q = rng.random((n, k), dtype="float32")
    ds = xr.Dataset(
        {
            "soft_assignment": (("patch", "cluster"), q / q.sum(1, keepdims=True)),
            "centroid": (("cluster", "feature"), rng.normal(size=(k, 100)).astype("float32")),
            "labels": ("patch", q.argmax(1).astype("int16")),
        }
    )
    ds["labels"].encoding["_FillValue"] = np.int16(-1)
    return ds


def _cube(rows: int = 128, cols: int = 96) -> xr.Dataset:
    """A cube as the cube stage writes it: packed int16 reflectance, Blosc LZ4, blocks of rows."""
    rng = np.random.default_rng(3)
    refl = rng.integers(0, 5000, size=(2, rows, cols)).astype("int16")
    count = rng.integers(0, 30, size=(rows, cols)).astype("uint16")
    ds = xr.Dataset(
        {
            "reflectance": (("band", "y", "x"), da.from_array(refl, chunks=(2, 32, cols))),
            "clear_count": (("y", "x"), da.from_array(count, chunks=(32, cols))),
        },
        coords={
            "band": ["red", "nir"],
            "y": 4_200_000 - 10.0 * np.arange(rows) - 5,
            "x": 300_000 + 10.0 * np.arange(cols) + 5,
        },
    )
    ds = write_georef(ds, 32618)
    ds["reflectance"].attrs.update(scale_factor=np.float32(0.5e-4), _FillValue=np.int16(-32768))
    for var in ds.data_vars.values():
        var.encoding["compressors"] = fast_compressors()
    return ds


def _flip_every_chunk(out: Path) -> int:
    """Flip 8 bytes in the middle of every chunk object of the run's store; return how many."""
    chunks = sorted(p for p in (out / STORE / "chunks").rglob("*") if p.is_file())
    for p in chunks:
        b = bytearray(p.read_bytes())
        mid = len(b) // 2
        b[mid : mid + 8] = bytes(x ^ 0xFF for x in b[mid : mid + 8])
        p.write_bytes(bytes(b))
    return len(chunks)


# --- 5: a damaged chunk is an error that names it ---------------------------------------------


def test_every_array_is_stored_with_a_checksum_and_the_same_values(tmp_path):
    products = Products(tmp_path / "run")
    emb, cl = _embeddings(), _clusters()
    products.write(emb, "embeddings")
    products.write(cl, "clusters")
    store = products.reader()
    for group, ds in (("embeddings", emb), ("clusters", cl)):
        stored = zarr.open_group(store, path=group, mode="r")
        for name in ds.variables:
            codecs = stored[str(name)].metadata.codecs
            assert isinstance(codecs[-1], Crc32cCodec), (group, name, codecs)
            np.testing.assert_array_equal(stored[str(name)][...], ds[name].values)  # bit for bit
    assert "compressors" not in emb["embedding"].encoding  # the caller's dataset is not modified
    with dask_client(RT) as client:
        products.write_blocks(_cube(), "cube", "y", client)
    stored = zarr.open_group(products.reader(), path="cube", mode="r")
    codecs = stored["reflectance"].metadata.codecs
    assert isinstance(codecs[-2], BloscCodec) and isinstance(
        codecs[-1], Crc32cCodec
    )  # the cube's compressor kept
    np.testing.assert_array_equal(stored["reflectance"][...], _cube()["reflectance"].values)


def test_flipped_bytes_in_every_chunk_raise_corrupt_input_naming_the_product(tmp_path):
    """Without the checksum, the embeddings, centroids and soft assignments read back changed,
    with no error at all."""
    out = tmp_path / "run"
    products = Products(out)
    products.write(_embeddings(), "embeddings")
    products.write(_clusters(), "clusters")
    assert _flip_every_chunk(out) >= 4
    for group, name in (
        ("embeddings", "embedding"),
        ("clusters", "soft_assignment"),
        ("clusters", "centroid"),
    ):
        with pytest.raises(CorruptInput) as err:
            open_product(products.reader(), group)[name].values  # noqa: B018 - the read is the test
        msg = str(err.value)
        assert f"product '{group}', variable '{name}': chunk (" in msg, msg
        assert f"object {group}/{name}/c/" in msg and "do not match the checksum" in msg
        assert "agriland inspect RUN --history" in msg and "--version V" in msg and f"--force {group}" in msg
    with pytest.raises(CorruptInput, match=r"product '(embeddings|clusters)', variable"):
        open_run(out)["embeddings"].to_dataset().load()
    with pytest.raises(CorruptInput, match=r"product '(embeddings|clusters)', variable"):
        export_zarr(out, tmp_path / "copy.zarr")
    assert not (tmp_path / "copy.zarr").exists()


def test_a_damaged_cube_chunk_is_named_on_the_worker_that_reads_it(tmp_path):
    """The cube is Blosc-compressed: without the checksum its damage showed only when Blosc
    happened to notice, as Blosc's error naming no product."""
    out = tmp_path / "run"
    products = Products(out)
    with dask_client(RT) as client:
        products.write_blocks(_cube(), "cube", "y", client)
        assert _flip_every_chunk(out) >= 8
        cube = open_cube(products.reader())
        with pytest.raises(
            CorruptInput,
            match=r"product 'cube', variable '(reflectance|clear_count)': "
            r"chunk \(.*--force cube",
        ):
            client.compute(cube["reflectance"].sum()).result()  # read on a worker process
    with pytest.raises(CorruptInput, match=r"product 'cube', variable '(reflectance|clear_count)': chunk"):
        open_cube(products.reader(), dask=False)["clear_count"].values  # noqa: B018


# --- 13: a damaged ref or snapshot names the store, what still opens, and the way back ------


def _finished_run(out: Path) -> tuple[str, str]:
    """A store with two versions, the second tagged as a finished run's; returns (first, second)."""
    products = Products(out)
    products.write(_embeddings(), "embeddings")
    first = products.repo.lookup_branch("main")
    products.write(_clusters(), "clusters")
    products.tag_run(1)
    (out / "run.json").write_text(
        json.dumps({"config": {"name": "damaged"}, "stages": {"search": "done", "cube": "done"}})
    )
    return first, products.repo.lookup_branch("main")


def _point_main_at(message: str, out: Path) -> str:
    """Do what the message says to recover: write the first version it names to main's ref."""
    ref = out / STORE / "refs" / "branch.main" / "ref.json"
    prefix = f"mkdir -p {ref.parent} && printf '"
    body = message[message.index(prefix) + len(prefix) : message.index(f"' > {ref}")]
    ref.parent.mkdir(exist_ok=True)
    ref.write_text(body)
    return json.loads(body)["snapshot"]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_main_ref_names_the_store_the_versions_left_and_the_way_back(damage, tmp_path, capsys):
    out = tmp_path / "run"
    _, tagged = _finished_run(out)
    ref = out / STORE / "refs" / "branch.main" / "ref.json"
    if damage == "truncated":
        ref.write_bytes(ref.read_bytes()[:10])  # as a full disk or a killed copy leaves it
        problem = "(its branch 'main' ref cannot be read: cannot serialize ref json: EOF while parsing"
    else:
        ref.unlink()
        ref.parent.rmdir()
        problem = "(its branch 'main' ref is missing)"
    for call in (lambda: Products(out), lambda: reader(out), lambda: open_run(out), lambda: history(out)):
        with pytest.raises(CorruptInput) as err:
            call()
        msg = str(err.value)
        assert f"the product store {out / STORE} is damaged {problem}" in msg, msg
        assert f"versions that still open once 'main' names one of them: {tagged} (tag run-" in msg
        assert f"every rerun into {out} fails the same way" in msg and "run into a new --out" in msg
    for argv in (
        ["inspect", str(out), "--history"],
        ["export", str(out), "--zarr", str(tmp_path / "c.zarr")],
    ):
        assert main(argv) == 2
        err_text = capsys.readouterr().err
        assert err_text.startswith(f"agriland: error: the product store {out / STORE} is damaged"), err_text
        assert err_text.count("\n") == 1 and "Traceback" not in err_text  # one paragraph
    summary = summarise_run(out)  # the summary of the folder still shows, and says so
    assert "is damaged" in summary["store_damage"]
    assert "DAMAGED: the product store" in format_summary(summary)
    assert _point_main_at(msg, out) == tagged
    assert [v["version"] for v in history(out)][0] == tagged
    np.testing.assert_array_equal(
        open_run(out)["clusters"]["centroid"].values, _clusters()["centroid"].values
    )
    Products(out)  # a rerun opens it again
    assert summarise_run(out)["store_damage"] is None


def test_a_damaged_snapshot_names_the_versions_that_still_open(tmp_path, capsys):
    out = tmp_path / "run"
    first, tagged = _finished_run(out)
    snap = out / STORE / "snapshots" / tagged
    snap.write_bytes(snap.read_bytes()[:100])
    for call in (lambda: Products(out), lambda: reader(out), lambda: open_run(out), lambda: history(out)):
        with pytest.raises(CorruptInput) as err:
            call()
        msg = str(err.value)
        assert f"is damaged (its branch 'main' names version {tagged}, which cannot be read: " in msg, msg
        assert f"versions that still open: {first} (" in msg and "'write embeddings'" in msg
        assert tagged not in msg.split("versions that still open")[1]  # never the damaged one
    tag = next(
        p.name.removeprefix("tag.") for p in (out / STORE / "refs").iterdir() if p.name.startswith("tag.")
    )
    with pytest.raises(CorruptInput, match=rf"its version '{tag}' \({tagged}\) cannot be read"):
        reader(out, tag)
    assert main(["inspect", str(out), "--history"]) == 2
    assert "is damaged" in capsys.readouterr().err
    assert _point_main_at(msg, out) == first
    assert sorted(open_run(out).children) == ["embeddings"]  # the version before the damaged one
    Products(out)
