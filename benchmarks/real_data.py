"""Real data beyond the demo: the whole chain on the demo, PBMC3k and Kang 2018 at seeds 0, 1, 2,
and one table of what issue 16 asks of the learned stages, each beside its baselines:

- Xpressor's held-out per-cell Pearson against the CLS- and mean-pooled baselines (same layers,
  decoder and recipe), and whether its margin over the better baseline exceeds the seed spread;
- kNN real-vs-generated AUC (0.5 = indistinguishable) of the diffusion samples, the
  independent-genes generator and the decoded real test latents (the ceiling), with the
  ceiling's r2 of per-gene means and variances.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/real_data.py \\
        [--datasets demo pbmc3k kang] [--seeds 0 1 2] [--set xpressor.train.max_epochs=20]

Each (data set, seed) is one workflow run in WORKDIR/<data set>/seed<k> (default
results/benchmarks/real_data) with config/config.yaml (demo) or config/benchmarks/<data set>.yaml
and `seed: k`; finished runs are not re-run, an interrupted one continues. PBMC3k and Kang are
read from ../shared/data/, which a user's machine lacks: a missing file is reported and skipped,
and the script still exits 0. --no-run prints the table of the runs already in WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from workflow_runs import REPO, run_workflow, set_key

CONFIGS = {
    "demo": REPO / "config/config.yaml",
    "pbmc3k": REPO / "config/benchmarks/pbmc3k.yaml",
    "kang": REPO / "config/benchmarks/kang.yaml",
}
RECONSTRUCTION = ["xpressor", "cls", "mean"]
GENERATION = {
    "diffusion": "diffusion",
    "independent": "independent_genes (weak)",
    "ceiling": "decoded_real (ceiling)",
    "real train": "real_train (floor)",
}


def run_config(name: str, seed: int, overrides: list[str]) -> dict | None:
    """The data set's config with the seed and overrides, its data paths made absolute; None when
    a data file is missing (after saying so)."""
    config = yaml.safe_load(CONFIGS[name].read_text())
    config["seed"] = seed
    for assignment in overrides:
        set_key(config, assignment)
    for ds_name, ds in config["datasets"].items():
        if Path(ds["path"]).parts[0] == "results":
            continue  # built by the workflow in the run's directory (the demo's rule demo_data)
        path = (REPO / ds["path"]).resolve()
        if not path.exists():
            print(f"skipped {name}: {ds_name}'s counts are not at {path} (the project's shared data)")
            return None
        ds["path"] = str(path)
    return config


def targets(config: dict) -> list[str]:
    return [
        f"results/{ds}/{leaf}"
        for ds in config["datasets"]
        for leaf in ("xpressor/reconstruction.tsv", "eval/generation.json")
    ]


def scores(run_dir: Path, dataset: str) -> dict | None:
    """One run's figures, or None when it has not finished."""
    recon = run_dir / f"results/{dataset}/xpressor/reconstruction.tsv"
    gen = run_dir / f"results/{dataset}/eval/generation.json"
    if not (recon.exists() and gen.exists()):
        return None
    table = pd.read_csv(recon, sep="\t")
    pearson = table[table["metric"] == "pearson_mean"].set_index("method")["value"]
    summary = json.loads(gen.read_text())
    overall = summary["metrics"]["all"]
    row = {
        "train cells": summary["n_real_train"],
        "test cells": summary["n_real_test"],
        **{f"r {m}": float(pearson.get(m, np.nan)) for m in RECONSTRUCTION},
        **{f"AUC {short}": overall.get(method, {}).get("knn_auc", np.nan) for short, method in GENERATION.items()},
    }
    ceiling = overall.get(GENERATION["ceiling"], {})
    row["ceiling r2 mean"] = ceiling.get("r2_mean", np.nan)
    row["ceiling r2 var"] = ceiling.get("r2_var", np.nan)
    return row


def verdicts(rows: pd.DataFrame) -> dict:
    """Issue 16's criteria for one data set's seeds."""
    margin = rows["r xpressor"] - rows[["r cls", "r mean"]].max(axis=1)
    # the seed spread: the widest range over seeds of any of the three methods
    spread = max(rows[f"r {m}"].max() - rows[f"r {m}"].min() for m in RECONSTRUCTION)
    gap = rows["AUC diffusion"] - rows["AUC ceiling"]
    return {
        "Xpressor margin over the better baseline (mean)": margin.mean(),
        "seed spread": spread,
        "margin > spread": bool(margin.mean() > spread) if len(rows) > 1 else "needs >1 seed",
        "diffusion AUC below independent genes (mean)": bool(
            rows["AUC diffusion"].mean() < rows["AUC independent"].mean()
        ),
        "ceiling AUC below independent genes (mean)": bool(rows["AUC ceiling"].mean() < rows["AUC independent"].mean()),
        "diffusion within 0.05 AUC of ceiling (mean)": bool(gap.mean() <= 0.05),
    }


def markdown(table: pd.DataFrame) -> str:
    def text(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) and not v.is_integer() else str(int(v) if isinstance(v, float) else v)

    cells = [[text(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def report(workdir: Path, names: list[str], seeds: list[int]) -> str:
    lines = []
    per_seed = []
    for name in names:
        config = yaml.safe_load(CONFIGS[name].read_text())
        (dataset,) = config["datasets"]
        for seed in seeds:
            row = scores(workdir / name / f"seed{seed}", dataset)
            if row is not None:
                per_seed.append({"data set": name, "seed": seed, **row})
    if not per_seed:
        return "no finished runs"
    table = pd.DataFrame(per_seed)
    numeric = table.columns.drop(["data set", "seed"])
    lines.append(markdown(table))
    lines.append("")
    means = table.groupby("data set", sort=False)[list(numeric)].mean()
    means.insert(0, "seeds", table.groupby("data set", sort=False).size())
    lines.append("mean over seeds")
    lines.append(markdown(means.reset_index()))
    lines.append("")
    for name, rows in table.groupby("data set", sort=False):
        verdict = ", ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in verdicts(rows).items())
        lines.append(f"{name}: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workdir", type=Path, default=REPO / "results/benchmarks/real_data")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--no-run", action="store_true", help="print the table of the runs in --workdir only")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()  # snakemake runs inside each run's directory
    failed = []
    if not args.no_run:
        for name in args.datasets:
            for seed in args.seeds:
                config = run_config(name, seed, args.set)
                if config is None:
                    break
                if run_workflow(workdir / name / f"seed{seed}", config, targets(config), args.cores) != 0:
                    failed.append(f"{name} seed {seed}")
    print(report(workdir, args.datasets, args.seeds))
    if failed:
        print("failed runs (see their logs/):", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
