"""Tokenization: `se` and `topk` against straightforward per-cell references, determinism,
chunk/worker independence, coverage errors, the tokens folder and the SE reference fixture."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry.tokenize import (
    CLS_ID,
    PAD_ID,
    cell_keys,
    filler_draws,
    gene_keys,
    key_layout,
    read_tokens,
    tie_keys,
    tokenize_anndata,
    tokenize_csr,
    tokenize_h5ad,
)
from cellfoundry.utils import UserError
from cellfoundry.vocab import GeneVocab, build_random_vocab

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "se_reference"


# ------------------------------------------------------------------ per-cell references (SE-600M's rules)


def _cell_random(seed, cell, n_vocab):
    """The tokenizer's documented random streams for one cell (ties: stream 1, fillers: stream 2)."""
    _, tie_bits = key_layout(n_vocab)
    ties = tie_keys(cell_keys(seed, np.array([cell]), 1)[0], gene_keys(seed, n_vocab), tie_bits)
    fill_key = cell_keys(seed, np.array([cell]), 2)[0]
    return ties, fill_key


def reference_se(row, local_to_global, L, seed, cell):
    """SE-600M's sentence for one cell, written plainly from its rules."""
    x = np.maximum(np.asarray(row, dtype=np.float32), np.float32(0))
    if x.max(initial=0) > 35 or np.expm1(x.astype(np.float64)).sum() > 5e6:
        x = np.log1p(x)
    in_vocab = local_to_global >= 0
    xv, ids = x[in_vocab], local_to_global[in_vocab]
    G = len(xv)
    s = np.float32(xv.astype(np.float64).sum())  # exact sum, then float32 weights as SE computes them
    w = xv / s if s > 0 else np.full(G, np.float32(1) / np.float32(G))
    ties, fill_key = _cell_random(seed, cell, G)
    expressed = [g for g in range(G) if xv[g] > 0]
    sentence = sorted(expressed, key=lambda g: (-xv[g], int(ties[g]), g))[: L - 1]
    if len(expressed) < L - 1:
        unexpressed = [g for g in range(G) if not xv[g] > 0]
        if unexpressed:
            need = L - 1 - len(expressed)
            picks = filler_draws(np.full(need, fill_key), np.arange(need), np.full(need, len(unexpressed)))
            sentence += [unexpressed[i] for i in picks]
    gene_ids = np.full(L, PAD_ID, dtype=np.int32)
    values = np.zeros(L, dtype=np.float32)
    gene_ids[0] = CLS_ID
    values[0] = np.float32(100) * w[3] if G > 3 else 0.0
    for slot, g in enumerate(sentence, start=1):
        gene_ids[slot] = ids[g]
        values[slot] = np.float32(100) * w[g]
    return gene_ids, values, len(expressed)


def reference_topk(row, local_to_global, L, seed, cell, target_sum=1e4):
    """Seed-document variant: top expressed genes by log1p(normalised counts), padded."""
    data = np.maximum(np.asarray(row, dtype=np.float32), np.float32(0))
    raw = data.max(initial=0) > 35 or np.expm1(data.astype(np.float64)).sum() > 5e6
    counts = data.astype(np.float64) if raw else np.expm1(data.astype(np.float64))
    lib = counts.sum()
    v = np.log1p(counts * (target_sum / lib if lib > 0 else 0.0)).astype(np.float32)
    in_vocab = local_to_global >= 0
    vv, ids = v[in_vocab], local_to_global[in_vocab]
    ties, _ = _cell_random(seed, cell, len(vv))
    expressed = [g for g in range(len(vv)) if vv[g] > 0]
    sentence = sorted(expressed, key=lambda g: (-vv[g], int(ties[g]), g))[: L - 1]
    gene_ids = np.full(L, PAD_ID, dtype=np.int32)
    values = np.zeros(L, dtype=np.float32)
    gene_ids[0] = CLS_ID
    for slot, g in enumerate(sentence, start=1):
        gene_ids[slot], values[slot] = ids[g], vv[g]
    return gene_ids, values, len(expressed)


# ------------------------------------------------------------------ synthetic data


def synthetic(n_cells=40, n_genes=60, seed=1):
    """Raw counts with many ties (small integers), a range of sparsity, and edge-case cells."""
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.05, 0.9, size=(n_cells, 1))
    X = (rng.random((n_cells, n_genes)) < density) * rng.integers(1, 6, size=(n_cells, n_genes))
    X = X.astype(np.float32)
    X[0] = 0  # empty cell: all fillers, uniform weights
    X[1] = 0
    X[1, [2, 5]] = [40, 3]  # nearly empty, raw (max > 35)
    X[2] = np.log1p(X[2])  # already log1p: must not be logged twice
    X[3, :] = 2  # every gene expressed and tied
    X[4, 7] = -3  # negatives are clipped
    X[5] = 0
    X[5, :10] = 14  # max <= 35 but sum(expm1) > 5e6: raw counts
    X[5, 0] = 3
    X[6] = 0
    X[6, :40] = 10  # max <= 35, sum(expm1) < 5e6: taken as log1p
    X[6, 0] = 2
    return X


