"""The embedding stage run by the real snakemake on the demo: own SE pretraining, embeddings of
the pretrained and the random-weights model, kNN comparison, UMAPs; sharded = unsharded."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import copy_workflow, run_snakemake

DS = "pbmc68k"
EMBED = f"results/{DS}/embed"
TARGETS = [
    f"{EMBED}/se.h5ad",
    f"{EMBED}/random.h5ad",
    f"{EMBED}/knn_accuracy.json",
    f"{EMBED}/se_umap.png",
    f"{EMBED}/random_umap.png",
]


@pytest.fixture(scope="module")
def embedded(demo_workdir):
    run_snakemake(demo_workdir, *TARGETS)
    return demo_workdir


@pytest.mark.workflow
def test_pretrained_embedding_carries_cell_types_better_than_random(embedded):
    knn = json.loads((embedded / EMBED / "knn_accuracy.json").read_text())
    acc = knn["accuracy"]
    assert knn["label"] == "bulk_labels" and set(acc) == {"se", "random", "pca50"}
    assert acc["se"] > acc["random"] + 0.05, acc
    losses = pd.read_csv(embedded / "results/shared/se/pretrain_losses.tsv", sep="\t")
    assert losses["train_loss"].tail(3).mean() < losses["train_loss"].head(2).mean()
    assert "cells/s" in (embedded / f"logs/{DS}/embed_se.log").read_text()  # progress in the rule's log


@pytest.mark.workflow
def test_embedding_files_follow_the_data_contract(embedded):
    cells = ad.read_h5ad(embedded / f"results/{DS}/qc/filtered.h5ad", backed="r")
    for model in ("se", "random"):
        emb = ad.read_h5ad(embedded / EMBED / f"{model}.h5ad")
        assert list(emb.obs_names) == list(cells.obs_names)
        assert "bulk_labels" in emb.obs and "split" in emb.obs
        X = emb.obsm["X_state"]
        assert X.shape == (cells.n_obs, 32 + 10) and X.dtype == np.float32 and np.isfinite(X).all()
        np.testing.assert_allclose(np.linalg.norm(X[:, :32], axis=1), 1.0, atol=1e-5)
        assert (embedded / EMBED / f"{model}_umap.png").stat().st_size > 10_000


@pytest.mark.workflow
def test_sharded_embedding_equals_unsharded(embedded, tmp_path):
    sharded = copy_workflow(tmp_path / "sharded")
    shutil.copytree(embedded / "results", sharded / "results")
    (sharded / f"{EMBED}/se.h5ad").unlink()
    (sharded / "shards.yaml").write_text("embed:\n  shards: 3\n")
    # targets before --configfile, which takes every following word as a config file
    proc = run_snakemake(sharded, f"{EMBED}/se.h5ad", "--configfile", "config/config.yaml", "shards.yaml")
    assert "embed_gather" in proc.stdout + proc.stderr
    for k in range(3):
        assert (sharded / f"logs/{DS}/embed_se.{k}.log").exists()
    whole = ad.read_h5ad(embedded / EMBED / "se.h5ad")
    gathered = ad.read_h5ad(sharded / EMBED / "se.h5ad")
    np.testing.assert_array_equal(gathered.obsm["X_state"], whole.obsm["X_state"])
    pd.testing.assert_frame_equal(gathered.obs, whole.obs)
