"""Gene vocabulary: file format round trip, hashing, random and co-expression vectors, matching."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellfoundry.utils import UserError
from cellfoundry.vocab import (
    GeneVocab,
    build_coexpression_vocab,
    build_random_vocab,
    build_vocab_from_h5ads,
    match_genes,
    random_vectors,
)


def test_save_load_round_trip_is_se_dict_format(tmp_path):
    vocab = build_random_vocab(["B", "A", "C"], 6, seed=1)
    vocab.save(tmp_path / "emb.pt")
    raw = torch.load(tmp_path / "emb.pt", weights_only=True)
    assert isinstance(raw, dict) and list(raw) == ["B", "A", "C"]  # order = vocabulary ids
    assert raw["A"].shape == (6,) and raw["A"].dtype == torch.float32
    back = GeneVocab.load(tmp_path / "emb.pt")
    assert back.symbols == ["B", "A", "C"] and back.hash == vocab.hash
    assert torch.equal(back.table, vocab.table)
    assert list(back.lookup(["C", "nope", "B"])) == [2, -1, 0]
    vocab.save(tmp_path / "again.pt")  # same content, same bytes (the workflow's outputs are reproducible)
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "emb.pt").read_bytes()


def test_hash_depends_on_symbol_order_only():
    a = build_random_vocab(["A", "B"], 4, seed=0)
    b = build_random_vocab(["A", "B"], 8, seed=5)
    c = build_random_vocab(["B", "A"], 4, seed=0)
    assert a.hash == b.hash != c.hash


def test_random_vectors_are_per_symbol_and_seeded():
    one = random_vectors(["TP53", "CD4"], 16, seed=0)
    two = random_vectors(["CD4", "XIST", "TP53"], 16, seed=0)
    np.testing.assert_array_equal(one[0], two[2])  # a gene's vector ignores the other genes
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1, rtol=1e-6)
    assert not np.allclose(random_vectors(["TP53"], 16, seed=1), one[0])


def test_coexpression_vectors_group_coexpressed_genes():
    rng = np.random.default_rng(0)
    n = 300
    program = rng.random(n) < 0.5  # two cell programs: genes 0-4 in one, 5-9 in the other
    X = np.zeros((n, 12), dtype=np.float32)
    X[program, :5] = rng.poisson(20, (program.sum(), 5))
    X[~program, 5:10] = rng.poisson(20, ((~program).sum(), 5))
    X[:, 10] = rng.poisson(5, n)  # housekeeping; gene 11 never expressed
    symbols = [f"G{i}" for i in range(12)]
    vocab = build_coexpression_vocab([(sp.csr_matrix(X), symbols)], dim=4, seed=0)
    again = build_coexpression_vocab([(sp.csr_matrix(X), symbols)], dim=4, seed=0)
    assert torch.equal(vocab.table, again.table)
    t = vocab.table.numpy()
    idx = vocab.lookup(symbols)
    sim = t[idx] @ t[idx].T
    assert sim[0, 1] > 0.9 and sim[5, 6] > 0.9  # same program
    assert sim[0, 1] > sim[0, 6] + 0.3
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, rtol=1e-5)  # unit vectors, none zero
    np.testing.assert_allclose(t[idx[11]], random_vectors(["G11"], 4, 0)[0], rtol=1e-6)


def test_build_from_h5ads_uses_training_cells_and_union(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k, genes in enumerate((["A", "B", "C"], ["C", "D"])):
        a = ad.AnnData(sp.csr_matrix(rng.poisson(3, (20, len(genes))).astype(np.float32)))
        a.var_names = genes
        a.obs["split"] = ["train"] * 15 + ["test"] * 5
        a.write_h5ad(tmp_path / f"d{k}.h5ad")
        paths.append(tmp_path / f"d{k}.h5ad")
    vocab = build_vocab_from_h5ads(paths, "coexpression", dim=3, seed=0, max_cells=10)
    assert vocab.symbols == ["A", "B", "C", "D"] and vocab.dim == 3
    rand = build_vocab_from_h5ads(paths, "random", dim=3, seed=0)
    assert rand.symbols == vocab.symbols
    with pytest.raises(UserError, match="vocab.source"):
        build_vocab_from_h5ads(paths, "esm", dim=3, seed=0)


def test_match_genes_is_exact():
    vocab = build_random_vocab(["ACTB", "CD3E"], 4, 0)
    m = match_genes(["CD3E", "actb", "ACTB", "X"], vocab)
    assert list(m.local_to_global) == [1, -1, 0, -1]
    assert m.n_matched == 2 and m.gene_fraction == 0.5


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        GeneVocab.load(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="dict gene symbol"):
        GeneVocab.load(tmp_path / "list.pt")
