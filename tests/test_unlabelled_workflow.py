"""Datasets are independent: an unlabelled dataset runs every stage to the report while another
dataset is broken (issue 14); settings that cannot change results schedule nothing; a dataset
added after training does not retrain the vocabulary or SE model (a pinned list, or null: the list
recorded at their training)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, run_snakemake


def _synthetic(path, n_cells=240, n_genes=150, seed=0, new_genes=0):
    """Counts with two hidden cell groups and two batches; obs has no label column. The last
    `new_genes` genes get names outside the first dataset's vocabulary."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n_cells)
    rate = rng.gamma(2.0, 1.0, size=(2, n_genes))
    X = rng.poisson(rate[group] * rng.uniform(2, 4, size=(n_cells, 1))).astype(np.float32)
    obs = pd.DataFrame({"batch": np.where(np.arange(n_cells) % 2, "b1", "b2")}, index=[f"c{i}" for i in range(n_cells)])
    adata = ad.AnnData(X, obs=obs)
    adata.var_names = [f"G{i}" for i in range(n_genes - new_genes)] + [f"NEW{i}" for i in range(new_genes)]
    adata.write_h5ad(path)


def _tiny_config(work, datasets):
    """The demo config with `datasets` and models small enough for seconds per stage."""
    path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    qc = {"min_genes": 10, "min_counts": 10, "min_cells": 1, "doublets": {"enabled": False}}
    cfg["datasets"] = {name: {"path": p, "batch": "batch", "qc": qc} for name, p in datasets.items()}
    cfg["vocab"].update(dim=8, datasets=["unl"])
    cfg["tokenize"].update(length=32)
    cfg["se"].update(d_model=16, n_heads=2, d_hid=32, n_layers=1, output_dim=8)
    cfg["se"]["pretrain"].update(max_steps=4, warmup_steps=1, batch_size=8, P=8, N=4, S=4, sentence_genes=16)
    cfg["embed"].update(pca_components=5)
    cfg["xpressor"].update(n_latent=2, d_model=16, n_layers=1, n_heads=2, adapter_hidden=16)
    cfg["xpressor"]["train"].update(max_epochs=1, batch_size=64, genes_per_step=32)
    cfg["diffusion"].update(d_model=32, n_layers=1, n_heads=2)
    cfg["diffusion"]["train"].update(max_steps=4, log_every_n_steps=1)
    cfg["diffusion"]["sample"].update(steps=2)
    cfg["evaluate"].update(leiden_resolutions=[0.5, 1.0], n_folds=2, pca={"n_hvg": 100, "n_pcs": 5})
    cfg["evaluate"]["generation"].update(n_hvg=100, n_pcs=5, min_cells_per_group=5)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


RESULT_FREE = {  # settings documented not to change results: no re-run when they change
    ("tokenize", "workers"): 2,
    ("tokenize", "chunk_size"): 7,
    ("embed", "batch_size"): 5,
    ("xpressor", "encode", "batch_size"): 3,
    ("diffusion", "sample", "batch_size"): 11,
}


@pytest.fixture(scope="module")
def kept_going(tmp_path_factory):
    """`rule all --keep-going` with an unlabelled dataset beside a broken one; vocabulary and SE
    model pinned to the unlabelled dataset."""
    work = copy_workflow(tmp_path_factory.mktemp("unlabelled") / "wf")
    _synthetic(work / "unl.h5ad")
    (work / "broken.h5ad").write_bytes(b"this is not an HDF5 file")
    _tiny_config(work, {"unl": "unl.h5ad", "broken": "broken.h5ad"})
    proc = run_snakemake(work, "--keep-going", check=False)
    return work, proc


