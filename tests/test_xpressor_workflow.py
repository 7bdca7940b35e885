"""The Xpressor rules through the real snakemake on the demo (SE pretraining runs first)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_snakemake

from cellfoundry.models.xpressor import load_xpressor


@pytest.fixture(scope="module")
def xpressor_demo(demo_workdir):
    run_snakemake(demo_workdir, "results/pbmc68k/xpressor/summary.json")
    return demo_workdir


@pytest.mark.workflow
def test_xpressor_stage_on_demo(xpressor_demo):
    demo_workdir = xpressor_demo
    cfg = yaml.safe_load((demo_workdir / "config" / "config.yaml").read_text())["xpressor"]
    res = demo_workdir / "results" / "pbmc68k"
    cells = ad.read_h5ad(res / "qc" / "filtered.h5ad", backed="r")
    n_tokens = cfg["n_latent"] + len(cfg["labels"])

    latents = np.load(res / "xpressor" / "latents.npy", mmap_mode="r")
    assert latents.shape == (cells.n_obs, n_tokens, cfg["d_model"]) and latents.dtype == np.float32
    assert np.isfinite(latents).all()
    emb = ad.read_h5ad(res / "xpressor" / "embedding.h5ad")
    assert list(emb.obs_names) == list(cells.obs_names)
    assert emb.obsm["X_xpressor"].shape == (cells.n_obs, cfg["label_dim"])

    ckpt = load_xpressor(
        res / "xpressor" / "model.ckpt", base_checkpoint=demo_workdir / "results/shared/se/pretrained.ckpt"
    )
    assert ckpt.base_state_dict == {}  # the SE model stayed frozen

    summary = json.loads((res / "xpressor" / "summary.json").read_text())
    assert 0 < summary["trainable_fraction"] < 1
    table = pd.read_csv(res / "xpressor" / "reconstruction.tsv", sep="\t")
    assert set(table.method) == {"xpressor", "cls", "mean"}
    value = table.set_index(["method", "metric"])["value"]
    assert summary["xpressor_beats_baselines"] == all(
        value["xpressor", "pearson_mean"] > value[b, "pearson_mean"] and value["xpressor", "mse"] < value[b, "mse"]
        for b in ("cls", "mean")
    )
    assert set(summary["knn_accuracy"]["bulk_labels"]) == {"xpressor", "se_cls"}

    log = (demo_workdir / "logs" / "pbmc68k" / "xpressor_train.log").read_text()
    assert "steps/s" in log and "trainable parameters" in log
    assert (res / "xpressor" / "train" / "xpressor" / "logs" / "version_0" / "metrics.csv").exists()


@pytest.mark.workflow
def test_xpressor_beats_mean_pooling_and_ties_cls_on_the_demo(xpressor_demo):
    """Held-out demo cells at the demo's seed (0), per-cell Pearson: Xpressor beats the
    mean-pooled baseline and ties the CLS baseline (within 0.003). What was measured at seeds 0
    and 1 with the plateau learning-rate schedule: Xpressor 0.661 / 0.662, CLS 0.662 / 0.662,
    mean 0.658 / 0.658 (benchmarks/RESULTS.md, issue 16). Issue 16's criterion, beating both by
    more than the seed spread, is not met on the demo: this test guards the tie, not a win."""
    table = pd.read_csv(xpressor_demo / "results/pbmc68k/xpressor/reconstruction.tsv", sep="\t")
    pearson = table.set_index(["method", "metric"])["value"].xs("pearson_mean", level="metric")
    assert pearson["xpressor"] > pearson["mean"]
    assert pearson["xpressor"] > pearson["cls"] - 0.003