def vocab_for(n_genes, drop=(10, 11), extra=5, dim=8):
    """A vocabulary holding the dataset genes except `drop`, shuffled, plus genes not in the data."""
    symbols = [f"G{i}" for i in range(n_genes) if i not in drop] + [f"X{i}" for i in range(extra)]
    order = np.random.default_rng(0).permutation(len(symbols))
    return build_random_vocab([symbols[i] for i in order], dim, seed=0)


def make_adata(X):
    a = ad.AnnData(sp.csr_matrix(X))
    a.var_names = [f"G{i}" for i in range(X.shape[1])]
    a.obs_names = [f"c{i}" for i in range(X.shape[0])]
    return a


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("L", [8, 30, 80])
def test_se_matches_per_cell_reference(L):
    X = synthetic()
    vocab = vocab_for(X.shape[1])
    l2g = vocab.lookup([f"G{i}" for i in range(X.shape[1])])
    chunk = tokenize_csr(sp.csr_matrix(X), l2g, L, "se", seed=3, row_offset=100)
    for i in range(X.shape[0]):
        ids, vals, n_expr = reference_se(X[i], l2g, L, seed=3, cell=100 + i)
        np.testing.assert_array_equal(chunk.gene_ids[i], ids, err_msg=f"cell {i}")
        np.testing.assert_array_equal(chunk.values[i].view(np.uint32), vals.view(np.uint32), err_msg=f"cell {i}")
        assert chunk.n_expressed[i] == n_expr


def test_se_semantics_on_edge_cases():
    X = synthetic()
    vocab = vocab_for(X.shape[1])
    l2g = vocab.lookup([f"G{i}" for i in range(X.shape[1])])
    L = 30
    tok = tokenize_csr(X, l2g, L, "se", seed=0)
    assert (tok.gene_ids[:, 0] == CLS_ID).all()
    assert (tok.gene_ids[:, 1:] >= 0).all()  # SE fills every slot (data has unexpressed genes)
    # empty cell: 29 fillers, each weighted uniformly over the 58 vocabulary genes of the dataset
    np.testing.assert_allclose(tok.values[0, 1:], 100 / 58, rtol=1e-6)
    # cell 1: 40 and 3 are raw counts -> log1p before weighting
    w = np.log1p([40.0, 3.0]) / np.log1p([40.0, 3.0]).sum()
    np.testing.assert_allclose(tok.values[1, 1:3], 100 * w, rtol=1e-6)
    assert list(tok.gene_ids[1, 1:3]) == list(l2g[[2, 5]])
    assert (tok.values[1, 3:] == 0).all() and tok.n_expressed[1] == 2
    # cell 2 is log1p already: weights are proportional to its values, not to log1p(values)
    row = X[2][l2g >= 0]
    top = tok.values[2, 1 : 1 + min(int((row > 0).sum()), L - 1)]
    np.testing.assert_allclose(top[0], 100 * row.max() / row.sum(), rtol=1e-6)
    # cell 5 is raw by the expm1 sum (log1p applied), cell 6 is not (values used as they are)
    x5 = np.log1p(X[5][l2g >= 0].astype(np.float64))
    assert tok.values[5, 1] == pytest.approx(100 * np.log1p(14) / x5.sum(), rel=1e-6)
    x6 = X[6][l2g >= 0].astype(np.float64)
    assert tok.values[6, 1] == pytest.approx(100 * 10 / x6.sum(), rel=1e-6)
    # every expressed value is ranked descending, and genes are not repeated among expressed
    for i in range(X.shape[0]):
        k = min(tok.n_expressed[i], L - 1)
        assert (np.diff(tok.values[i, 1 : 1 + k]) <= 0).all()
        assert len(set(tok.gene_ids[i, 1 : 1 + k])) == k
    # cell 4: the negative gene is never an expressed token
    assert l2g[7] not in set(tok.gene_ids[4, 1 : 1 + min(tok.n_expressed[4], L - 1)])
    # genes outside the vocabulary never appear
    assert not set(tok.gene_ids[:, 1:].ravel()) - set(l2g[l2g >= 0])


