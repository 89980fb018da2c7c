"""The encoder in bfloat16 against float32: the embeddings stage's speed and what it does to the clusters.

Issue 34, goal 4: ``runtime.inference_precision: auto`` runs the encoder in bfloat16 on CPUs
that compute it natively. Does that keep the products? For each finished run folder given
(``agriland demo --out DIR``, or a region benchmark's run), the embeddings stage
(:func:`~agriland_scale.models.embed.embed_patches`, one LocalCluster worker with the run's
threads) embeds the run's patches with its encoder twice, in one process: ``float32``
(``runtime.engine: auto``: ONNX Runtime) and ``mixed_bfloat16`` (``auto``: OpenVINO
bfloat16), after one warm-up batch each. Prints patches/s of both and their ratio, the
embeddings' difference (max |d|; relative L2 per patch) beside their spread (mean distance to
their mean, relative to their norm: the scale on which clusters are drawn), and then the
clusters stage's own fit (:func:`~agriland_scale.cluster.fit.fit_clusters_streaming`, the
run's cluster settings) on both, for each seed: the adjusted Rand index and the share of
patches in matching clusters (Hungarian matching) of bfloat16 against float32 with the same
seed, against the same figures for float32 with one seed against float32 with the next: how
much a seed change alone moves the clusters. Run:

    python bench/bench_embed_precision.py RUN [RUN ...] [--seeds 42 43 44] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _matched(a: np.ndarray, b: np.ndarray) -> float:
    """Share of patches in matching clusters, clusters matched one to one (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    k = int(max(a.max(), b.max())) + 1
    table = np.zeros((k, k))
    np.add.at(table, (a, b), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(a))


def _clusters(emb: np.ndarray, cfg, seed: int) -> np.ndarray:
    import zarr

    from agriland_scale.cluster.fit import fit_clusters_streaming

    with tempfile.TemporaryDirectory() as tmp:
        fit_clusters_streaming(emb, np.ones(len(emb), bool), cfg, seed, out=f"{tmp}/c.zarr")
        return zarr.open_group(f"{tmp}/c.zarr", mode="r")["labels"][:]


def measure(run_dir: Path, seeds: list[int]) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from agriland_scale.config.schema import RunConfig, RuntimeConfig
    from agriland_scale.models.embed import embed_patches
    from agriland_scale.pipeline.runtime import dask_client
    from agriland_scale.store import open_product, reader

    run = json.loads((run_dir / "run.json").read_text())
    cfg = RunConfig.model_validate(run["config"])
    encoder = cfg.embed.model or str(run_dir / "models" / "encoder.keras")
    store = reader(run_dir)
    index = open_product(store, "patches").load()
    e = cfg.embed
    rt = RuntimeConfig(
        n_workers=1,
        threads_per_worker=cfg.runtime.threads_per_worker,
        memory_limit="8GiB",
        dashboard_address=":0",
    )
    kw = dict(batch_size=e.batch_size, min_valid_fraction=0.0, engine="auto")
    embs: dict[str, np.ndarray] = {}
    secs: dict[str, float] = {}
    engines: dict[str, str] = {}
    with dask_client(rt):
        for precision in ("float32", "mixed_bfloat16"):
            warm = index.isel(patch=slice(0, e.batch_size))
            embed_patches(encoder, store, warm, e.bands, e.reflectance_max, precision=precision, **kw)[
                "embedding"
            ].compute()
            t = time.perf_counter()
            ds = embed_patches(encoder, store, index, e.bands, e.reflectance_max, precision=precision, **kw)
            embs[precision] = ds["embedding"].values
            secs[precision] = time.perf_counter() - t
            engines[precision] = (
                f"{ds['embedding'].attrs.get('engine', 'tensorflow')}/{ds['embedding'].attrs.get('precision')}"
            )
    f32, bf16 = embs["float32"], embs["mixed_bfloat16"]
    n = len(f32)
    norm = np.linalg.norm(f32, axis=1)
    rel = np.linalg.norm(bf16 - f32, axis=1) / norm
    spread = float(np.linalg.norm(f32 - f32.mean(0), axis=1).mean() / norm.mean())
    labels = {(p, s): _clusters(embs[p], cfg.cluster, s) for p in embs for s in seeds}
    same = [
        (
            adjusted_rand_score(labels["float32", s], labels["mixed_bfloat16", s]),
            _matched(labels["float32", s], labels["mixed_bfloat16", s]),
        )
        for s in seeds
    ]
    other = [
        (
            adjusted_rand_score(labels["float32", a], labels["float32", b]),
            _matched(labels["float32", a], labels["float32", b]),
        )
        for a, b in itertools.combinations(seeds, 2)
    ]
    return {
        "run": str(run_dir),
        "patches": n,
        "engines": engines,
        "seconds": secs,
        "speedup": secs["float32"] / secs["mixed_bfloat16"],
        "max_abs_diff": float(np.abs(bf16 - f32).max()),
        "rel_l2_mean": float(rel.mean()),
        "rel_l2_p99": float(np.quantile(rel, 0.99)),
        "spread": spread,
        "seeds": seeds,
        "ari_bf16_vs_f32_same_seed": [a for a, _ in same],
        "matched_bf16_vs_f32_same_seed": [m for _, m in same],
        "ari_f32_seed_vs_seed": [a for a, _ in other],
        "matched_f32_seed_vs_seed": [m for _, m in other],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    for run_dir in args.runs:
        r = measure(run_dir, args.seeds)
        results.append(r)
        s = r["seconds"]
        print(
            f"{r['run']}: {r['patches']} patches, engines {r['engines']['float32']} vs {r['engines']['mixed_bfloat16']}"
        )
        print(
            f"  embeddings stage: float32 {r['patches'] / s['float32']:.1f} patches/s ({s['float32']:.1f} s), "
            f"bfloat16 {r['patches'] / s['mixed_bfloat16']:.1f} patches/s ({s['mixed_bfloat16']:.1f} s): "
            f"{r['speedup']:.2f}x"
        )
        print(
            f"  embeddings bf16 vs f32: max |d| {r['max_abs_diff']:.2e}, relative L2 mean {r['rel_l2_mean']:.2e} "
            f"(p99 {r['rel_l2_p99']:.2e}); spread of the float32 embeddings {r['spread']:.2e}"
        )

        def fmt(v):
            return f"{np.mean(v):.3f} ± {np.std(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})"

        print(
            f"  clusters, bf16 vs f32, same seed: ARI {fmt(r['ari_bf16_vs_f32_same_seed'])}, "
            f"matched {fmt(r['matched_bf16_vs_f32_same_seed'])}"
        )
        print(
            f"  clusters, f32 seed vs f32 seed:   ARI {fmt(r['ari_f32_seed_vs_seed'])}, "
            f"matched {fmt(r['matched_f32_seed_vs_seed'])}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
