"""The product store on object storage against a local folder (issue 15), measured in one run.

- **The demo pipeline, local folder vs S3**: the embedded demo (fixed short schedules, the
  models trained once by a first local run and then given as ``embed.model``/``segment.model``,
  so every measured run does the same work), alternately into a new local folder and a new
  prefix of a real S3 server on 127.0.0.1 (SeaweedFS, ``scripts/local_s3.py``). Reports the
  wall time of each (median over the rounds) and their ratio (goal <= 1.15), the bytes written
  (the folder, or every object under the prefix), and the store's commits and their total time
  (``run.json`` ``store``).
- **Commit overhead per block row**: a real cube (the demo's reflectance, 16 block rows of 64 px)
  written with :class:`~agriland_scale.store.resume.Products` committing every block
  (``runtime.commit_every_s: 0``) and committing once, locally and on S3: the time a commit
  takes (the client's ``commit`` calls, timed), and the two writes' wall times.
- **Engine metadata after ``--force`` twice**: a local run redone twice with ``--force
  segmentation``; the bytes of the store's snapshots, manifests, transactions and refs
  against its chunks, and the number of versions.
- **The cost of the chunk checksums** (issue 31, item 5): the demo's real cube (packed int16
  reflectance and clear counts, Blosc LZ4, written block by block as the cube stage writes it)
  and embeddings at region scale (float32, 16384 patches x 100, Zarr's default Zstd), written
  into new local stores with :class:`~agriland_scale.store.resume.Products` with the CRC32C
  checksum of every chunk (as the pipeline writes) and without it, alternately, in the same
  run: the bytes of the stores (all, and their chunk objects), the write times and the time to
  read every value back (medians over the rounds). ``--checksum-only`` measures only this.

Run: ``nice -n 5 python bench/bench_store.py [--rounds 2] [--json bench/results/store.json]
[--checksum-only]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# the demo's short schedules (as the tests' end-to-end runs)
FAST = {
    "embed.batch_size": 4,
    "embed.train": {
        "epochs": 1,
        "steps_per_epoch": 2,
        "batch_size": 4,
        "learning_rate": 0.001,
        "augment": True,
    },
    "cluster.dec": {
        "max_iter": 300,
        "update_interval": 50,
        "tol": 0.001,
        "batch_size": 16,
        "learning_rate": 0.01,
        "momentum": 0.9,
        "alpha": 1.0,
    },
    "segment.train": {
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.001,
        "augment_factor": 1,
        "patience": 3,
        "validation": "west",
        "validation_fraction": 0.3,
    },
    "runtime.dashboard_address": ":0",
}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _one_run(cfg, out: str) -> dict:
    from agriland_scale.files import is_object_url, list_objects
    from agriland_scale.pipeline.runner import run

    t0 = time.perf_counter()
    rec = run(cfg, out)
    wall = time.perf_counter() - t0
    written = sum(list_objects(out).values()) if is_object_url(out) else _du(Path(out))
    return {
        "wall_s": wall,
        "bytes": written,
        "commits": rec["store"]["commits"],
        "commit_s": rec["store"]["commit_seconds"],
        "stages_s": rec["timings_s"],
    }


def _commit_overhead(location: str, rows: int = 1024, block: int = 64) -> dict:
    """Seconds per block row that a commit a block costs over one commit, at ``location``."""
    import numpy as np
    import xarray as xr

    from agriland_scale import load_config
    from agriland_scale.config.schema import RuntimeConfig
    from agriland_scale.cube.load import load_cube
    from agriland_scale.pipeline.runtime import dask_client
    from agriland_scale.search.stac import local_stac_api, search_items
    from agriland_scale.store.resume import Products

    cfg = load_config(REPO / "agriland_scale" / "data" / "demo.yaml")
    with local_stac_api(cfg.search.catalog) as url:
        items = search_items(cfg.search, url)
    src = f"{tempfile.mkdtemp(prefix='bench-store-src-')}/cube.zarr"  # read lazily: a small graph
    part = load_cube(items, cfg.cube, cfg.search.bbox).isel(y=slice(0, rows)).chunk({"y": block})
    for v in part.variables.values():  # stored in chunks of `block` rows, not the cube's own
        v.encoding.pop("chunks", None)
    part.to_zarr(src, zarr_format=3, consolidated=False)
    cube = xr.open_zarr(src, consolidated=False, decode_coords="all")
    n = rows // block
    times = {}
    with dask_client(
        RuntimeConfig(n_workers=1, threads_per_worker=2, memory_limit="4GiB", dashboard_address=":0")
    ) as client:
        for name, every in (
            ("once", 1e9),
            ("every_block", 0.0),
            ("once_again", 1e9),
            ("every_block_again", 0.0),
        ):
            products = Products(f"{location}/commits-{name}", commit_every_s=every)
            ds = cube.chunk({"y": block, "x": -1, "band": -1})
            t0 = time.perf_counter()
            stats = products.write_blocks(ds, "cube", "y", client)
            times[name] = (time.perf_counter() - t0, stats["commits"], products.commit_seconds)
            got = xr.open_zarr(products.reader(), group="cube", consolidated=False)["clear_count"].values
            assert np.array_equal(got, cube["clear_count"].values)  # every block in, once
    once = statistics.median([times["once"][0], times["once_again"][0]])
    every = statistics.median([times["every_block"][0], times["every_block_again"][0]])
    commits = times["every_block"][1] + times["every_block_again"][1]
    commit_s = times["every_block"][2] + times["every_block_again"][2]
    return {
        "blocks": n,
        "once_s": once,
        "every_block_s": every,
        "wall_difference_per_block_row_s": (every - once) / n,
        "commits_every_block": times["every_block"][1],
        "per_commit_s": commit_s / commits,
        "commit_seconds_every_block": times["every_block"][2],
    }


def _checksum_cost(work: Path, rounds: int) -> dict:
    """Store bytes, write and read seconds of the same products with and without chunk checksums."""
    import contextlib

    import dask.array as da
    import numpy as np
    import xarray as xr

    import agriland_scale.store.resume as resume
    from agriland_scale import load_config
    from agriland_scale.config.schema import RuntimeConfig
    from agriland_scale.cube.load import load_cube
    from agriland_scale.pipeline.runtime import dask_client
    from agriland_scale.search.stac import local_stac_api, search_items
    from agriland_scale.store import open_product

    cfg = load_config(REPO / "agriland_scale" / "data" / "demo.yaml")
    with local_stac_api(cfg.search.catalog) as url:
        items = search_items(cfg.search, url)
    src = work / "checksum-src.zarr"  # the cube computed once: what is timed is the store's write
    load_cube(items, cfg.cube, cfg.search.bbox, encoded=True).to_zarr(src, zarr_format=3, consolidated=False)
    cube = xr.open_zarr(src, consolidated=False, decode_cf=False, decode_coords="all")
    for v in cube.variables.values():  # as the cube stage gives it: the cube's chunks, Blosc LZ4
        v.encoding = {k: v.encoding[k] for k in ("chunks", "compressors", "fill_value") if k in v.encoding}
    vectors = np.random.default_rng(0).standard_normal((16384, 100), dtype="float32")
    emb = xr.Dataset(
        {"embedding": (("patch", "feature"), da.from_array(vectors, chunks=(1024, 100)))},
        coords={"patch": np.arange(len(vectors))},
    )

    @contextlib.contextmanager
    def checksums(on: bool):
        keep = resume.with_checksums
        if not on:
            resume.with_checksums = lambda ds: ds  # what the products were before issue 31
        try:
            yield
        finally:
            resume.with_checksums = keep

    runs: dict[str, list[dict]] = {"with": [], "without": []}
    with dask_client(
        RuntimeConfig(n_workers=1, threads_per_worker=2, memory_limit="4GiB", dashboard_address=":0")
    ) as client:
        for r in range(rounds):
            for kind in ("with", "without") if r % 2 == 0 else ("without", "with"):
                out = work / f"checksum-{kind}-{r}"
                products = resume.Products(out)
                row: dict = {}
                with checksums(kind == "with"):
                    for group, ds in (
                        ("cube", cube.chunk({"y": cube.chunks["y"][0], "x": -1, "band": -1})),
                        ("embeddings", emb),
                    ):
                        t0 = time.perf_counter()
                        products.write_blocks(ds, group, "y" if group == "cube" else "patch", client)
                        row[f"{group}_write_s"] = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        for v in open_product(products.reader(), group).data_vars.values():
                            np.asarray(v.values)
                        row[f"{group}_read_s"] = time.perf_counter() - t0
                store = out / "agriland.icechunk"
                row |= {
                    "bytes": _du(store),
                    "chunk_bytes": _du(store / "chunks"),
                    "chunk_objects": sum(1 for p in (store / "chunks").rglob("*") if p.is_file()),
                }
                runs[kind].append(row)
    med = {kind: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for kind, rows in runs.items()}
    return {"rounds": rounds, "cube_shape": dict(cube.sizes), "runs": runs, "median": med}


def _metadata_after_forces(cfg, out: Path) -> dict:
    from agriland_scale.pipeline.runner import run
    from agriland_scale.store import history

    for _ in range(2):
        run(cfg, out, force=["segmentation"])
    store = out / "agriland.icechunk"
    parts = {d.name: _du(d) for d in store.iterdir() if d.is_dir()}
    meta = sum(v for k, v in parts.items() if k != "chunks")
    return {
        "bytes_by_folder": parts,
        "metadata_bytes": meta,
        "chunk_bytes": parts.get("chunks", 0),
        "metadata_fraction": meta / max(1, meta + parts.get("chunks", 0)),
        "versions": len(history(out)),
        "commits": len(history(out, every_commit=True)),
    }


def _print_checksum_cost(c: dict) -> None:
    w, wo = c["median"]["with"], c["median"]["without"]
    shape = " x ".join(f"{k} {v}" for k, v in c["cube_shape"].items())
    print(
        f"chunk checksums (CRC32C), medians of {c['rounds']} rounds; cube ({shape}) + embeddings (16384 x 100):"
    )
    print(
        f"  store size : {w['bytes'] / 2**20:.3f} MiB with, {wo['bytes'] / 2**20:.3f} MiB without "
        f"(+{w['bytes'] - wo['bytes']:,} bytes, +{(w['bytes'] / wo['bytes'] - 1) * 100:.3f} %); chunk objects "
        f"{w['chunk_objects']:.0f}: {w['chunk_bytes']:,.0f} against {wo['chunk_bytes']:,.0f} bytes"
    )
    for g in ("cube", "embeddings"):
        print(
            f"  {g:10} : write {w[g + '_write_s']:.2f} s with, {wo[g + '_write_s']:.2f} s without; "
            f"read back {w[g + '_read_s']:.3f} s with, {wo[g + '_read_s']:.3f} s without"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--checksum-only", action="store_true", help="measure only the cost of the chunk checksums"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    rounds = max(args.rounds, 3)
    checksum = _checksum_cost(work, rounds)
    _print_checksum_cost(checksum)
    if args.checksum_only:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps(
                    {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "checksum_cost": checksum},
                    indent=1,
                    default=str,
                )
            )
        return

    from local_s3 import LocalS3

    from agriland_scale import load_config

    base = load_config(REPO / "agriland_scale" / "data" / "demo.yaml").with_overrides(**FAST)
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "checksum_cost": checksum,
    }
    with LocalS3(work / "s3") as s3:
        os.environ.update(s3.env)  # this process and the LocalCluster's workers
        t0 = time.perf_counter()
        from agriland_scale.pipeline.runner import run

        run(base, work / "train")  # trains the CAE and the U-Net once
        results["training_run_s"] = time.perf_counter() - t0
        models = work / "train" / "models"
        cfg = base.with_overrides(
            **{"embed.model": str(models / "encoder.keras"), "segment.model": str(models / "unet.keras")}
        )
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        for r in range(args.rounds):
            runs["local"].append(_one_run(cfg, str(work / f"local-{r}")))
            runs["s3"].append(_one_run(cfg, s3.url(f"bench-{r}")))
            print(
                f"round {r + 1}: local {runs['local'][-1]['wall_s']:.1f} s, S3 {runs['s3'][-1]['wall_s']:.1f} s",
                flush=True,
            )
        med = {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()}
        results["demo"] = {
            "runs": runs,
            "median_wall_s": med,
            "ratio_s3_over_local": med["s3"] / med["local"],
        }
        results["commit_overhead"] = {
            "local": _commit_overhead(str(work / "commits")),
            "s3": _commit_overhead(s3.url("commits")),
        }
        results["metadata_after_two_forces"] = _metadata_after_forces(cfg, work / "local-0")

    d, c, m = results["demo"], results["commit_overhead"], results["metadata_after_two_forces"]
    print(
        f"\ndemo pipeline (given models), median of {args.rounds}: local {d['median_wall_s']['local']:.1f} s, "
        f"S3 {d['median_wall_s']['s3']:.1f} s -> ratio S3/local {d['ratio_s3_over_local']:.2f} (goal <= 1.15)"
    )
    for k in ("local", "s3"):
        x = d["runs"][k][0]
        print(
            f"  {k:5}: {x['bytes'] / 2**20:.1f} MiB written, {x['commits']} commits in {x['commit_s']:.2f} s"
        )
    for k in ("local", "s3"):
        print(
            f"commit overhead {k:5}: {c[k]['per_commit_s'] * 1000:.1f} ms a commit, i.e. per block row when "
            f"committing every row ({c[k]['commits_every_block']} commits took "
            f"{c[k]['commit_seconds_every_block']:.2f} s); wall time of {c[k]['blocks']} rows: "
            f"{c[k]['once_s']:.2f} s committing once, {c[k]['every_block_s']:.2f} s a commit a row"
        )
    _print_checksum_cost(checksum)
    print(
        f"engine metadata after --force segmentation twice: {m['metadata_bytes'] / 2**10:.0f} KiB "
        f"({m['metadata_fraction']:.1%} of the store; chunks {m['chunk_bytes'] / 2**20:.1f} MiB), "
        f"{m['versions']} versions, {m['commits']} commits"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
