"""Time and peak memory of the evaluation metrics at growing sizes (CPU, one thread).

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval_metrics.py [--sizes 500 1000 2000]
       [--embedding-cells 700 2700] [--kbet-stock]

Prints one line per (metric, n): seconds and the peak resident memory growth of the process.
The generation metrics are O(n^2) in memory and time (exact OT is worse in time), which is why
evaluate.generation.max_cells caps the cells per set and condition. The embedding metrics
(scib-metrics) are timed as the rule runs them: the first `embedding_metrics` call of a process
(imports, JAX and numba compilation) and then each metric on its own. --kbet-stock also runs
scib-metrics' kbet_per_label with its own pynndescent search, against the exact search used here.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from cellfoundry.evaluate import embedding as emb
from cellfoundry.evaluate import generation as gen


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(name: str, n: int, fn):
    before = peak_mb()
    start = time.perf_counter()
    result = fn()
    print(
        f"{name:28s} n={n:6d}  {time.perf_counter() - start:8.2f} s  peak RSS +{max(0.0, peak_mb() - before):7.0f} MB",
        flush=True,
    )
    return result


def embedding_timings(n: int, rng: np.random.Generator, kbet_stock: bool) -> None:
    """n cells in 10 Gaussian clusters (labels) of 50 dims with a batch shift per batch (3)."""
    import scib_metrics

    labels, batches = rng.integers(0, 10, size=n), rng.integers(0, 3, size=n)
    X = (
        rng.normal(size=(10, 50))[labels] * 3 + rng.normal(size=(n, 50)) + 0.5 * rng.normal(size=(3, 50))[batches]
    ).astype(np.float32)
    X_pre = X + rng.normal(size=X.shape).astype(np.float32)
    y, b = labels.astype(str), batches.astype(str)
    timed("all embedding metrics", n, lambda: emb.embedding_metrics(X, y, b, X_pre=X_pre))  # first: compiles
    timed("all embedding metrics again", n, lambda: emb.embedding_metrics(X, y, b, X_pre=X_pre))
    nn = emb.neighbors(X)
    timed("exact kNN (90)", n, lambda: emb.neighbors(X))
    timed("knn label transfer 5-fold", n, lambda: emb.knn_label_transfer(X, y))
    timed("leiden nmi/ari (10 res.)", n, lambda: emb.leiden_nmi_ari(nn, y))
    timed("asw_label", n, lambda: scib_metrics.silhouette_label(X, y))
    timed("isolated_labels", n, lambda: scib_metrics.isolated_labels(X, y, b))
    timed("clisi", n, lambda: scib_metrics.clisi_knn(nn, y))
    timed("asw_batch", n, lambda: scib_metrics.silhouette_batch(X, y, b))
    timed("ilisi", n, lambda: scib_metrics.ilisi_knn(nn, b))
    with emb._exact_diffusion_neighbors():
        exact = timed(
            "kbet per label (exact nn)", n, lambda: scib_metrics.kbet_per_label(nn.subset_neighbors(50), b, y)
        )
    timed("graph connectivity", n, lambda: scib_metrics.graph_connectivity(nn.subset_neighbors(15), y))
    timed("pcr comparison", n, lambda: scib_metrics.pcr_comparison(X_pre, X, b, categorical=True))
    if kbet_stock:
        stock = timed(
            "kbet per label (pynndescent)", n, lambda: scib_metrics.kbet_per_label(nn.subset_neighbors(50), b, y)
        )
        print(f"kBET per label, exact vs pynndescent neighbours: {exact:.4f} vs {stock:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[500, 1000, 2000])
    parser.add_argument("--embedding-cells", type=int, nargs="+", default=[700, 2700])
    parser.add_argument("--kbet-stock", action="store_true", help="also time kBET with scib-metrics' pynndescent")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for n in args.sizes:
        x, y = rng.normal(size=(n, 30)), rng.normal(size=(n, 30)) + 0.1
        timed("wasserstein-2 (exact OT)", n, lambda x=x, y=y: gen.wasserstein(x, y, p=2))
        timed("mmd_rbf (5 bandwidths)", n, lambda x=x, y=y: gen.mmd_rbf(x, y))
        timed("energy distance", n, lambda x=x, y=y: gen.energy_distance(x, y))
        timed("knn real-vs-generated AUC", n, lambda x=x, y=y: gen.knn_real_vs_generated_auc(x, y))
    for n in args.embedding_cells:
        embedding_timings(n, rng, args.kbet_stock)


if __name__ == "__main__":
    main()
