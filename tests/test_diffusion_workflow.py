"""The diffusion rules on the demo: latent space (default config, after the Xpressor rules) and
gene space (its own copy of the workflow, reusing the demo's QC output)."""

import json
import shutil

import anndata as ad
import numpy as np
import pytest
import yaml
from conftest import copy_workflow, run_snakemake

TARGET = "results/pbmc68k/diffusion/summary.json"


def check_samples(workdir):
    samples = ad.read_h5ad(workdir / "results/pbmc68k/diffusion/samples.h5ad")
    real = ad.read_h5ad(workdir / "results/pbmc68k/qc/filtered.h5ad", backed="r")
    test = real.obs[real.obs["split"] == "test"]
    assert samples.n_obs == len(test)
    assert list(samples.var_names) == list(real.var_names)
    assert sorted(samples.obs["bulk_labels"].astype(str)) == sorted(test["bulk_labels"].astype(str))
    assert np.isfinite(samples.layers["mean"]).all()
    assert samples.X.sum() > 0
    return json.loads((workdir / TARGET).read_text())


@pytest.mark.workflow
def test_latent_diffusion_demo_and_guidance(demo_workdir):
    run_snakemake(demo_workdir, TARGET)
    summary = check_samples(demo_workdir)
    assert summary["token_space"] == "latent"
    metrics = (demo_workdir / "results/pbmc68k/diffusion/train/logs/version_0/metrics.csv").read_text()
    assert "train_loss" in metrics
    # guidance matters: a classifier trained on real cells' latent tokens assigns generated cells
    # their requested cell type more often with guidance than without conditioning
    accuracy = summary["guidance_check"]["latent"]["accuracy"]
    assert accuracy["guided (scale 2)"] > accuracy["unconditional (scale 0)"] + 0.1
    assert accuracy["conditional (scale 1)"] > accuracy["unconditional (scale 0)"]
    # re-running is a no-op (outputs complete, nothing left half-written)
    proc = run_snakemake(demo_workdir, TARGET, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_gene_space_diffusion_demo(demo_workdir, tmp_path):
    run_snakemake(demo_workdir, "results/pbmc68k/qc/filtered.h5ad")
    workdir = copy_workflow(tmp_path / "gene")
    for part in ("results/demo", "results/pbmc68k/qc"):
        shutil.copytree(demo_workdir / part, workdir / part)
    config_path = workdir / "config/config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["diffusion"].update(
        token_space="gene", gene_tokens=8, gene_token_dim=16, gene_encoder_hidden=64, d_model=64, n_layers=2
    )
    config["diffusion"]["train"].update(max_steps=150)
    config["diffusion"]["sample"].update(steps=20)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_snakemake(workdir, TARGET)
    summary = check_samples(workdir)
    assert summary["token_space"] == "gene"
    assert set(summary["guidance_check"]["expression"]["accuracy"]) == {
        "guided (scale 2)",
        "conditional (scale 1)",
        "unconditional (scale 0)",
    }
