"""Shared helpers: config validation and defaults, dataset lookups, resources, targets."""

import copy
import sys
from pathlib import Path

from snakemake.utils import validate

# Rule scripts import the package from src/ even when it is not installed (cluster conda envs).
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

validate(config, schema="../../config/schema.yaml")

DATASETS = sorted(config["datasets"])
SHARED = "results/shared"


wildcard_constraints:
    dataset="|".join(DATASETS),


def dataset_cfg(dataset):
    """The dataset's entry with schema defaults filled in."""
    return config["datasets"][dataset]


def qc_cfg(dataset):
    """Global qc settings with the dataset's overrides applied (nested keys merged)."""
    merged = copy.deepcopy(config["qc"])
    for key, value in dataset_cfg(dataset).get("qc", {}).items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def dataset_input(wildcards):
    return dataset_cfg(wildcards.dataset)["path"]


def cpu_resources():
    """Resources of CPU rules: memory grows with each retry, no GPU."""
    res = config["resources"]["cpu"]
    return dict(
        mem_mb=lambda wc, attempt: res["mem_mb"] * attempt,
        runtime=res["runtime"],
    )


def gpu_resources(family):
    """Resources of a GPU rule family (embed, pretrain_se, xpressor, diffusion) from the config.

    Only set keys are passed on, so the profile can override any of them per rule.
    """
    res = config["resources"][family]
    out = dict(
        mem_mb=lambda wc, attempt: res["mem_mb"] * attempt,
        runtime=res["runtime"],
        gpu=res.get("gpu", 1),
    )
    for key in ("gpu_model", "cpus_per_gpu", "tasks", "nodes"):
        if res.get(key) is not None:
            out[key] = res[key]
    return out


def all_input():
    """Every enabled stage's final outputs, for `rule all`."""
    targets = []
    for ds in DATASETS:
        targets += [
            f"results/{ds}/qc/filtered.h5ad",
            f"results/{ds}/qc/summary.json",
            f"results/{ds}/qc/metrics.tsv",
            f"results/{ds}/qc/qc_distributions.png",
            f"results/{ds}/qc/counts_vs_genes.png",
        ]
    return targets
