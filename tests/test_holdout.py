"""Held-out condition splits (datasets.<name>.split.holdout): QC puts every cell of a held-out
combination in the test split, and no training stage reads it; bad holdouts are refused."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from conftest import SHARED, copy_workflow, run_snakemake

from cellfoundry.qc import quality_control
from cellfoundry.utils import UserError

QC = {
    "filter": "fixed",
    "min_genes": None,
    "max_genes": None,
    "min_counts": None,
    "max_counts": None,
    "max_pct_mt": None,
    "max_pct_hb": None,
    "mad": {"n_mads": 3.0, "metrics": ["log1p_total_counts"]},
    "min_cells": 0,
    "doublets": {"enabled": False, "expected_rate": 0.06, "threshold": None},
    "test_fraction": 0.25,
}
HOLDOUT = [{"cell_type": "A", "condition": "stim"}]


def cells(seed=0):
    """3 cell types x control/stim, 20 cells each; gene MARK is expressed only by A+stim cells."""
    rng = np.random.default_rng(seed)
    types, conds = np.repeat(["A", "B", "C"], 40), np.tile(np.repeat(["ctrl", "stim"], 20), 3)
    X = rng.poisson(3, size=(120, 12)).astype(np.float32)
    X[:, -1] = np.where((types == "A") & (conds == "stim"), 7, 0)
    adata = ad.AnnData(
        sp.csr_matrix(X),
        obs=pd.DataFrame({"cell_type": types, "condition": conds}, index=[f"c{i}" for i in range(120)]),
    )
    adata.var_names = [f"G{i}" for i in range(11)] + ["MARK"]
    return adata


def test_held_out_cells_all_go_to_test_and_the_rest_is_stratified():
    adata = cells()
    result = quality_control(adata, QC, cell_type="cell_type", holdout=HOLDOUT)
    obs = result.filtered.obs
    held = ((obs["cell_type"] == "A") & (obs["condition"] == "stim")).to_numpy()
    assert obs["holdout"].to_numpy().tolist() == held.tolist()
    assert (obs.loc[held, "split"] == "test").all()
    rest = obs[~held]
    # the others keep the stratified split: a quarter of each type in test (A: 5 of its 20 control cells)
    assert rest.groupby("cell_type", observed=True)["split"].apply(lambda s: (s == "test").sum()).to_dict() == {
        "A": 5,
        "B": 10,
        "C": 10,
    }
    assert result.summary["holdout"] == [{"combination": {"cell_type": "A", "condition": "stim"}, "cells": 20}]
    # same seed, same split
    again = quality_control(adata, QC, cell_type="cell_type", holdout=HOLDOUT).filtered.obs["split"]
    assert again.tolist() == obs["split"].tolist()


def test_a_holdout_whose_part_is_unseen_elsewhere_is_refused():
    adata = cells()
    adata.obs["condition"] = np.where(adata.obs["cell_type"] == "A", adata.obs["condition"], "ctrl")  # stim only in A
    with pytest.raises(UserError, match=r"part condition=stim is in no training cell"):
        quality_control(adata, QC, cell_type="cell_type", holdout=HOLDOUT)


def test_a_holdout_that_matches_no_cell_or_column_is_refused():
    with pytest.raises(UserError, match=r"cell_type=D, condition=stim\} matches no cell"):
        quality_control(cells(), QC, cell_type="cell_type", holdout=[{"cell_type": "D", "condition": "stim"}])
    with pytest.raises(UserError, match=r"names obs column\(s\) \['dose'\]"):
        quality_control(cells(), QC, cell_type="cell_type", holdout=[{"cell_type": "A", "dose": 1}])


def test_no_stage_reads_held_out_cells_for_training(tmp_path):
    """What each stage trains on, read from the QC file the way the stage reads it: the gene
    vocabulary's co-expression cells and the SE pretraining cells (split == train), Xpressor's fit
    and validation cells (split_indices) and the diffusion training cells (read_training_data)."""
    from cellfoundry.diffusion.data import read_training_data
    from cellfoundry.vocab import read_training_counts
    from cellfoundry.xpressor import split_indices

    path = tmp_path / "filtered.h5ad"
    quality_control(cells(), QC, cell_type="cell_type", holdout=HOLDOUT).filtered.write_h5ad(path)
    counts, symbols = read_training_counts(path, None, 0)
    assert counts.shape[0] == 75 and counts[:, symbols.index("MARK")].sum() == 0  # 100 others, 25 of them test
    split = ad.read_h5ad(path).obs["split"].astype(str).to_numpy()
    held = np.flatnonzero(ad.read_h5ad(path).obs["holdout"].to_numpy())
    fit, val, test = split_indices(split, 0.1, 0, None)
    assert not set(held) & (set(fit) | set(val)) and set(held) <= set(test)
    conditions = [
        {"name": "state", "kind": "multi_component", "columns": ["cell_type", "condition"], "none_value": "ctrl"}
    ]
    data = read_training_data(path, "gene", conditions)
    pairs = set(zip(data["train_obs"]["cell_type"], data["train_obs"]["condition"]))
    assert ("A", "stim") not in pairs and {("A", "ctrl"), ("B", "stim")} <= pairs


@pytest.mark.parametrize("start", ["control", "noise"])
def test_held_out_cells_are_edited_from_control_cells_of_their_type(tmp_path, start):
    """heldout_from: control edits one non-held-out A+ctrl cell per held-out A+stim cell (each kept
    once while they last, with its library size times the stimulus's library ratio elsewhere); noise
    draws them. A combination without control
    cells is refused with the fix."""
    from test_diffusion import SAMPLE, SETTINGS

    from cellfoundry.diffusion.sample import control_sources
    from cellfoundry.diffusion.stage import run_diffusion_sample, run_diffusion_train

    path = tmp_path / "filtered.h5ad"
    adata = cells()
    adata.X = sp.diags(np.where(adata.obs["condition"] == "stim", 2.0, 1.0)) @ adata.X  # stimulus doubles libraries
    quality_control(adata, QC, cell_type="cell_type", holdout=HOLDOUT).filtered.write_h5ad(path)
    conditions = [
        {"name": "state", "kind": "multi_component", "columns": ["cell_type", "condition"], "none_value": "ctrl"}
    ]
    settings = {**SETTINGS, "token_space": "gene"}
    run_diffusion_train(path, tmp_path / "model.ckpt", tmp_path / "train", settings, conditions, seed=0, device="cpu")
    summary = run_diffusion_sample(
        tmp_path / "model.ckpt",
        path,
        tmp_path / "samples.h5ad",
        tmp_path / "summary.json",
        {**SAMPLE, "guidance_check": False, "heldout_from": start},
        seed=0,
        device="cpu",
    )
    real = ad.read_h5ad(path)
    samples = ad.read_h5ad(tmp_path / "samples.h5ad")
    assert samples.n_obs == real.obs["holdout"].sum() == 20
    assert set(zip(samples.obs["cell_type"], samples.obs["condition"])) == {("A", "stim")}
    if start == "noise":
        assert "source_cell" not in samples.obs and summary["start"] == "noise"
        return
    assert summary["start"] == "real control cells (DDIM inversion)"
    sources = real[samples.obs["source_cell"].to_numpy()]
    assert (sources.obs["cell_type"] == "A").all() and (sources.obs["condition"] == "ctrl").all()
    assert not sources.obs["holdout"].any() and sources.obs_names.is_unique  # 20 control cells for 20
    # the source's library times the stimulus's mean library ratio in B and C, computed here anew
    log_library = np.log(np.asarray(real.X.sum(1)).ravel())
    types = [~real.obs["holdout"].to_numpy() & (real.obs["cell_type"] == t).to_numpy() for t in ("B", "C")]
    stim = (real.obs["condition"] == "stim").to_numpy()
    ratio = np.exp(np.mean([log_library[t & stim].mean() - log_library[t & ~stim].mean() for t in types]))
    assert 1.9 < ratio < 2.1
    np.testing.assert_allclose(samples.obs["library_size"], np.asarray(sources.X.sum(1)).ravel() * ratio, rtol=1e-5)
    no_control = real.obs.copy()
    no_control.loc[no_control["cell_type"] == "A", "condition"] = "stim"
    requests = pd.DataFrame({"cell_type": ["A"], "condition": ["stim"]})
    with pytest.raises(UserError, match="has no control cells to edit; set diffusion.sample.heldout_from: noise"):
        control_sources(no_control, requests, {"cell_type": "ctrl", "condition": "ctrl"}, np.random.default_rng(0))


@pytest.mark.workflow
def test_kang_holdout_never_reaches_training_files(tmp_path):
    """Real snakemake on a Kang 2018 subset with CD4T stimulated held out (gene space, tiny): the
    diffusion checkpoint's training labels hold no such cell, and sampling defaults to the
    held-out cells' labels and count."""
    data = SHARED / "data" / "kang2018_ifnb_counts.h5ad"
    if not data.exists():
        pytest.skip(f"Kang 2018 data not found at {data}")
    full = ad.read_h5ad(data)
    keep = np.concatenate([np.flatnonzero((full.obs["cell_type"] == t).to_numpy())[:60] for t in ["CD4T", "B", "NK"]])
    workdir = copy_workflow(tmp_path / "wf")
    full[np.sort(keep)].copy().write_h5ad(workdir / "kang.h5ad")
    config = yaml.safe_load((workdir / "config/benchmarks/kang_holdout.yaml").read_text())
    config["datasets"]["kang"].update(path="kang.h5ad")
    config["diffusion"].update(d_model=32, n_layers=1, gene_tokens=4, gene_token_dim=8, gene_encoder_hidden=32)
    config["diffusion"]["train"].update(max_steps=20)
    config["diffusion"]["sample"].update(steps=5)
    (workdir / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_snakemake(workdir, "results/kang/diffusion/samples.h5ad")
    import torch

    payload = torch.load(workdir / "results/kang/diffusion/model.ckpt", weights_only=True)
    trained = pd.DataFrame(payload["train_labels"])
    assert not ((trained["cell_type"] == "CD4T") & (trained["condition"] == "stimulated")).any()
    assert ((trained["cell_type"] == "CD4T") & (trained["condition"] == "control")).any()
    obs = ad.read_h5ad(workdir / "results/kang/qc/filtered.h5ad").obs
    held = (obs["cell_type"] == "CD4T") & (obs["condition"] == "stimulated")
    assert (obs.loc[held, "split"] == "test").all() and obs["holdout"].sum() == held.sum() > 0
    samples = ad.read_h5ad(workdir / "results/kang/diffusion/samples.h5ad").obs
    assert len(samples) == held.sum() and set(zip(samples["cell_type"], samples["condition"])) == {
        ("CD4T", "stimulated")
    }
    assert (
        json.loads((workdir / "results/kang/diffusion/summary.json").read_text())["requests"] == "held-out combinations"
    )
