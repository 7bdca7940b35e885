"""Shared helpers: config validation and defaults, dataset lookups, resources, targets."""

import copy
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# cellfoundry.slurm (standard library only) maps the trainer settings to SLURM resources.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from cellfoundry.slurm import ResourceMismatch, inference_resources, training_resources

# Rule scripts import cellfoundry from src/ even inside conda envs where it is not installed;
# job processes (local or SLURM) inherit this.
# (We set the variable rather than require it, so the envvars directive does not apply.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(workflow.basedir) / "src"), os.environ.get("PYTHONPATH")) if p
    )
)

# Per-dataset QC overrides as the user wrote them: validation fills schema defaults into them,
# which would otherwise silently replace the global qc values.
QC_OVERRIDES = {
    name: copy.deepcopy(entry.get("qc", {}))
    for name, entry in (config.get("datasets") or {}).items()
    if isinstance(entry, dict)
}

# One short message per bad key instead of snakemake's dump of the whole schema.
from cellfoundry.config import validate_config

validate_config(config, Path(workflow.basedir) / "config" / "schema.yaml")

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
    for key, value in QC_OVERRIDES[dataset].items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def dataset_input(wildcards):
    """The dataset's input, or its sample sheet and every input the sheet names (QC reruns when
    any changes)."""
    ds = dataset_cfg(wildcards.dataset)
    if ds.get("samples"):
        from cellfoundry.samples import sheet_inputs

        return sheet_inputs(ds["samples"])
    return ds["path"]


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


def training_gpu_resources(family, trainer_key):
    """Resources of a training rule: its family's memory and runtime, and GPUs, tasks and nodes
    for `trainer_key`'s devices x num_nodes DDP processes (one SLURM task per GPU, all in one
    job; see cellfoundry.slurm). Stops with the keys to fix when the two disagree."""
    res = config["resources"][family]
    trainer = config
    for part in trainer_key.split("."):
        trainer = trainer[part]
    try:
        extra = training_resources(
            res,
            trainer["devices"],
            trainer["num_nodes"],
            trainer_key=trainer_key,
            resources_key=f"resources.{family}",
        )
    except ResourceMismatch as err:
        raise WorkflowError(f"config: {err}") from None
    return dict(mem_mb=lambda wc, attempt: res["mem_mb"] * attempt, runtime=res["runtime"], **extra)


def inference_gpu_resources(family):
    """Resources of the one-process GPU rules of a training family (xpressor_encode,
    diffusion_sample): the family's memory and runtime, one GPU, one node."""
    res = config["resources"][family]
    return dict(
        mem_mb=lambda wc, attempt: res["mem_mb"] * attempt,
        runtime=res["runtime"],
        **inference_resources(res),
    )


def torch_env():
    """The conda env of the torch rules: envs/gpu.yaml (CUDA build of PyTorch) or, with
    conda_torch: cpu and no container (the image holds the CUDA env only, which runs on CPUs too),
    envs/gpu-cpu.yaml. For the CUDA env, CONDA_OVERRIDE_CUDA (unless set) is its cuda-version
    pin, so conda solves the CUDA build on a login node without a GPU."""
    if config["conda_torch"] == "cpu" and not config["container"]:
        return "../../envs/gpu-cpu.yaml"
    words = Path(workflow.basedir, "envs", "gpu.yaml").read_text().split()
    pin = next(w.partition("=")[2] for w in words if w.startswith("cuda-version="))
    os.environ.setdefault("CONDA_OVERRIDE_CUDA", pin)
    return "../../envs/gpu.yaml"


def vocab_path():
    """The gene vocabulary: the SE model folder's protein_embeddings.pt when se.model_folder is
    set, else the one rule build_vocab builds from the datasets."""
    folder = config["se"]["model_folder"]
    if folder:
        return str(Path(folder) / "protein_embeddings.pt")
    return rules.build_vocab.output.vocab


