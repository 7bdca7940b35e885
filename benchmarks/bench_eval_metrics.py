"""Time and peak memory of the evaluation metrics at growing sizes (CPU, one thread).

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval_metrics.py [--sizes 500 1000 2000]

Prints one line per (metric, n): seconds and the peak resident memory growth of the process.
The generation metrics are O(n^2) in memory and time (exact OT is worse in time), which is why
evaluate.generation.max_cells caps the cells per set and condition.
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


def timed(name: str, n: int, fn) -> None:
    before = peak_mb()
    start = time.perf_counter()
    fn()
    print(f"{name:28s} n={n:6d}  {time.perf_counter() - start:8.2f} s  peak RSS +{max(0.0, peak_mb() - before):7.0f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--embedding-cells", type=int, nargs="+", default=[2000, 10000])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for n in args.sizes:
        x, y = rng.normal(size=(n, 30)), rng.normal(size=(n, 30)) + 0.1
        timed("wasserstein-2 (exact OT)", n, lambda: gen.wasserstein(x, y, p=2))
        timed("mmd_rbf (5 bandwidths)", n, lambda: gen.mmd_rbf(x, y))
        timed("energy distance", n, lambda: gen.energy_distance(x, y))
        timed("knn real-vs-generated AUC", n, lambda: gen.knn_real_vs_generated_auc(x, y))
    for n in args.embedding_cells:
        X = rng.normal(size=(n, 50)).astype(np.float32)
        labels = rng.integers(0, 10, size=n)
        batches = rng.integers(0, 3, size=n)
        timed("knn label transfer 5-fold", n, lambda: emb.knn_label_transfer(X, labels))
        timed("asw_label", n, lambda: emb.asw_label(X, labels))
        timed("leiden nmi/ari (20 res.)", n, lambda: emb.leiden_nmi_ari(X, labels))
        timed("ilisi", n, lambda: emb.ilisi(X, batches))
        timed("kbet acceptance", n, lambda: emb.kbet_acceptance(X, batches))
        timed("asw_batch", n, lambda: emb.asw_batch(X, batches, labels))


if __name__ == "__main__":
    main()
