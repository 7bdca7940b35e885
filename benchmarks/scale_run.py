"""Scale run: `rule all` on a synthetic raw-count data set of N cells with tiny models on the CPU,
then each job's wall time and peak memory (Snakemake's benchmark files) beside the demo's.

    nice -n 10 .venv/bin/python benchmarks/scale_run.py --cells 200000 --demo-run /tmp/cf_demo

writes the data set out of core (CSR h5ad, in chunks of cells) to WORK/scale.h5ad, runs the
workflow in WORK (a copy of config/benchmarks/scale.yaml with the data set's path; the code is
copied: later edits do not change the run) and prints one table. --demo-run DIR reads a demo run's benchmark files from
DIR (a workflow run of config/config.yaml); with --run-demo the script first runs the demo there.
--no-run prints the tables of existing runs only. Results: benchmarks/RESULTS.md, "Scale run".
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
CODE = ["Snakefile", "workflow", "scripts", "src", "profiles", "envs"]
N_MT = 13  # the mitochondrial genes of the human genome


def synthesize(path: Path, n_cells: int, n_genes: int, n_types: int, batch_cells: int, chunk: int, seed: int) -> None:
    """Negative-binomial counts of `n_types` cell types in batches of <= `batch_cells` cells,
    ~1,000-3,000 detected genes per cell, written chunk by chunk (memory: one chunk, dense)."""
    import anndata as ad
    import h5py
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    n_batches = -(-n_cells // batch_cells)
    genes = [f"MT-G{i}" for i in range(N_MT)] + [f"GENE{i}" for i in range(n_genes - N_MT)]
    base = rng.lognormal(0.0, 1.5, n_genes)
    base[:N_MT] = np.quantile(base, 0.999)  # MT genes among the most expressed (a few % of counts)
    effect = np.ones((n_types, n_genes))
    for t in range(n_types):  # 3% marker genes per type, 4x up
        effect[t, rng.choice(n_genes, n_genes * 3 // 100, replace=False)] = 4.0
    batch_effect = rng.lognormal(0.0, 0.2, (n_batches, n_genes))
    rates = (base * effect[:, None, :] * batch_effect[None, :, :]).astype(np.float32)  # [type, batch, gene]
    rates /= rates.sum(axis=2, keepdims=True)
    cell_type = rng.integers(0, n_types, n_cells)
    batch = np.arange(n_cells) * n_batches // n_cells  # contiguous batches of equal size
    library = rng.lognormal(np.log(3000), 0.35, n_cells).astype(np.float32)  # UMIs per cell
    dispersion = np.float32(2.0)  # NB shape r; variance mu + mu^2 / r
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in cell_type]),
            "batch": pd.Categorical([f"b{b}" for b in batch]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    tmp = path.with_name(f".{path.name}.tmp")
    start = time.time()
    for lo in range(0, n_cells, chunk):
        hi = min(lo + chunk, n_cells)
        mu = library[lo:hi, None] * rates[cell_type[lo:hi], batch[lo:hi]]
        # NB(mu, r) drawn sparsely (a dense draw costs ~10x more): detected with P(x > 0), then
        # the count from the NB, zeros raised to 1 (close to the zero-truncated NB at these means)
        p_zero = (dispersion / (dispersion + mu)) ** dispersion
        rows, cols = np.nonzero(rng.random(mu.shape, dtype=np.float32) >= p_zero)
        m = mu[rows, cols]
        counts = np.maximum(rng.negative_binomial(dispersion, dispersion / (dispersion + m)), 1).astype(np.float32)
        block = sp.csr_matrix((counts, (rows, cols)), shape=mu.shape)
        if lo == 0:
            ad.AnnData(block, obs=obs.iloc[:hi], var=pd.DataFrame(index=genes)).write_h5ad(tmp)
            f = h5py.File(tmp, "a")
            X_out = sparse_dataset(f["X"])
        else:
            X_out.append(block)
        print(
            f"\r  {hi:,}/{n_cells:,} cells, {block.nnz / (hi - lo):.0f} genes/cell, {time.time() - start:.0f} s",
            end="",
            flush=True,
        )
    del f["obs"]
    write_elem(f, "obs", obs)
    f.close()
    os.replace(tmp, path)
    print()


def workdir(work: Path, config: dict, code: str | None) -> Path:
    """`work` with a copy of the workflow's code (the working tree's, or commit `code`'s: a run
    is not changed by later edits) and `config` as its config/config.yaml."""
    parts = CODE + ["config/schema.yaml"]
    (work / "config").mkdir(parents=True, exist_ok=True)
    for part in parts:
        if (work / part).is_dir() and not (work / part).is_symlink():
            shutil.rmtree(work / part)
        elif (work / part).exists() or (work / part).is_symlink():
            (work / part).unlink()
    if code:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", code, *parts], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    else:
        for part in parts:
            copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
            copy(
                REPO / part,
                work / part,
                **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
            )
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work


def repo_file(path: str, code: str | None) -> str:
    """A file of the working tree, or of commit `code` (the config that goes with its code)."""
    if code:
        return subprocess.run(
            ["git", "-C", str(REPO), "show", f"{code}:{path}"], check=True, capture_output=True, text=True
        ).stdout
    return (REPO / path).read_text()


def run_all(work: Path, cores: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [str(REPO / ".venv" / "bin" / "snakemake"), "--cores", str(cores), "--keep-going", "--rerun-incomplete"]
    print(f"$ (cd {work} && {' '.join(cmd)})", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "snakemake.log", "w"))
    print(f"  exit {proc.returncode} after {time.time() - start:.0f} s (log: {work}/snakemake.log)", flush=True)


def costs(work: Path) -> pd.DataFrame:
    """Wall s and peak RSS MB per job from every benchmark file under `work`/results."""
    rows = {}
    for path in sorted((work / "results").glob("*/benchmarks/*.tsv")):
        bench = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
        rows[path.stem] = {"wall_s": bench["s"].mean(), "max_rss_mb": bench["max_rss"].max()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["wall_s", "max_rss_mb"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--cell-types", type=int, default=5)
    parser.add_argument(
        "--batch-cells", type=int, default=20_000, help="cells per batch at most (doublets: O(n^2) per batch)"
    )
    parser.add_argument("--chunk", type=int, default=2_000, help="cells generated and written at a time")
    parser.add_argument("--work", type=Path, help="default: /tmp/cellfoundry_scale_<cells>")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument(
        "--demo-run", type=Path, help="a demo run's directory: its benchmark files form the demo's columns"
    )
    parser.add_argument("--run-demo", action="store_true", help="run the demo (config/config.yaml) in --demo-run first")
    parser.add_argument(
        "--also", type=Path, nargs="*", default=[], help="earlier scale runs' directories: more columns"
    )
    parser.add_argument(
        "--extrapolate", type=int, help="also a column for this many cells, on a line through the two largest runs"
    )
    parser.add_argument("--code", help="run a commit's code (e.g. HEAD) instead of a copy of the working tree")
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="no scale run: print the tables of existing runs (after the demo with --run-demo)",
    )
    args = parser.parse_args(argv)
    work = args.work or Path(f"/tmp/cellfoundry_scale_{args.cells}")
    if args.run_demo:
        if not args.demo_run:
            sys.exit("--run-demo needs --demo-run DIR (where to run it)")
        run_all(
            workdir(args.demo_run, yaml.safe_load(repo_file("config/config.yaml", args.code)), args.code), args.cores
        )
    if not args.no_run:
        data = work / "scale.h5ad"
        if not data.exists():
            print(f"synthesizing {args.cells:,} cells x {args.genes:,} genes -> {data}", flush=True)
            work.mkdir(parents=True, exist_ok=True)
            synthesize(data, args.cells, args.genes, args.cell_types, args.batch_cells, args.chunk, seed=0)
        config = yaml.safe_load(repo_file("config/benchmarks/scale.yaml", args.code))
        config["datasets"]["scale"]["path"] = str(data)
        run_all(workdir(work, config, args.code), args.cores)
    runs = {"demo": args.demo_run} if args.demo_run else {}
    for run in [*args.also, work]:  # scale runs, by their number of cells
        if (run / "scale.h5ad").exists():
            runs[f"N={n_cells(run):,}"] = run
    table = pd.concat({name: costs(run) for name, run in runs.items()}, axis=1)
    scale = [name for name in runs if name != "demo"]
    if args.extrapolate and len(scale) >= 2:
        # a straight line through the two largest runs, per job and figure: labelled as such
        (n1, r1), (n2, r2) = sorted((n_cells(runs[s]), s) for s in scale)[-2:]
        for col in ("wall_s", "max_rss_mb"):
            slope = (table[(r2, col)] - table[(r1, col)]) / (n2 - n1)
            table[(f"N={args.extrapolate:,} extrapolated", col)] = table[(r2, col)] + slope * (args.extrapolate - n2)
    pd.set_option("display.width", 250)
    print(table.round(1).to_string(na_rep="-"))


def n_cells(run: Path) -> int:
    """The number of cells of a scale run's data set (its h5ad's obs)."""
    import h5py

    with h5py.File(run / "scale.h5ad", "r") as f:
        return len(f["obs"][f["obs"].attrs["_index"]])


if __name__ == "__main__":
    main()