def training_datasets(stage):
    """The datasets the shared artifacts train on: stage "vocab" (vocab.datasets) or "se"
    (se.pretrain.datasets, null = the vocabulary's list). null = the datasets the artifact was
    trained on, as recorded beside it (training_record), or every configured dataset before the
    first training; so adding or breaking another dataset later neither blocks nor retrains it."""
    key = "se.pretrain.datasets" if stage == "se" else "vocab.datasets"
    names = config["se"]["pretrain"]["datasets"] if stage == "se" else None
    if names is None:
        key, names = "vocab.datasets", config["vocab"]["datasets"]
    if names is None:
        record = Path(training_record(stage))
        recorded = json.loads(record.read_text()) if record.exists() else None
        # a recorded dataset since removed from the config: train anew on the current ones
        return recorded if recorded and set(recorded) <= set(DATASETS) else DATASETS
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise WorkflowError(
            f"config: {key} names {unknown}, which are not keys of datasets ({DATASETS}); "
            "list configured datasets or set it to null."
        )
    return sorted(names)


def training_record(stage):
    """The list of datasets a shared artifact ("vocab" or "se") was trained on, written by its
    rule."""
    return f"{SHARED}/vocab/datasets.json" if stage == "vocab" else f"{SHARED}/se/datasets.json"


def report_item(path, caption, category, subcategory="{dataset}", patterns=(), **labels):
    """`path` flagged for `snakemake --report`, with caption workflow/report/<caption>.rst, under
    `category` and `subcategory`; a dataset's item (one with a subcategory) is labelled by the
    dataset first, then by `labels`."""
    if subcategory:
        labels = {"dataset": "{dataset}", **labels}
    return report(
        path,
        caption=f"../report/{caption}.rst",
        category=category,
        subcategory=subcategory,
        labels=labels,
        patterns=list(patterns),
    )


def all_input():
    """Every enabled stage's final outputs, for `rule all`."""
    targets = []
    for ds in DATASETS:
        outputs = [
            *rules.qc.output,
            *rules.tokenize.output,
            *EMBEDDINGS.values(),
            *rules.embed_knn.output,
            *expand(rules.embed_umap.output, model=SE_MODELS, allow_missing=True),
            *rules.xpressor_encode.output,
            # evaluation: embeddings and Xpressor reconstruction beside their baselines
            *rules.evaluate_embeddings.output,
            *rules.evaluate_xpressor.output,
        ]
        if config["diffusion"]["enabled"]:
            outputs += [*rules.diffusion_sample.output, *rules.evaluate_generation.output]
            # held-out combinations: their prediction scored
            if dataset_cfg(ds)["split"]["holdout"]:
                outputs += rules.evaluate_prediction.output
        outputs += rules.stage_costs.output  # costs.smk
        targets += expand(outputs, dataset=ds)
    return targets


def stage_benchmarks(ds):
    """(rule, benchmark file) of every job behind dataset `ds`'s targets of rule all, shared jobs
    included: the inputs of stage_costs. Benchmark files are the jobs' declared `benchmark:`
    outputs, so listing them schedules nothing that rule all would not run. A new rule on the
    path to rule all's targets belongs here too (tests check that every job that ran has a row)."""

    def job(name, **wildcards):
        return name, expand(getattr(rules, name).benchmark, dataset=ds, **wildcards)[0]

    jobs = [job("random_se")]
    if config["se"]["model_folder"]:
        jobs.append(job("link_se_checkpoint"))
    else:
        jobs += [job("build_vocab"), job("pretrain_se")]
    if dataset_cfg(ds).get("path") == rules.demo_data.output[0]:
        jobs.insert(0, job("demo_data"))
    jobs += [job("qc"), job("tokenize")]
    for model in SE_MODELS:
        if SHARDS > 1:
            jobs += [job("embed", model=model, shard=i) for i in range(SHARDS)]
            jobs.append(job("embed_gather", model=model))
        else:
            jobs.append(job("embed", model=model))
        jobs.append(job("embed_umap", model=model))
    names = [
        "embed_knn",
        "xpressor_train",
        "xpressor_encode",
        "evaluate_embeddings",
        "evaluate_xpressor",
    ]
    # optional stages: each rule with one of its outputs that rule all asks for
    targets = set(all_input())
    optional = {
        "diffusion_train": rules.diffusion_sample.output.samples,
        "diffusion_sample": rules.diffusion_sample.output.samples,
        "evaluate_generation": rules.evaluate_generation.output.table,
        "evaluate_prediction": rules.evaluate_prediction.output.table,
    }
    names += [name for name, target in optional.items() if expand(target, dataset=ds)[0] in targets]
    return jobs + [job(name) for name in names]