def test_ties_follow_the_seed():
    X = np.full((6, 50), 3, dtype=np.float32)  # all tied: the sentence is the tie order
    vocab = build_random_vocab([f"G{i}" for i in range(50)], 4, 0)
    l2g = vocab.lookup([f"G{i}" for i in range(50)])
    a = tokenize_csr(X, l2g, 11, "se", seed=0).gene_ids
    b = tokenize_csr(X, l2g, 11, "se", seed=0).gene_ids
    c = tokenize_csr(X, l2g, 11, "se", seed=1).gene_ids
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len({tuple(r) for r in a}) == 6  # each cell has its own tie order


def test_topk_padding_and_reference():
    X = synthetic()
    vocab = vocab_for(X.shape[1])
    l2g = vocab.lookup([f"G{i}" for i in range(X.shape[1])])
    L = 30
    tok = tokenize_csr(X, l2g, L, "topk", seed=5, row_offset=7)
    for i in range(X.shape[0]):
        ids, vals, n_expr = reference_topk(X[i], l2g, L, 5, 7 + i)
        np.testing.assert_array_equal(tok.gene_ids[i], ids, err_msg=f"cell {i}")
        np.testing.assert_array_equal(tok.values[i].view(np.uint32), vals.view(np.uint32), err_msg=f"cell {i}")
        assert tok.n_expressed[i] == n_expr
        k = min(n_expr, L - 1)
        assert (tok.gene_ids[i, 1 + k :] == PAD_ID).all() and (tok.values[i, 1 + k :] == 0).all()
    assert (tok.gene_ids[0, 1:] == PAD_ID).all()  # empty cell: nothing but padding
    assert tok.values[:, 0].sum() == 0


@pytest.mark.parametrize("method", ["se", "topk"])
def test_chunk_size_independent(method):
    X = synthetic(n_cells=25)
    vocab = vocab_for(X.shape[1])
    adata = make_adata(X)
    ref = tokenize_anndata(adata, vocab, 20, method, seed=2, chunk_size=25)
    for chunk_size in (1, 4, 7):
        other = tokenize_anndata(adata, vocab, 20, method, seed=2, chunk_size=chunk_size)
        np.testing.assert_array_equal(ref.gene_ids, other.gene_ids)
        np.testing.assert_array_equal(ref.values.view(np.uint32), other.values.view(np.uint32))
        np.testing.assert_array_equal(ref.n_expressed, other.n_expressed)


def test_tokenize_h5ad_folder_workers_and_read(tmp_path):
    X = synthetic(n_cells=30)
    adata = make_adata(X)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    vocab = vocab_for(X.shape[1])
    row = tokenize_h5ad(
        tmp_path / "cells.h5ad",
        tmp_path / "t1",
        vocab,
        16,
        "se",
        seed=4,
        chunk_size=7,
        min_coverage=0.5,
        dataset="toy",
        source_hash="abc",
    )
    tokenize_h5ad(
        tmp_path / "cells.h5ad",
        tmp_path / "t2",
        vocab,
        16,
        "se",
        seed=4,
        chunk_size=4,
        workers=2,
        min_coverage=0.5,
        dataset="toy",
        source_hash="abc",
    )
    t1 = read_tokens(tmp_path / "t1", vocab_hash=vocab.hash)
    t2 = read_tokens(tmp_path / "t2", vocab_hash=vocab.hash)
    mem = tokenize_anndata(adata, vocab, 16, "se", seed=4)
    for a, b in ((t1, t2), (t1, mem)):
        np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
        np.testing.assert_array_equal(a.values.view(np.uint32), b.values.view(np.uint32))
        np.testing.assert_array_equal(a.n_expressed, b.n_expressed)
    assert isinstance(t1.gene_ids, np.memmap)
    assert t1.gene_ids.dtype == np.int32 and t1.values.dtype == np.float32 and t1.n_expressed.dtype == np.int32
    ids, vals, n = t1.rows(10, 20)
    np.testing.assert_array_equal(ids, mem.gene_ids[10:20])
    attrs = json.loads((tmp_path / "t1" / "attrs.json").read_text())
    assert attrs["L"] == 16 and attrs["method"] == "se" and attrs["seed"] == 4 and attrs["n_cells"] == 30
    assert attrs["vocab_hash"] == vocab.hash and attrs["source_hash"] == "abc"
    cov = pd.read_csv(tmp_path / "t1" / "coverage.tsv", sep="\t")
    assert cov.loc[0, "n_genes_matched"] == 58 == row["n_genes_matched"]
    expected = np.maximum(X, 0)[:, [i for i in range(60) if i not in (10, 11)]].sum() / np.maximum(X, 0).sum()
    assert cov.loc[0, "fraction_counts_covered"] == pytest.approx(expected, abs=1e-5)
    assert not list(tmp_path.glob(".t*tmp*"))  # no temporary leftovers


