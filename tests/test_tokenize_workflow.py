"""The vocabulary and tokenize rules through the real snakemake on the demo."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_snakemake

from cellfoundry.tokenize import CLS_ID, read_tokens
from cellfoundry.vocab import GeneVocab


@pytest.mark.workflow
def test_tokenize_stage_on_demo(demo_workdir):
    run_snakemake(demo_workdir, "results/pbmc68k/tokens")
    cfg = yaml.safe_load((demo_workdir / "config" / "config.yaml").read_text())
    L = cfg["tokenize"]["length"]
    vocab = GeneVocab.load(demo_workdir / "results/shared/vocab/gene_embeddings.pt")
    assert vocab.dim == cfg["vocab"]["dim"]
    cells = ad.read_h5ad(demo_workdir / "results/pbmc68k/qc/filtered.h5ad", backed="r")
    tokens = read_tokens(demo_workdir / "results/pbmc68k/tokens", vocab_hash=vocab.hash)
    assert tokens.gene_ids.shape == (cells.n_obs, L) and tokens.attrs["method"] == cfg["tokenize"]["method"]
    assert (tokens.gene_ids[:, 0] == CLS_ID).all()
    assert ((tokens.gene_ids[:, 1:] >= 0) & (tokens.gene_ids[:, 1:] < len(vocab))).all()
    # the vocabulary is built from this dataset, so every gene and count is covered
    cov = pd.read_csv(demo_workdir / "results/pbmc68k/tokens/coverage.tsv", sep="\t")
    assert cov.loc[0, "n_genes_matched"] == cells.n_vars and cov.loc[0, "fraction_counts_covered"] == 1.0
    # the top token of the first cell is its most expressed gene
    x = np.asarray(cells.X[0].todense()).ravel()
    assert (
        vocab.symbols[tokens.gene_ids[0, 1]] == cells.var_names[np.argmax(x)]
        or x[cells.var_names.get_loc(vocab.symbols[tokens.gene_ids[0, 1]])] == x.max()
    )
    assert json.loads((demo_workdir / "results/pbmc68k/tokens/attrs.json").read_text())["n_cells"] == cells.n_obs
    log = (demo_workdir / "logs/pbmc68k/tokenize.log").read_text()
    assert "genes matched" in log and "cells/s" in log
