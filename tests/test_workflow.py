"""The real snakemake on the demo: config validation, lint, and the QC stage's outputs."""

from __future__ import annotations

import json
import subprocess

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, copy_workflow, run_snakemake


def test_lint_is_clean(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    proc = run_snakemake(work, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_are_snakefmt_formatted():
    """snakefmt (settings and directive order: pyproject.toml [tool.snakefmt]) would change nothing."""
    proc = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "Snakefile", "workflow"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["qc"].update(min_gene=5), "min_gene"),
        (lambda c: c["qc"].update(min_genes="many"), "many"),
        (lambda c: c["datasets"]["pbmc68k"].update(cell_typ="x"), "cell_typ"),
        (lambda c: c.update(device="tpu"), "tpu"),
        # DDP over 2 GPUs, but the job would hold one GPU and one task
        (lambda c: c["xpressor"]["trainer"].update(devices=2), "resources.xpressor.tasks must be 2"),
    ],
)
def test_bad_config_stops_before_any_job(tmp_path, edit, message):
    work = copy_workflow(tmp_path / "wf")
    cfg_path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(work, "-n", check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (work / "results").exists()


@pytest.mark.workflow
def test_demo_qc_outputs(demo_workdir):
    run_snakemake(demo_workdir, "results/pbmc68k/qc/summary.json")
    qc_dir = demo_workdir / "results" / "pbmc68k" / "qc"
    adata = ad.read_h5ad(qc_dir / "filtered.h5ad")
    summary = json.loads((qc_dir / "summary.json").read_text())
    metrics = pd.read_csv(qc_dir / "metrics.tsv", sep="\t", index_col=0)

    assert summary["cells_before"] == 700 and summary["cells_after"] == adata.n_obs
    assert 500 < adata.n_obs < 700 and adata.n_vars == summary["genes_after"]
    assert [s["filter"] for s in summary["steps"]][-2:] == ["doublets", "min_cells (genes)"]
    assert sum(summary["split"].values()) == adata.n_obs
    # raw integer counts are kept, labels carried, split stratified
    assert np.array_equal(adata.X.data, np.round(adata.X.data)) and adata.X.data.min() >= 1
    assert adata.obs["bulk_labels"].nunique() == 10
    assert set(adata.obs["split"]) == {"train", "test"}
    assert 0.15 < (adata.obs["split"] == "test").mean() < 0.25
    # the per-cell table covers every input cell and agrees with the h5ad
    assert len(metrics) == 700 and metrics["passed_qc"].sum() == adata.n_obs
    assert (metrics.loc[adata.obs_names, "total_counts"].to_numpy() == np.asarray(adata.X.sum(1)).ravel()).all()
    for png in ("qc_distributions.png", "counts_vs_genes.png"):
        assert (qc_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert "doublets" in (demo_workdir / "logs" / "pbmc68k" / "qc.log").read_text()


@pytest.mark.workflow
def test_two_datasets_run_side_by_side(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    rng = np.random.default_rng(0)
    small = ad.AnnData(X=rng.poisson(3, size=(120, 60)).astype(np.float32))
    small.var_names = [f"G{i}" for i in range(60)]
    small.obs_names = [f"c{i}" for i in range(120)]
    small.write_h5ad(work / "small.h5ad")
    cfg_path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["datasets"]["small"] = {
        "path": "small.h5ad",
        "qc": {"min_genes": 10, "min_counts": 10, "doublets": {"enabled": False}},
    }
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_snakemake(work, "results/small/qc/summary.json", "results/pbmc68k/qc/summary.json")
    small_summary = json.loads((work / "results/small/qc/summary.json").read_text())
    demo_summary = json.loads((work / "results/pbmc68k/qc/summary.json").read_text())
    assert small_summary["cells_before"] == 120 and demo_summary["cells_before"] == 700
    # the dataset's override applies to it only; the demo keeps the global thresholds
    assert {t["name"]: t["lower"] for t in small_summary["thresholds"]}["genes"] == 10
    assert {t["name"]: t["lower"] for t in demo_summary["thresholds"]}["genes"] == 100
    assert "doublets" not in [s["filter"] for s in small_summary["steps"]]
