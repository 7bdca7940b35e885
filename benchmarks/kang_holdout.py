"""Kang 2018 leave-one-cell-type-out benchmark: for each of the 7 cell types, its stimulated cells
are held out of every training stage and predicted by the diffusion model from the parts
(cell type, stimulus) it saw elsewhere (by default editing real control cells of the type:
diffusion.sample.heldout_from); rule evaluate_prediction scores it beside the no-change,
linear-shift and split-half rows. Prints one table (R2 of the top-100 DE genes' means, and more).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/kang_holdout.py \\
        [--types CD4T B] [--set diffusion.sample.heldout_from=noise]

One workflow run holds the 7 datasets kang_<type> (config/benchmarks/kang_holdout.yaml is their
template), in --workdir (default results/benchmarks/kang_holdout); finished types are not re-run.
The default config runs in gene space, which needs no vocabulary or SE model; with
diffusion.token_space=latent the 7 datasets share one vocabulary and one SE pretraining
(results/shared in the workdir; see config/README.md for what it sees).
Without the data file it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import yaml
from workflow_runs import REPO, run_workflow, set_key

DATA = REPO.parent / "shared" / "data" / "kang2018_ifnb_counts.h5ad"
TYPES = ["B", "CD14+Mono", "CD4T", "CD8T", "Dendritic", "FCGR3A+Mono", "NK"]
ROWS = [
    ("diffusion", "model"),
    ("no change (control cells)", "no change"),
    ("linear shift", "linear shift"),
    ("split-half (ceiling)", "split-half"),
]


def dataset_name(cell_type: str) -> str:
    return "kang_" + re.sub(r"[^A-Za-z0-9_.-]", "", cell_type)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--workdir", type=Path, default=REPO / "results/benchmarks/kang_holdout")
    ap.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. diffusion.sample.guidance_scale=1",
    )
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()  # snakemake runs inside it
    if not args.data.exists():
        print(f"skipped: the Kang 2018 counts are not at {args.data} (pass --data)")
        return 0
    template = yaml.safe_load((REPO / "config/benchmarks/kang_holdout.yaml").read_text())
    entry = template["datasets"].pop("kang")
    for assignment in args.set:
        set_key(template, assignment)
    template["datasets"] = {}
    for cell_type in TYPES:  # all 7 always configured: the shared artifacts see the same datasets
        ds = copy.deepcopy(entry)
        ds["path"] = str(args.data.resolve())
        ds["split"] = {"holdout": [{"cell_type": cell_type, "condition": "stimulated"}]}
        template["datasets"][dataset_name(cell_type)] = ds
    targets = [f"results/{dataset_name(t)}/eval/prediction.json" for t in args.types]
    # one torch thread per job: two threads on the shared 2-core VM ran ~4x slower per step
    options = ["--keep-going", "--set-threads", "diffusion_train=1", "diffusion_sample=1"]
    returncode = run_workflow(args.workdir, template, targets, args.cores, options)
    print(table(args.workdir, args.types))
    return returncode


def table(workdir: Path, types: list[str]) -> str:
    """Markdown: one line per type, R2 of the DE genes' means per method, and the model's other scores."""
    head = (
        ["cell type (held out: stimulated)", "cells"]
        + [f"R2 DE, {short}" for _, short in ROWS]
        + ["model R2 all", "model delta-r DE", "model energy", "no-change energy"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    wins = {"no change": 0, "linear shift": 0}
    done = 0
    for cell_type in types:
        path = workdir / f"results/{dataset_name(cell_type)}/eval/prediction.json"
        if not path.exists():
            lines.append(f"| {cell_type} | not finished |" + " |" * (len(head) - 2))
            continue
        summary = json.loads(path.read_text())
        (metrics,) = summary["metrics"].values()
        tsv = (path.parent / "prediction.tsv").read_text().splitlines()
        n_cells = next(
            line.split("\t")[-1]
            for line in tsv[1:]
            if line.startswith(f"cell_type={cell_type}") and "\tdiffusion\t" in line
        )
        r2 = {short: metrics[name]["r2_de"] for name, short in ROWS}
        done += 1
        wins["no change"] += r2["model"] > r2["no change"]
        wins["linear shift"] += r2["model"] > r2["linear shift"]
        model = metrics["diffusion"]
        lines.append(
            f"| {cell_type} | {n_cells} | "
            + " | ".join(f"{r2[s]:.3f}" for _, s in ROWS)
            + f" | {model['r2_all']:.3f} | {model['delta_pearson_de']:.3f} | {model['energy']:.2f}"
            + f" | {metrics[ROWS[1][0]]['energy']:.2f} |"
        )
    lines.append(
        f"\nmodel R2 DE above no change on {wins['no change']} of {done} types, "
        f"above linear shift on {wins['linear shift']} of {done}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
