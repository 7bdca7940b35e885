"""The cell table every trained stage reads (cellfoundry.cells): counts, split, labels and tokens
of one QC'd dataset, with its checks."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry.cells import CellTable
from cellfoundry.utils import UserError


def write_cells(path, split, counts_dtype=np.int64):
    n = len(split)
    obs = pd.DataFrame(
        {"split": split, "ct": pd.Categorical(["b", "a", None, "b", "a"][:n])}, index=[f"c{i}" for i in range(n)]
    )
    counts = np.arange(n * 4, dtype=counts_dtype).reshape(n, 4) % 3
    ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=list("ABCD"))).write_h5ad(path)
    return counts


def test_reads_counts_split_and_labels(tmp_path):
    counts = write_cells(tmp_path / "f.h5ad", ["train", "test", "train", "train", "test"])
    table = CellTable.read(tmp_path / "f.h5ad")
    assert table.counts.dtype == np.float32 and sp.isspmatrix_csr(table.counts)
    np.testing.assert_array_equal(table.counts.toarray(), counts)
    assert table.var_names == list("ABCD") and table.n_cells == 5
    np.testing.assert_array_equal(table.rows("train"), [0, 2, 3])
    np.testing.assert_array_equal(table.rows("test"), [1, 4])
    codes, classes = table.labels(["ct"])
    assert classes == {"ct": ["a", "b"]}
    np.testing.assert_array_equal(codes["ct"], [1, 0, -1, 1, 0])  # -1: missing label
    with pytest.raises(UserError, match="xpressor.labels names obs column 'donor'.*use one of: split, ct"):
        table.labels(["donor"], config_key="xpressor.labels")
    # without the count matrix (encoding reads tokens only): the same obs, split and labels
    lean = CellTable.read(tmp_path / "f.h5ad", counts=False)
    assert lean.counts is None and lean.var_names == table.var_names
    np.testing.assert_array_equal(lean.split, table.split)
    pd.testing.assert_frame_equal(lean.obs, table.obs)
    assert lean.labels(["ct"])[1] == classes


@pytest.mark.parametrize(
    "split, message",
    [(None, r"no obs\['split'\]; re-run the qc rule"), (["train", "test", "test"], "fewer than 2 cells in the train")],
)
def test_refuses_cells_without_a_usable_split(tmp_path, split, message):
    write_cells(tmp_path / "f.h5ad", split or ["train"] * 3)
    if split is None:
        adata = ad.read_h5ad(tmp_path / "f.h5ad")
        del adata.obs["split"]
        adata.write_h5ad(tmp_path / "f.h5ad")
    with pytest.raises(UserError, match=message):
        CellTable.read(tmp_path / "f.h5ad")


def test_tokens_must_be_of_the_same_cells(tmp_path):
    write_cells(tmp_path / "f.h5ad", ["train"] * 4)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    np.save(tokens / "gene_ids.npy", np.zeros((3, 5), dtype=np.int32))
    np.save(tokens / "values.npy", np.zeros((3, 5), dtype=np.float32))
    np.save(tokens / "n_expressed.npy", np.zeros(3, dtype=np.int32))
    (tokens / "attrs.json").write_text(json.dumps({"n_cells": 3, "L": 5}))
    with pytest.raises(UserError, match="holds 3 cells but .* has 4; re-run tokenization"):
        CellTable.read(tmp_path / "f.h5ad", tmp_path / "tokens")