def test_read_tokens_rejects_other_vocabulary(tmp_path):
    X = synthetic(n_cells=8)
    make_adata(X).write_h5ad(tmp_path / "cells.h5ad")
    vocab = vocab_for(X.shape[1])
    tokenize_h5ad(tmp_path / "cells.h5ad", tmp_path / "tok", vocab, 8, dataset="toy")
    other = vocab_for(X.shape[1], drop=(12,))
    with pytest.raises(UserError, match="another gene vocabulary"):
        read_tokens(tmp_path / "tok", vocab_hash=other.hash)
    (tmp_path / "tok" / "attrs.json").unlink()
    with pytest.raises(UserError, match="not a complete tokens folder"):
        read_tokens(tmp_path / "tok")


def _coverage_error(var_names, vocab_symbols, var=None, tmp_path=None):
    X = np.random.default_rng(0).integers(0, 5, (10, len(var_names))).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(X), var=var)
    a.var_names = var_names
    vocab = build_random_vocab(vocab_symbols, 4, 0)
    with pytest.raises(UserError) as err:
        tokenize_anndata(a, vocab, 8, min_coverage=0.5, name="mine")
    return str(err.value)


def test_coverage_errors_explain_the_cause():
    human = ["ACTB", "GAPDH", "CD3E", "CD19", "MS4A1", "LYZ", "NKG7", "PTPRC"]
    msg = _coverage_error(["Actb", "Gapdh", "Cd3e", "Cd19", "Ms4a1", "Lyz", "Nkg7", "Ptprc"], human)
    assert "mine" in msg and "mouse" in msg and "tokenize.min_coverage" in msg
    ensembl = [f"ENSG{i:011d}" for i in range(8)]
    var = pd.DataFrame({"symbol": human}, index=ensembl)
    msg = _coverage_error(ensembl, human, var=var)
    assert "Ensembl" in msg and "'symbol'" in msg and "gene_symbols: symbol" in msg
    msg = _coverage_error(["A", "B", "C", "D", "E", "F", "G", "H"], human)
    assert "0 of 8 genes" in msg


def test_se_fixture_sentence_multiset():
    """cells.h5ad of the SE reference fixture: no ties, no fillers, so the sentence is fixed."""
    if not FIXTURE.exists():
        pytest.skip("shared SE fixture not present")
    cells = ad.read_h5ad(FIXTURE / "cells.h5ad")
    vocab = GeneVocab.load(FIXTURE / "protein_embeddings.pt")
    L = 16
    tok = tokenize_anndata(cells, vocab, L, "se", seed=0)
    X = cells.X.toarray()
    ids = vocab.lookup(cells.var_names)
    for i in range(cells.n_obs):
        x = np.log1p(X[i][ids >= 0])
        g = ids[ids >= 0]
        top = np.argsort(-x)[: L - 1]
        expected = sorted(zip(g[top].tolist(), (100 * x[top] / x.sum()).tolist()))
        got = sorted(zip(tok.gene_ids[i, 1:].tolist(), tok.values[i, 1:].tolist()))
        assert [a for a, _ in got] == [a for a, _ in expected]
        np.testing.assert_allclose([b for _, b in got], [b for _, b in expected], rtol=1e-6)
        assert tok.values[i, 0] == pytest.approx(100 * x[3] / x.sum(), rel=1e-6)


def test_tokenize_csr_writes_every_element_of_out():
    X = synthetic()
    vocab = vocab_for(X.shape[1])
    l2g = vocab.lookup([f"G{i}" for i in range(X.shape[1])])
    for method, L in (("se", 30), ("topk", 30), ("se", 80)):
        ref = tokenize_csr(X, l2g, L, method, seed=1, row_offset=9)
        gene_ids = np.full((X.shape[0], L), 12345, dtype=np.int32)  # garbage that must not survive
        values = np.full((X.shape[0], L), np.nan, dtype=np.float32)
        got = tokenize_csr(X, l2g, L, method, seed=1, row_offset=9, out=(gene_ids, values))
        assert got.gene_ids is gene_ids and got.values is values
        np.testing.assert_array_equal(gene_ids, ref.gene_ids)
        np.testing.assert_array_equal(values.view(np.uint32), ref.values.view(np.uint32))
    with pytest.raises(ValueError, match="C-contiguous"):
        tokenize_csr(X, l2g, 8, out=(np.empty((X.shape[0], 9), np.int32)[:, :8], np.empty((X.shape[0], 8), np.float32)))


