"""Patches and cluster statistics at region scale: the client's work before, the workers' now.

Writes a synthetic cube of SIZE x SIZE px (4 bands of packed int16 reflectance, a uint16
``clear_count`` with cloudy and empty areas) into a real Zarr store, starts a local cluster of
2 worker processes, and times each step both ways, with the client's peak RSS above its
level before the step (sampled every 10 ms):

- per-chunk valid fractions (cube stage): strips read on the client (before) / one task a
  window on the workers (now);
- per-patch valid fractions (patches stage): a gcd block sum of the whole image returned to
  the client through dask (before) / one task a window of patches, one number a patch back (now);
- cluster statistics (publish stage): one loop over every clustered patch in one process
  (before: the single report task) / a map-reduce of ``clusters-stats`` tasks (now);
- the gallery's stretch: percentiles of a subsample of the whole cube (before) / of the shown
  patches, read by the statistics' tasks (now: no read of its own).

Each result is checked equal (fractions bit for bit, statistics within 1e-12).

    python bench/bench_patch_stats.py [--size 8192] [--chunk 1024] [--out /tmp/bench_patch_stats]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_cluster_report import _old_cluster_stats  # noqa: E402  (the former code)
from tests.test_patches import _old_chunk_fraction, _old_index_fraction  # noqa: E402


class Peak:
    """Peak RSS of this process above its level at entry, sampled every 10 ms."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop = True
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def make_cube(path: Path, size: int, chunk: int) -> None:
    import dask.array as da

    from agriland_scale.store import write_group

    if (path / "cube" / "zarr.json").exists():
        return
    yy, xx = da.meshgrid(da.arange(size, chunks=chunk), da.arange(size, chunks=chunk), indexing="ij")
    noise = da.random.default_rng(0).random((size, size), chunks=chunk)
    cloud = (da.sin(yy / 700.0) * da.cos(xx / 900.0) + 0.5 * noise) > 0.9
    count = da.where(cloud, 0, 1 + (noise * 3).astype("uint16")).astype("uint16")
    count = da.where((yy < size // 8) & (xx < size // 6), 0, count)  # an empty corner
    bands = []
    for b in range(4):
        refl = 0.05 + 0.1 * (b + 1) * (1 + da.sin(yy / (200.0 + 50 * b)) * da.cos(xx / 300.0)) / 2
        refl = refl + 0.01 * noise
        bands.append(da.where(count > 0, refl, np.nan).astype("float32"))
    cube = xr.Dataset(
        {
            "reflectance": (("band", "y", "x"), da.stack(bands)),
            "clear_count": (("y", "x"), count),
        },
        coords={
            "band": np.array(["blue", "green", "red", "nir"], dtype=object),
            "y": 4.2e6 - 10 * np.arange(size) - 5.0,
            "x": 4.0e5 + 10 * np.arange(size) + 5.0,
        },
    ).rio.write_crs("EPSG:32618")
    cube["reflectance"].encoding.update(dtype="int16", scale_factor=2e-5, _FillValue=np.int16(-32768))
    write_group(cube, str(path), "cube")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", default="/tmp/bench_patch_stats")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from agriland_scale.cluster.report import _cells, gallery_patches, sample_limits
    from agriland_scale.cluster.stats import stats_and_samples
    from agriland_scale.cube.masks import chunk_valid_fraction
    from agriland_scale.patches import patch_index
    from agriland_scale.render import stretch_limits
    from agriland_scale.store import open_cube

    store = Path(args.out) / "cube.zarr"
    store.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        with Client(lc) as client:
            make_cube(store, args.size, args.chunk)
            print(f"cube {args.size}^2 px in {store}: {time.perf_counter() - t0:.0f} s", flush=True)
            res: dict[str, dict[str, float]] = {}
            local = open_cube(str(store), dask=False)
            lazy = open_cube(str(store))

            def run(name, fn):
                with Peak() as p:
                    out = fn()
                res[name] = {"seconds": round(p.seconds, 2), "client_peak_mb": round(p.mb, 1)}
                print(f"{name:32s} {p.seconds:7.2f} s  client +{p.mb:7.1f} MB", flush=True)
                return out

            old = run("chunk_fraction before", lambda: _old_chunk_fraction(local, args.chunk))
            new = run(
                "chunk_fraction now",
                lambda: chunk_valid_fraction(local, args.chunk, client=client, store=str(store)),
            )
            assert np.array_equal(old, new)
            old = run("patch_index before", lambda: _old_index_fraction(lazy, args.patch, args.stride))
            idx = run(
                "patch_index now",
                lambda: patch_index(lazy, args.patch, args.stride, client, store=str(store)),
            )
            assert np.array_equal(old, idx["valid_fraction"].values)
            n = idx.sizes["patch"]
            labels = np.random.default_rng(1).integers(-1, args.k, n)
            labels[idx["valid_fraction"].values < 0.5] = -1
            ids = np.concatenate(list(gallery_patches(labels, args.k, 8, 0).values()))
            step = _cells(args.patch)[0]
            old = run("cluster_stats before", lambda: _old_cluster_stats(local, idx, labels, args.k))
            st, samples = run(
                "cluster_stats now",
                lambda: stats_and_samples(
                    lazy, idx, labels, args.k, client=client, store=str(store), shown=ids, step=step
                ),
            )
            assert st["size"].values.tolist() == old[0].tolist()
            assert st["valid_pixels"].values.tolist() == old[1].tolist()
            np.testing.assert_allclose(st["ndvi_mean"].values, old[2], rtol=1e-12)
            np.testing.assert_allclose(st["reflectance_mean"].values, old[3], rtol=1e-12)
            run("gallery stretch before", lambda: stretch_limits(lazy))
            run("gallery stretch now", lambda: sample_limits([samples[int(i)] for i in ids]))
            res["setup"] = {
                "size_px": args.size,
                "chunk": args.chunk,
                "patches": int(n),
                "clustered": int((labels >= 0).sum()),
                "workers": 2,
            }
            print(json.dumps(res, indent=1))
            (Path(args.out) / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
