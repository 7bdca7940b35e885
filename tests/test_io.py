"""Readers and raw-count checks: every supported format, and every refusal with its reason."""

from __future__ import annotations

import gzip

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cellfoundry.io import detect_format, load_counts
from cellfoundry.utils import UserError


def make_counts(n_cells=20, n_genes=12, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"GENE{j}" for j in range(n_genes)]
    adata.var["symbol"] = [f"SYM{j}" for j in range(n_genes)]
    adata.var["gene_ids"] = [f"ENSG{j:011d}" for j in range(n_genes)]
    return adata


def write_10x_mtx(adata: ad.AnnData, folder):
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.csr_matrix(adata.X).T.tocoo().astype(np.int64))
    features = pd.DataFrame({"id": adata.var["gene_ids"], "name": adata.var_names, "type": "Gene Expression"})
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False, compression="gzip")
    pd.Series(adata.obs_names).to_csv(
        folder / "barcodes.tsv.gz", sep="\t", header=False, index=False, compression="gzip"
    )


def write_10x_h5(adata: ad.AnnData, path):
    """A CellRanger v3 feature-barcode matrix file (genes x cells CSC)."""
    m = sp.csc_matrix(adata.X.T.astype(np.int32))
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(adata.obs_names, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        feat = g.create_group("features")
        feat["id"] = np.array(adata.var["gene_ids"], dtype="S")
        feat["name"] = np.array(adata.var_names, dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        feat["genome"] = np.array(["GRCh38"] * adata.n_vars, dtype="S")
        feat["_all_tag_keys"] = np.array([b"genome"])


@pytest.mark.parametrize("fmt", ["h5ad", "10x_h5", "10x_mtx", "zarr"])
def test_every_format_reads_the_same_counts(tmp_path, fmt):
    adata = make_counts()
    path = {
        "h5ad": tmp_path / "d.h5ad",
        "10x_h5": tmp_path / "d.h5",
        "10x_mtx": tmp_path / "mtx",
        "zarr": tmp_path / "d.zarr",
    }[fmt]
    if fmt == "h5ad":
        adata.write_h5ad(path)
    elif fmt == "zarr":
        adata.write_zarr(path)
    elif fmt == "10x_h5":
        write_10x_h5(adata, path)
    else:
        write_10x_mtx(adata, path)
    assert detect_format(path) == fmt
    out = load_counts(path)
    assert list(out.var_names) == list(adata.var_names)
    assert list(out.obs_names) == list(adata.obs_names)
    np.testing.assert_array_equal(out.X.toarray(), adata.X.toarray())
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32


def test_gene_symbols_column_replaces_var_names(tmp_path):
    make_counts().write_h5ad(tmp_path / "d.h5ad")
    out = load_counts(tmp_path / "d.h5ad", gene_symbols="symbol")
    assert out.var_names[0] == "SYM0"
    with pytest.raises(UserError, match="not a var column.*symbol"):
        load_counts(tmp_path / "d.h5ad", gene_symbols="symbols")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="input not found.*`path`"):
        load_counts(tmp_path / "nope.h5ad")


def test_unknown_format(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="cannot tell the format.*format"):
        load_counts(tmp_path / "d.csv")


def test_folder_without_matrix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a 10x Matrix Market"):
        load_counts(tmp_path / "empty")


def test_normalised_values_point_to_the_layer_with_counts(tmp_path):
    adata = make_counts()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(UserError, match=r"non-integer values.*set the dataset's `counts` to 'counts'"):
        load_counts(tmp_path / "d.h5ad")
    out = load_counts(tmp_path / "d.h5ad", counts="counts")
    np.testing.assert_array_equal(out.X.toarray(), adata.layers["counts"].toarray())


def test_counts_in_raw(tmp_path):
    adata = make_counts()
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(adata.X.toarray() / 3.0)
    adata.write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(UserError, match="'raw'"):
        load_counts(tmp_path / "d.h5ad")
    assert load_counts(tmp_path / "d.h5ad", counts="raw").X.sum() == adata.raw.X.sum()


def test_negative_values(tmp_path):
    adata = make_counts()
    adata.X = sp.csr_matrix(adata.X.toarray() - 5)
    adata.write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(UserError, match="negative values"):
        load_counts(tmp_path / "d.h5ad")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf(tmp_path, bad):
    adata = make_counts()
    dense = adata.X.toarray()
    dense[3, 4] = bad
    adata.X = dense
    adata.write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(UserError, match="NaN or infinite"):
        load_counts(tmp_path / "d.h5ad")


def test_zero_cells(tmp_path):
    make_counts()[:0].copy().write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(UserError, match="zero cells"):
        load_counts(tmp_path / "d.h5ad")


def test_duplicated_genes_are_made_unique_and_reported(tmp_path, caplog):
    adata = make_counts()
    names = list(adata.var_names)
    names[5] = names[4]
    adata.var_names = names
    adata.write_h5ad(tmp_path / "d.h5ad")
    out = load_counts(tmp_path / "d.h5ad")
    assert out.var_names.is_unique
    assert "GENE4-1" in out.var_names
    assert "occur more than once" in caplog.text


def test_unknown_layer(tmp_path):
    make_counts().write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(UserError, match="layer 'spliced'.*available layers"):
        load_counts(tmp_path / "d.h5ad", counts="spliced")
