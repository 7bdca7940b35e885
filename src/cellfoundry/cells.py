"""The cell table every trained stage reads: one dataset's QC'd cells (qc/filtered.h5ad) with
their raw counts, split and labels, and optionally their tokens, checked once here.

Row i is cell i of filtered.h5ad (and of its tokens). Shapes: N cells, G genes, L sentence length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfoundry.utils import UserError


def counts_matrix(adata) -> sp.csr_matrix:
    """Raw counts [N, G] of `adata` (X, per the data contract) as float32 CSR."""
    x = adata.X
    return x.tocsr().astype(np.float32) if sp.issparse(x) else sp.csr_matrix(x, dtype=np.float32)


@dataclass
class CellTable:
    """obs, raw counts [N, G] float32 CSR (None when read without them), gene names [G], split [N]
    ("train" / "test") and, when read with tokens, gene_ids / values [N, L] (memmaps) and the
    tokens' attrs."""

    path: str
    obs: pd.DataFrame
    counts: sp.csr_matrix | None
    var_names: list[str]
    split: np.ndarray
    gene_ids: np.ndarray | None = None
    values: np.ndarray | None = None
    token_attrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(
        cls,
        h5ad: str | os.PathLike,
        tokens: str | os.PathLike | None = None,
        vocab_hash: str | None = None,
        counts: bool = True,
    ) -> CellTable:
        """Read `h5ad` (QC's filtered.h5ad; without its count matrix when `counts` is False) and,
        with `tokens`, its tokens folder (built with the vocabulary `vocab_hash`). Raises UserError
        when the split is missing, fewer than 2 cells are in the train split or the tokens hold
        other cells."""
        import anndata as ad

        adata = ad.read_h5ad(h5ad, backed=None if counts else "r")
        if "split" not in adata.obs.columns:
            raise UserError(f"{h5ad} has no obs['split']; re-run the qc rule (snakemake --forcerun qc).")
        split = adata.obs["split"].astype(str).to_numpy()
        if (split == "train").sum() < 2:
            raise UserError(f"{h5ad} has fewer than 2 cells in the train split; lower qc.test_fraction or add cells.")
        matrix = counts_matrix(adata) if counts else None
        table = cls(str(h5ad), adata.obs.copy(), matrix, list(map(str, adata.var_names)), split)
        if adata.isbacked:
            adata.file.close()
        if tokens is not None:
            from cellfoundry.tokenize import read_tokens

            read = read_tokens(tokens, vocab_hash=vocab_hash)
            if len(read.gene_ids) != table.n_cells:
                raise UserError(
                    f"{tokens} holds {len(read.gene_ids)} cells but {h5ad} has {table.n_cells}; "
                    "re-run tokenization (snakemake --forcerun tokenize)."
                )
            table.gene_ids, table.values, table.token_attrs = read.gene_ids, read.values, dict(read.attrs)
        return table

    @property
    def n_cells(self) -> int:
        return len(self.split)

    @property
    def source(self) -> str | None:
        """SHA-256 of the h5ad the tokens were built from (None when read without tokens): with
        the tokens' vocabulary it identifies the cells a training run read."""
        return self.token_attrs.get("source_hash")

    def rows(self, split: str) -> np.ndarray:
        """Row indices of the cells in `split` ("train" or "test")."""
        return np.flatnonzero(self.split == split)

    def labels(
        self, columns: list[str], config_key: str = "a label column"
    ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """Integer codes [N] (-1 = missing) and sorted class names of each obs column in `columns`
        (named by `config_key` in the config, which the error for a missing column names)."""
        codes, classes = {}, {}
        for col in columns:
            if col not in self.obs.columns:
                raise UserError(
                    f"{config_key} names obs column {col!r}, which {self.path} does not have; "
                    f"use one of: {', '.join(map(str, self.obs.columns))}."
                )
            values = self.obs[col].astype("object")
            present = values.notna().to_numpy()
            names = sorted({str(v) for v in values[present]})
            lookup = {n: i for i, n in enumerate(names)}
            codes[col] = np.array([lookup[str(v)] if ok else -1 for v, ok in zip(values, present)], dtype=np.int64)
            classes[col] = names
        return codes, classes
