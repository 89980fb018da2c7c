"""Benchmark: peak memory of the clustering stage at N and 4N embeddings.

Writes N and 4N synthetic embeddings (dim 100, float32, a seeded mixture of Gaussians,
5 % of rows marked invalid) to Zarr arrays on disk, chunk by chunk, then runs
:func:`agriland_scale.cluster.fit.fit_clusters_streaming` (k-means ``partial_fit`` over
chunks, DEC on a sample, chunk-by-chunk soft assignment written to Zarr) on each in a fresh
subprocess, which reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``).

Prints N, peak MiB (whole process, and above the RSS right after the imports, which are
mostly TensorFlow) and seconds for both sizes, and the ratio 4N / N of the peaks (goal <= 1.2).
Run: ``python bench/bench_cluster.py [--n 200000] [--k 20] [--sample-size 10000]``
(about 1½ minutes on 2 CPU cores with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 100
CHUNK = 65_536


def write_embeddings(path: Path, n: int, *, dim: int = DIM, k_true: int = 20, seed: int = 0) -> None:
    """Write ``(n, dim)`` float32 embeddings to a Zarr array at ``path`` in ``CHUNK``-row pieces,
    and ``valid.npy`` (bool, 95 % true) beside it. Memory: one chunk."""
    import zarr

    centers = np.random.default_rng(seed).normal(0.0, 3.0, (k_true, dim)).astype("float32")
    arr = zarr.create_array(
        str(path / "emb.zarr"), shape=(n, dim), chunks=(CHUNK, dim), dtype="float32", overwrite=True
    )
    for i, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, i])
        m = min(CHUNK, n - start)
        lab = rng.integers(k_true, size=m)
        arr[start : start + m] = centers[lab] + rng.normal(0.0, 1.0, (m, dim)).astype("float32")
    np.save(path / "valid.npy", np.random.default_rng([seed, 2**31]).random(n) >= 0.05)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(path: Path, k: int, sample_size: int, seed: int) -> None:
    """Cluster the embeddings under ``path``; print one JSON line with peak RSS and time."""
    import zarr

    from agriland_scale.cluster.fit import fit_clusters_streaming
    from agriland_scale.config.schema import ClusterConfig

    base = _rss_mib()
    emb = zarr.open_array(str(path / "emb.zarr"), mode="r")
    valid = np.load(path / "valid.npy")
    cfg = ClusterConfig(
        k=k, n_init=3, dec={"max_iter": 2000, "update_interval": 100, "tol": 0.001, "batch_size": 256}
    )
    t = time.perf_counter()
    info = fit_clusters_streaming(
        emb, valid, cfg, seed, out=path / "clusters.zarr", sample_size=sample_size, chunk=CHUNK
    )
    secs = time.perf_counter() - t
    print(
        json.dumps(
            {
                "n": int(emb.shape[0]),
                "peak_mib": _rss_mib(),
                "import_mib": base,
                "seconds": secs,
                "dec_iterations": info["dec_iterations"],
                "sizes": info["sizes"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="N (the second run uses 4N)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--sample-size", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.k, args.sample_size, args.seed)
        return
    env = os.environ | {
        "OMP_NUM_THREADS": "2",
        "TF_NUM_INTRAOP_THREADS": "2",
        "TF_NUM_INTEROP_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = []
        for n in (args.n, 4 * args.n):
            d = Path(tmp) / f"n{n}"
            d.mkdir()
            t = time.perf_counter()
            write_embeddings(d, n, seed=args.seed)
            t_write = time.perf_counter() - t
            res = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(d),
                    "--k",
                    str(args.k),
                    "--sample-size",
                    str(args.sample_size),
                    "--seed",
                    str(args.seed),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                sys.exit(f"child for N={n} failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["write_seconds"] = t_write
            rows.append(row)
    print(
        f"clustering stage: dim {DIM}, k {args.k}, DEC sample {args.sample_size}, chunk {CHUNK} rows; "
        "one fresh process a size"
    )
    print(
        f"{'N':>9} {'embeddings MiB':>15} {'peak RSS MiB':>13} {'above imports MiB':>18} {'cluster s':>10} "
        f"{'DEC iters':>10}"
    )
    for r in rows:
        print(
            f"{r['n']:>9} {r['n'] * DIM * 4 / 2**20:>15.1f} {r['peak_mib']:>13.1f} "
            f"{r['peak_mib'] - r['import_mib']:>18.1f} {r['seconds']:>10.1f} {r['dec_iterations']:>10}"
        )
    a, b = rows
    ratio = b["peak_mib"] / a["peak_mib"]
    above = (b["peak_mib"] - b["import_mib"]) / max(a["peak_mib"] - a["import_mib"], 1e-9)
    print(
        f"peak RSS ratio 4N/N: {ratio:.3f} (goal <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'}); "
        f"above-imports ratio: {above:.3f}; time ratio: {b['seconds'] / a['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