@pytest.mark.parametrize("L", [16, 1030])
def test_direct_and_plain_writes_give_the_same_files(tmp_path, monkeypatch, L):
    """O_DIRECT for the aligned middle of each chunk (forced on small files here), plain writes
    for the rest, out-of-order chunks from two workers: the same bytes as plain writes only."""
    import cellfoundry.tokenize.engine as tok

    X = synthetic(n_cells=300, n_genes=60, seed=3)
    adata = make_adata(X)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    vocab = vocab_for(X.shape[1])
    monkeypatch.setattr(tok, "_DIRECT_MIN", 4096)
    folders = []
    for direct, chunk_size, workers in ((False, 300, 1), (True, 7, 1), (True, 64, 2), (True, 300, 1)):
        monkeypatch.setattr(tok, "DIRECT_IO", direct)
        out = tmp_path / f"t_{direct}_{chunk_size}_{workers}"
        tokenize_h5ad(
            tmp_path / "cells.h5ad",
            out,
            vocab,
            L,
            "se",
            seed=4,
            chunk_size=chunk_size,
            workers=workers,
            min_coverage=0.5,
            dataset="toy",
        )
        folders.append(out)
    for other in folders[1:]:
        for name in ("gene_ids.npy", "values.npy", "n_expressed.npy"):
            assert (other / name).read_bytes() == (folders[0] / name).read_bytes(), (other.name, name)
    mem = tokenize_anndata(adata, vocab, L, "se", seed=4)
    t = read_tokens(folders[1], vocab_hash=vocab.hash)
    np.testing.assert_array_equal(t.gene_ids, mem.gene_ids)
    np.testing.assert_array_equal(t.values.view(np.uint32), mem.values.view(np.uint32))


def test_h5ad_coverage_error_names_a_better_var_column(tmp_path):
    human = ["ACTB", "GAPDH", "CD3E", "CD19", "MS4A1", "LYZ", "NKG7", "PTPRC"]
    ensembl = [f"ENSG{i:011d}" for i in range(8)]
    X = np.random.default_rng(0).integers(0, 5, (10, 8)).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame({"symbol": human}, index=ensembl))
    a.write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(UserError) as err:
        tokenize_h5ad(tmp_path / "cells.h5ad", tmp_path / "tok", build_random_vocab(human, 4, 0), 8, dataset="mine")
    assert "Ensembl" in str(err.value) and "'symbol'" in str(err.value)
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("layout", ["dense", "csc"])
def test_tokenize_h5ad_reads_other_layouts_of_x(tmp_path, layout):
    """CSR X is read with h5py directly; dense and CSC X go through anndata: same tokens."""
    X = synthetic(n_cells=30)
    adata = make_adata(X)
    adata.X = X if layout == "dense" else sp.csc_matrix(X)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    vocab = vocab_for(X.shape[1])
    tokenize_h5ad(tmp_path / "cells.h5ad", tmp_path / "tok", vocab, 16, "se", seed=4, chunk_size=7, dataset="toy")
    got = read_tokens(tmp_path / "tok", vocab_hash=vocab.hash)
    mem = tokenize_anndata(make_adata(X), vocab, 16, "se", seed=4)
    np.testing.assert_array_equal(got.gene_ids, mem.gene_ids)
    np.testing.assert_array_equal(got.values.view(np.uint32), mem.values.view(np.uint32))
    np.testing.assert_array_equal(got.n_expressed, mem.n_expressed)


@pytest.mark.parametrize("method", ["se", "topk"])
def test_raw_counts_near_expm1_overflow_give_no_warning(method):
    # nnz * expm1(max) overflowed float64 in the raw-count detection for a max count near 709
    # with many genes expressed; the tokens stay those of the per-cell reference.
    X = synthetic(n_cells=8, n_genes=300)
    X[7, :] = 1
    X[7, 0] = 708  # expm1 finite, 300 * expm1 is not
    X[6, 0] = 800  # expm1 itself is inf (already ignored)
    l2g = vocab_for(300).lookup([f"G{i}" for i in range(300)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunk = tokenize_csr(sp.csr_matrix(X), l2g, 40, method, seed=2)
    reference = reference_se if method == "se" else reference_topk
    for i in range(X.shape[0]):
        ids, vals, _ = reference(X[i], l2g, 40, seed=2, cell=i)
        np.testing.assert_array_equal(chunk.gene_ids[i], ids, err_msg=f"cell {i}")
        np.testing.assert_array_equal(chunk.values[i].view(np.uint32), vals.view(np.uint32), err_msg=f"cell {i}")
