"""Throughput and peak memory of the out-of-core tokenizer on a synthetic count matrix.

Writes a synthetic h5ad (cells x genes, about --nnz non-zeros per cell, raw integer counts) under
--workdir (generated in a child process, so its memory does not count), then tokenizes it with
cellfoundry.tokenize.tokenize_h5ad exactly as the workflow's rule does, and prints cells/s (wall
and per CPU-second: user + system time of the whole call, reading, tokenizing and writing, worker
processes included) and the peak resident memory of the tokenizing process(es).

    .venv/bin/python benchmarks/bench_tokenize.py --cells 100000 --genes 20000 --nnz 2000 --length 2048
    .venv/bin/python benchmarks/bench_tokenize.py --cells 1000000 --workers 2
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(
    path: Path, n_cells: int, n_genes: int, nnz: int, seed: int, distinct: int | None = None, chunk: int = 2000
) -> None:
    """Write a CSR h5ad chunk by chunk (memory independent of n_cells). With `distinct`, only the
    first `distinct` cells are drawn and the rest repeat them (fast to write 1,000,000 cells)."""
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    # Gene detection probabilities with a long tail, scaled so a cell expresses ~nnz genes.
    p = 1.0 / np.arange(1, n_genes + 1) ** 0.6
    p = np.minimum(p * nnz / p.sum(), 0.98)
    p = rng.permutation(p).astype(np.float32)
    mean = (1 + 30 * p).astype(np.float32)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        X = f.create_group("X")
        X.attrs["encoding-type"], X.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        X.attrs["shape"] = (n_cells, n_genes)
        data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,))
        indices = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        done = 0
        distinct = (distinct or n_cells) // chunk * chunk or chunk
        for start in range(0, n_cells, chunk):
            stop = min(start + chunk, n_cells)
            if start >= distinct:  # repeat an already written block of cells
                src = start % distinct
                a, b = indptr[src], indptr[src + stop - start]
                c, vals = indices[a:b], data[a:b]
                per_row = np.diff(indptr[src : src + stop - start + 1])
            else:
                hit = rng.random((stop - start, n_genes), dtype=np.float32) < p
                r, c = np.nonzero(hit)
                vals = (1 + rng.poisson(mean[c])).astype(np.float32)
                per_row = np.bincount(r, minlength=stop - start)
            indptr[start + 1 : stop + 1] = done + np.cumsum(per_row)
            data.resize((done + len(c),))
            indices.resize((done + len(c),))
            data[done:] = vals
            indices[done:] = c.astype(np.int32)
            done += len(c)
        X.create_dataset("indptr", data=indptr)
        ad.io.write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        ad.io.write_elem(f, "var", pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)]))
    tmp.rename(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--nnz", type=int, default=2_000, help="mean non-zeros per cell")
    ap.add_argument("--length", type=int, default=2048, help="sentence length L")
    ap.add_argument("--method", default="se", choices=["se", "topk"])
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--distinct-cells",
        type=int,
        default=None,
        help="draw only this many cells and repeat them (writes 1,000,000 cells quickly)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic h5ad and tokens for the next run")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    h5ad = args.workdir / f"synthetic_{args.cells}x{args.genes}_{args.nnz}.h5ad"
    if args.generate_only:
        generate(h5ad, args.cells, args.genes, args.nnz, args.seed, args.distinct_cells)
        return
    if not args.measure:
        if not h5ad.exists():
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, __file__, "--generate-only", *sys.argv[1:]]
                if argv is None
                else [sys.executable, __file__, "--generate-only", *argv],
                check=True,
            )
            print(
                f"generated {h5ad.name} ({h5ad.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        # Measure in a fresh process: its peak RSS and children are the tokenizer's alone.
        rc = subprocess.run(
            [sys.executable, __file__, "--measure", *(sys.argv[1:] if argv is None else argv)]
        ).returncode
        if not args.keep:
            h5ad.unlink()
        sys.exit(rc)

    import torch

    from cellfoundry.tokenize import tokenize_h5ad
    from cellfoundry.utils import setup_logging
    from cellfoundry.vocab import GeneVocab

    setup_logging(None)
    vocab = GeneVocab([f"GENE{i}" for i in range(args.genes)], torch.zeros(args.genes, 1))
    out = args.workdir / "tokens"
    shutil.rmtree(out, ignore_errors=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cpu0, t0 = os.times(), time.perf_counter()
    tokenize_h5ad(
        h5ad,
        out,
        vocab,
        args.length,
        args.method,
        args.seed,
        args.chunk_size,
        args.workers,
        min_coverage=0.5,
        dataset="synthetic",
    )
    wall, cpu1 = time.perf_counter() - t0, os.times()
    cpu = (
        (cpu1.user - cpu0.user)
        + (cpu1.system - cpu0.system)
        + (cpu1.children_user - cpu0.children_user)
        + (cpu1.children_system - cpu0.children_system)
    )
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(
        f"cells={args.cells} genes={args.genes} nnz/cell~{args.nnz} L={args.length} method={args.method} "
        f"chunk={args.chunk_size} workers={args.workers}"
    )
    user = (cpu1.user - cpu0.user) + (cpu1.children_user - cpu0.children_user)
    print(
        f"wall {wall:.1f} s -> {args.cells / wall:,.0f} cells/s; CPU {cpu:.1f} s (user {user:.1f} s, "
        f"system {cpu - user:.1f} s) -> {args.cells / cpu:,.0f} cells/s per core (user + system); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"peak RSS: tokenizing process {peak_self:.2f} GiB (of which {rss_before:.2f} GiB before tokenizing: "
        f"imports)" + (f"; largest worker process {peak_child:.2f} GiB" if args.workers > 1 else "")
    )
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
