"""QC metrics, filters (fixed and MAD per batch), doublets, the gene filter and the split."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from cellfoundry.demo import pbmc68k_counts
from cellfoundry.qc import annotate_genes, detect_doublets, mad_thresholds, quality_control, stratified_split
from cellfoundry.utils import UserError

BASE = {
    "filter": "fixed",
    "min_genes": None,
    "max_genes": None,
    "min_counts": None,
    "max_counts": None,
    "max_pct_mt": None,
    "max_pct_hb": None,
    "mad": {"n_mads": 3.0, "metrics": ["log1p_total_counts", "pct_counts_mt"]},
    "min_cells": 0,
    "doublets": {"enabled": False, "expected_rate": 0.06, "threshold": None},
    "test_fraction": 0.25,
}


def cfg(**kw):
    out = {**BASE, **kw}
    return out


def toy(n=40, seed=0):
    """Cells with 10 ordinary genes, 2 mito genes and one haemoglobin gene."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(10)] + ["MT-CO1", "mt-Nd1", "HBB"]
    X = rng.poisson(5, size=(n, len(genes))).astype(np.float32)
    X[:, 10:] = 0
    adata = ad.AnnData(X=sp.csr_matrix(X))
    adata.var_names = genes
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.obs["label"] = pd.Categorical(np.repeat(["a", "b"], n // 2))
    adata.obs["batch"] = pd.Categorical(np.tile(["b1", "b2"], n // 2))
    return adata


def test_gene_annotation_human_and_mouse():
    adata = ad.AnnData(X=np.zeros((1, 7), np.float32))
    adata.var_names = ["MT-CO1", "mt-Nd1", "RPL3", "Rps6", "HBB", "HBEGF", "Hba-a1"]
    annotate_genes(adata)
    assert adata.var["mt"].tolist() == [True, True, False, False, False, False, False]
    assert adata.var["ribo"].tolist() == [False, False, True, True, False, False, False]
    assert adata.var["hb"].tolist() == [False, False, False, False, True, False, True]


def test_mito_threshold_removes_the_mito_heavy_cell():
    adata = toy()
    X = adata.X.toarray()
    X[0, 10] = 500  # cell c0: mostly MT-CO1
    X[1, 11] = 5  # cell c1: a little mt-Nd1
    adata.X = sp.csr_matrix(X)
    res = quality_control(adata, cfg(max_pct_mt=20.0), seed=0)
    assert "c0" not in res.filtered.obs_names and "c1" in res.filtered.obs_names
    assert res.metrics.loc["c0", "failed_filters"] == "max_pct_mt"
    assert res.summary["steps"][0] == {"filter": "max_pct_mt", "cells_failing": 1, "cells_remaining": 39}


def test_fixed_thresholds_and_gene_filter():
    adata = toy()
    X = adata.X.toarray()
    X[2, :10] = 0
    X[2, 0] = 3  # c2 expresses one gene
    X[:, 9] = 0
    X[5, 9] = 1  # G9 is seen in one cell only
    adata.X = sp.csr_matrix(X)
    res = quality_control(adata, cfg(min_genes=2, min_cells=2), seed=0)
    assert "c2" not in res.filtered.obs_names
    assert "G9" not in res.filtered.var_names and "G0" in res.filtered.var_names
    assert res.summary["steps"][-1]["genes_failing"] >= 1
    # raw counts are kept untouched in X
    np.testing.assert_array_equal(
        res.filtered[:, "G0"].X.toarray().ravel(), adata[res.filtered.obs_names, "G0"].X.toarray().ravel()
    )


def test_mad_thresholds_are_per_batch():
    obs = pd.DataFrame(
        {
            "batch": ["x"] * 50 + ["y"] * 50,
            "log1p_total_counts": np.r_[np.full(49, 5.0), 9.0, np.full(49, 9.0), 9.1],
            "pct_counts_mt": np.zeros(100),
        }
    )
    obs.loc[:48, "log1p_total_counts"] += np.linspace(-0.1, 0.1, 49)
    obs.loc[50:98, "log1p_total_counts"] += np.linspace(-0.1, 0.1, 49)
    th = mad_thresholds(obs, cfg(filter="mad"), "batch")
    by_batch = {(t.batch, t.metric): t for t in th}
    # 9.0 is an outlier in batch x but the normal value in batch y
    assert by_batch[("x", "log1p_total_counts")].upper < 9.0 < by_batch[("y", "log1p_total_counts")].upper
    assert by_batch[("x", "pct_counts_mt")].lower is None  # percentages filtered from above only


def test_empty_result_names_each_filter():
    with pytest.raises(UserError, match=r"no cells are left after QC \(40 cells in; genes: 40 cells fail"):
        quality_control(toy(), cfg(min_genes=1000), seed=0)


def test_unknown_label_column():
    with pytest.raises(UserError, match="cell_type: nope"):
        quality_control(toy(), cfg(), cell_type="nope")


def test_split_is_stratified_and_deterministic():
    labels = pd.Series(["a"] * 80 + ["b"] * 20 + ["c"])
    split = stratified_split(labels, 101, 0.25, seed=3)
    assert (split[:80] == "test").sum() == 20 and (split[80:100] == "test").sum() == 5
    assert split[100] == "train"  # a singleton label stays in train
    np.testing.assert_array_equal(split, stratified_split(labels, 101, 0.25, seed=3))
    assert not np.array_equal(split, stratified_split(labels, 101, 0.25, seed=4))


def test_demo_counts_are_integers_and_qc_keeps_most_cells():
    adata = pbmc68k_counts()
    assert adata.shape == (700, 765)
    assert np.array_equal(adata.X.data, np.round(adata.X.data))
    res = quality_control(
        adata,
        cfg(
            min_genes=100,
            min_counts=300,
            max_pct_mt=20.0,
            min_cells=3,
            doublets={"enabled": True, "expected_rate": 0.06, "threshold": None},
        ),
        cell_type="bulk_labels",
        seed=0,
    )
    assert 600 < res.filtered.n_obs < 700
    assert res.metrics["doublet_score"].notna().sum() == 700
    # every cell type is in both splits when it has two or more cells
    table = pd.crosstab(res.filtered.obs["bulk_labels"], res.filtered.obs["split"])
    assert (table[table.sum(axis=1) >= 2] > 0).all().all()


def cells_with_doublets(n=5000, n_doublets=300, n_genes=2000, n_types=6, seed=0):
    """n cells of n_types marker-gene profiles, the last n_doublets of them real doublets (the sum
    of two simulated cells' counts); returns the AnnData and the doublet mask."""
    rng = np.random.default_rng(seed)
    profiles = np.repeat(rng.gamma(0.3, 1.0, size=n_genes)[None], n_types, axis=0)
    for t in range(n_types):
        markers = rng.choice(n_genes, 60, replace=False)
        profiles[t, markers] *= rng.uniform(10, 30, size=60)
    profiles /= profiles.sum(axis=1, keepdims=True)
    n_single = n - n_doublets
    types = rng.integers(n_types, size=n_single + 2 * n_doublets)
    X = rng.poisson(profiles[types] * rng.lognormal(np.log(1500), 0.3, size=len(types))[:, None])
    X = np.vstack([X[:n_single], X[n_single::2] + X[n_single + 1 :: 2]]).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(X))
    adata.obs_names = [f"c{i}" for i in range(n)]
    return adata, np.r_[np.zeros(n_single, bool), np.ones(n_doublets, bool)]


def test_scrublet_finds_real_doublets_among_5000_cells():
    # 5,000 cells + 10,000 simulated doublets: past the 8,192 where scanpy's approximate kNN broke
    adata, truth = cells_with_doublets()
    doublets = {"enabled": True, "expected_rate": 0.06, "threshold": None}
    called = detect_doublets(adata, doublets, None, seed=0)
    scores = adata.obs["doublet_score"].to_numpy()
    # a sixth of the doublets pair two cells of one type: they look like singlets
    assert roc_auc_score(truth, scores) > 0.9
    assert called[truth].mean() > 0.7 and called[~truth].mean() < 0.01
    # deterministic for a seed, and the per-batch loop gives one batch the same result
    again = adata.copy()
    again.obs["batch"] = "b1"
    np.testing.assert_array_equal(detect_doublets(again, doublets, "batch", seed=0), called)
    np.testing.assert_array_equal(again.obs["doublet_score"].to_numpy(), scores)


def test_removing_most_cells_warns_with_the_filters_and_keys(caplog):
    adata = toy()
    X = adata.X.toarray()
    X[:30, :8] = 0  # 30 of 40 cells express only 2 genes
    adata.X = sp.csr_matrix(X)
    with caplog.at_level("WARNING", logger="cellfoundry"):
        res = quality_control(adata, cfg(min_genes=5, max_pct_mt=20.0), seed=0)
    warning = res.summary["large_removal"]
    assert warning["cells_removed"] == 30 and warning["fraction_removed"] == 0.75
    assert warning["filters"] == [{"filter": "genes", "cells_failing": 30, "config_key": "qc.min_genes / qc.max_genes"}]
    assert "removes 30 of 40 cells (75%)" in caplog.text and "qc.min_genes" in caplog.text
    assert "large_removal" not in quality_control(toy(), cfg(min_genes=5), seed=0).summary


def test_unlabelled_cells_are_split_at_random_not_as_a_class():
    labels = pd.Series(["a"] * 8 + [np.nan, None, "", " "] + ["b"] * 4, dtype=object)
    split = stratified_split(labels, 16, 0.25, seed=0)
    assert (split[:8] == "test").sum() == 2 and (split[12:] == "test").sum() == 1
    # the four unlabelled cells are one group (NaN, None and blanks alike): 1 in test, where
    # classes "nan" and "" would put one of each pair in test
    assert (split[8:12] == "test").sum() == 1
    adata = toy(16)
    adata.obs["label"] = pd.Categorical(labels.replace("", np.nan).replace(" ", np.nan))
    res = quality_control(adata, cfg(), cell_type="label", seed=0)
    assert res.summary["unlabelled_cells"] == 4