@pytest.mark.workflow
def test_unlabelled_dataset_runs_to_the_report_beside_a_broken_one(kept_going):
    work, proc = kept_going
    assert proc.returncode != 0  # the broken dataset fails its QC ...
    assert "broken.h5ad" in (work / "logs" / "broken" / "qc.log").read_text()
    assert not (work / "results" / "broken" / "qc" / "filtered.h5ad").exists()
    # ... and the unlabelled one still reaches every target of rule all
    res = work / "results" / "unl"
    emb = json.loads((res / "eval" / "embeddings.json").read_text())
    assert emb["label"] is None and emb["n_unlabelled"] == emb["n_cells"] > 0
    assert {"knn_accuracy", "nmi", "asw_label", "bio_conservation"} <= set(emb["skipped"])
    assert "cell_type is null" in emb["skipped"]["knn_accuracy"]
    assert {"ilisi", "kbet_acceptance", "asw_batch"} <= set(emb["scores"]["se"])  # batch metrics need no labels
    table = pd.read_csv(res / "eval" / "embeddings.tsv", sep="\t")
    nmi = table[table["metric"] == "nmi"]
    assert len(nmi) == 4 and nmi["value"].isna().all() and nmi["skipped"].str.contains("cell_type").all()
    knn = json.loads((res / "embed" / "knn_accuracy.json").read_text())
    assert knn["label"] is None and knn["accuracy"] == {} and "cell_type" in knn["skipped"]
    gen = json.loads((res / "eval" / "generation.json").read_text())
    assert gen["condition_columns"] == [] and {"label_accuracy", "per-condition scores"} <= set(gen["skipped"])
    assert np.isfinite(gen["metrics"]["all"]["diffusion"]["w2"])
    diffusion = json.loads((res / "diffusion" / "summary.json").read_text())
    assert diffusion["conditions"] == [] and "guidance_check" not in diffusion  # nothing to classify
    assert "unconditional" in (work / "logs" / "unl" / "diffusion_train.log").read_text()
    assert "without label tokens" in (work / "logs" / "unl" / "xpressor_train.log").read_text()
    assert "['unl']" in (work / "logs" / "shared" / "pretrain_se.log").read_text()
    for target in ("reconstruction.json", "generation_umap.png", "embeddings_umap.png", "embeddings_metrics.png"):
        assert (res / "eval" / target).stat().st_size > 0

    # every job wrote its benchmark file, and costs.tsv has one row per job behind the dataset
    # (shared ones included; stage_costs itself has none: it runs after the table's jobs)
    costs = pd.read_csv(res / "eval" / "costs.tsv", sep="\t")
    written = {
        p.stem
        for p in [*(res / "benchmarks").glob("*.tsv"), *(work / "results" / "shared" / "benchmarks").glob("*.tsv")]
    }
    assert sorted(costs["job"]) == sorted(written - {"stage_costs"})
    assert set(costs["rule"]) == {
        "build_vocab",
        "pretrain_se",
        "random_se",
        "qc",
        "tokenize",
        "embed",
        "embed_umap",
        "embed_knn",
        "xpressor_train",
        "xpressor_encode",
        "evaluate_embeddings",
        "evaluate_xpressor",
        "diffusion_train",
        "diffusion_sample",
        "evaluate_generation",
    }
    assert len(costs) == 17 and (costs["wall_s"] > 0).all() and costs["wall_share"].sum() == pytest.approx(1, abs=0.01)
    assert costs.set_index("job").loc[["build_vocab", "pretrain_se", "qc"], "scope"].tolist() == [
        "shared",
        "shared",
        "dataset",
    ]
    assert costs["max_rss_mb"].max() > 50  # a python process with torch or scanpy loaded

    # the report builds from the finished dataset and says which label metrics were skipped
    report = work / "report.html"
    # (rule all's report needs every dataset's files: name the finished dataset's targets)
    run_snakemake(
        work,
        "--report",
        str(report),
        *(f"results/unl/{n}" for n in ("eval/embeddings.json", "eval/generation.json", "embed/knn_accuracy.json")),
    )
    html = report.read_text()
    assert "No cell-type labels" in html and "No diffusion conditions" in html and "Skipped</strong>" in html


@pytest.mark.workflow
def test_batch_sizes_workers_and_a_new_dataset_schedule_no_retraining(kept_going):
    work, _ = kept_going
    path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for keys, value in RESULT_FREE.items():
        section = cfg
        for key in keys[:-1]:
            section = section[key]
        section[keys[-1]] = value
    # null = the list recorded when the vocabulary and SE model were trained (["unl"]): no change
    assert json.loads((work / "results" / "shared" / "vocab" / "datasets.json").read_text()) == ["unl"]
    cfg["vocab"]["datasets"] = None
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # rule all: only the broken dataset's jobs (its QC failed) are left
    proc = run_snakemake(work, "-n")
    scheduled = proc.stdout + proc.stderr
    assert "dataset=broken" in scheduled and "dataset=unl" not in scheduled

    # a dataset added later is tokenized against the recorded vocabulary and embedded by the
    # recorded SE model: none of the shared artifacts, nor the unlabelled dataset, is scheduled
    _synthetic(work / "late.h5ad", seed=1, new_genes=30)
    cfg["datasets"]["late"] = dict(cfg["datasets"]["unl"], path="late.h5ad")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run_snakemake(work, "-n")
    scheduled = proc.stdout + proc.stderr
    assert "dataset=late" in scheduled and "dataset=unl" not in scheduled
    for rule in ("build_vocab", "pretrain_se", "random_se"):
        assert f"rule {rule}" not in scheduled
    # ... and runs: its tokens use the pinned vocabulary (coverage reported), the shared files stay
    shared = {p: p.stat().st_mtime for p in (work / "results" / "shared").rglob("*") if p.is_file()}
    run_snakemake(work, "results/late/embed/se.h5ad")
    coverage = pd.read_csv(work / "results" / "late" / "tokens" / "coverage.tsv", sep="\t")
    assert coverage["n_genes_matched"].item() == 120 and coverage["fraction_genes_matched"].item() == pytest.approx(0.8)
    assert {p: p.stat().st_mtime for p in shared} == shared


def test_unknown_dataset_in_a_training_list_stops_before_any_job(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    cfg = _tiny_config(work, {"unl": "unl.h5ad"})
    cfg["se"]["pretrain"]["datasets"] = ["unl", "lung"]
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run_snakemake(work, "-n", check=False)
    assert proc.returncode != 0
    assert "se.pretrain.datasets names ['lung']" in proc.stdout + proc.stderr
