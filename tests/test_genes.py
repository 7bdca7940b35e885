"""Gene identifiers: the gene map (many-to-one summed, one-to-many refused), gene_symbols: auto,
and a mouse-like dataset mapped to human symbols through the tokenizer's coverage check."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry.genes import (
    MAP_COLUMN,
    apply_gene_map,
    mapped_genes,
    prepare_genes,
    read_gene_map,
    vocab_symbols,
)
from cellfoundry.tokenize import tokenize_h5ad
from cellfoundry.utils import UserError
from cellfoundry.vocab import build_random_vocab


def counts(n_cells=30, names=("a", "b", "c", "d", "e"), seed=0, **columns):
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.5, size=(n_cells, len(names))).astype(np.float32)
    var = pd.DataFrame(columns, index=list(names))
    return ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=var)


def write_map(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def test_many_to_one_is_summed_exactly(tmp_path):
    adata = counts(symbol=["x1", "x2", "x3", "x4", "x5"])
    rows = [
        ("Mouse gene name", "Human gene name"),  # a header maps no gene: no effect
        ("b", "A"),
        ("a", "A"),
        ("c", "C"),
        ("d", ""),
        ("a", "A"),
        ("zz", "Q"),
    ]
    pairs = read_gene_map(write_map(tmp_path / "map.tsv", rows))
    out, summary = apply_gene_map(adata, pairs)
    X, Y = adata.X.toarray(), out.X.toarray()
    # genes in the order of their first source gene; d (empty target) and e are kept as they are
    assert list(out.var_names) == ["A", "C", "d", "e"]
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    np.testing.assert_array_equal(Y, np.column_stack([X[:, 0] + X[:, 1], X[:, 2], X[:, 3], X[:, 4]]))
    assert list(out.var[MAP_COLUMN]) == ["a;b", "c", "", ""]
    assert list(out.var["symbol"]) == ["x1", "x3", "x4", "x5"]  # the first source gene's var row
    assert summary == {
        "genes_in": 5,
        "genes_in_map": 3,
        "genes_not_in_map": 2,
        "genes_out": 4,
        "genes_out_from_map": 2,
        "genes_summed_away": 1,
    }


def test_one_to_many_is_refused_with_the_genes(tmp_path):
    adata = counts()
    rows = [
        ("a", "A"),
        ("a", "A2"),
        ("c", "C"),
        ("c", "C2"),
        ("c", "C3"),
        ("b", "B"),
        ("nothere", "X"),
        ("nothere", "Y"),
    ]
    with pytest.raises(UserError) as err:
        apply_gene_map(adata, read_gene_map(write_map(tmp_path / "map.tsv", rows)))
    msg = str(err.value)
    assert "2 gene(s)" in msg and "a -> A, A2" in msg and "c -> C, C2, C3" in msg
    assert "nothere" not in msg and "one target per source gene" in msg


def test_bad_map_file_says_what_to_fix(tmp_path):
    with pytest.raises(UserError, match="3 tab-separated column"):
        read_gene_map(write_map(tmp_path / "m.tsv", [("a", "A", "x")]))
    with pytest.raises(UserError, match="does not exist"):
        read_gene_map(tmp_path / "missing.tsv")


IDS = [f"ENSG{i:011d}" for i in range(1, 6)]
SYMBOLS = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY"]


@pytest.mark.parametrize(
    ("var_names", "column", "vocab", "expected"),
    [
        (SYMBOLS, IDS, IDS, "gene_ids"),  # vocabulary of Ensembl IDs: the ID column
        (SYMBOLS, IDS, SYMBOLS, "var_names"),  # vocabulary of symbols: the var_names
        (IDS, SYMBOLS, SYMBOLS, "gene_ids"),  # (the column holds symbols here)
        (IDS, SYMBOLS, None, "gene_ids"),  # no vocabulary: the symbol-like names
        (SYMBOLS, IDS, None, "var_names"),
    ],
)
def test_auto_choice_by_vocabulary_coverage(tmp_path, var_names, column, vocab, expected):
    adata = counts(names=var_names, gene_ids=column, feature_types=["Gene Expression"] * 5)
    vocab_path = None
    if vocab is not None:
        vocab_path = tmp_path / "protein_embeddings.pt"
        build_random_vocab(vocab[:4] + ["OTHER"], 4, seed=0).save(vocab_path)
        assert vocab_symbols(vocab_path) == vocab[:4] + ["OTHER"]
    out, summary = prepare_genes(adata, "auto", vocab=vocab_path)
    assert summary["names"] == expected
    assert list(out.var_names) == (var_names if expected == "var_names" else column)
    assert set(summary["auto_scores"]) == {"var_names", "gene_ids", "feature_types"}
    if vocab is not None:
        assert summary["auto_scores"][expected] == 0.8 and summary["auto_scores"]["feature_types"] == 0.0


def test_auto_scores_names_after_the_map(tmp_path):
    # mouse Ensembl IDs as var_names, mouse symbols in a column, a map mouse symbol -> human symbol
    mouse = ["Cd3e", "Ms4a1", "Lyz2", "Nkg7", "Gnly"]
    adata = counts(names=[f"ENSMUSG{i:011d}" for i in range(5)], symbol=mouse)
    gene_map = write_map(tmp_path / "map.tsv", [(m, h) for m, h in zip(mouse, SYMBOLS)])
    vocab_path = tmp_path / "v.pt"
    build_random_vocab(SYMBOLS, 4, seed=0).save(vocab_path)
    out, summary = prepare_genes(adata, "auto", gene_map, vocab_path)
    assert summary["names"] == "symbol" and summary["auto_scores"] == {"var_names": 0.0, "symbol": 1.0}
    assert list(out.var_names) == SYMBOLS


def test_mouse_dataset_mapped_to_human_passes_tokenizer_coverage(tmp_path):
    human = [f"HG{i}" for i in range(40)]
    mouse = [h.capitalize() for h in human] + ["Gm1", "Gm2"]  # two mouse-only genes
    rng = np.random.default_rng(1)
    X = rng.poisson(3, size=(50, len(mouse))).astype(np.float32)
    raw = ad.AnnData(
        sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(50)]), var=pd.DataFrame(index=mouse)
    )
    vocab = build_random_vocab(human, 8, seed=0)
    raw.write_h5ad(tmp_path / "unmapped.h5ad")
    with pytest.raises(UserError, match="mouse"):
        tokenize_h5ad(tmp_path / "unmapped.h5ad", tmp_path / "t0", vocab, 16, min_coverage=0.5)

    # two mouse genes share one human ortholog; the map also covers genes the dataset lacks
    rows = [(m, h) for m, h in zip(mouse, human)] + [(mouse[1], human[0]), ("Absent", "HG0")]
    rows.remove((mouse[1], human[1]))
    out, summary = prepare_genes(raw, None, write_map(tmp_path / "map.tsv", rows))
    assert summary["genes_out"] == 41 and summary["genes_summed_away"] == 1 and summary["genes_not_in_map"] == 2
    out.write_h5ad(tmp_path / "mapped.h5ad")
    assert mapped_genes(tmp_path / "mapped.h5ad").sum() == 39
    assert mapped_genes(tmp_path / "unmapped.h5ad") is None
    row = tokenize_h5ad(tmp_path / "mapped.h5ad", tmp_path / "t1", vocab, 16, min_coverage=0.5)
    cov = pd.read_csv(tmp_path / "t1" / "coverage.tsv", sep="\t")
    assert row["n_genes_matched"] == 39 == cov.loc[0, "n_genes_mapped"] == cov.loc[0, "n_genes_mapped_matched"]
    assert cov.loc[0, "fraction_counts_covered"] == pytest.approx(1 - X[:, -2:].sum() / X.sum(), abs=1e-6)


@pytest.mark.workflow
def test_rule_qc_applies_the_gene_map(tmp_path):
    import json

    import yaml
    from conftest import copy_workflow, run_snakemake

    work = copy_workflow(tmp_path / "wf")
    (work / "map.tsv").write_text("Mouse gene name\tHuman gene name\nHES4\tHESX\nTNFRSF4\tHESX\nSSU72\t\n")
    cfg_path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    name = next(iter(cfg["datasets"]))
    cfg["datasets"][name].update(gene_map="map.tsv", gene_symbols="auto")
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_snakemake(work, f"results/{name}/qc/summary.json")
    genes = json.loads((work / f"results/{name}/qc/summary.json").read_text())["genes"]
    assert genes["names"] == "var_names" and genes["genes_summed_away"] == 1 and genes["genes_in_map"] == 2
    var = ad.read_h5ad(work / f"results/{name}/qc/filtered.h5ad", backed="r").var
    assert var.loc["HESX", MAP_COLUMN] == "HES4;TNFRSF4" and "HES4" not in var.index and "SSU72" in var.index
