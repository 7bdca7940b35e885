"""How much of a dataset the gene vocabulary covers: the row of coverage.tsv, and the error that
explains a poor match."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cellfoundry.utils import UserError
from cellfoundry.vocab import GeneMatch, GeneVocab, explain_poor_match


def coverage_row(
    name: str, match: GeneMatch, vocab: GeneVocab, total: float, in_vocab: float, mapped: np.ndarray | None = None
) -> dict[str, Any]:
    """mapped: bool [G], the dataset genes that came from the dataset's gene map (None: no map)."""
    mapped = np.zeros(match.n_genes, dtype=bool) if mapped is None else np.asarray(mapped, dtype=bool)
    return {
        "dataset": name,
        "n_genes": match.n_genes,
        "n_genes_matched": match.n_matched,
        "fraction_genes_matched": round(match.gene_fraction, 6),
        "fraction_counts_covered": round(in_vocab / total, 6) if total > 0 else 0.0,
        "vocab_size": len(vocab),
        "n_genes_mapped": int(mapped.sum()),
        "n_genes_mapped_matched": int((mapped & (match.local_to_global >= 0)).sum()),
    }


def check_coverage(
    row: dict[str, Any],
    min_coverage: float,
    match: GeneMatch,
    vocab: GeneVocab,
    var_columns: dict[str, Sequence] | Callable[[], dict[str, Sequence]] | None = None,
) -> None:
    """Raise UserError when too few counts fall on vocabulary genes, saying why (var_columns, or a
    function returning them, feed the explanation)."""
    covered = row["fraction_counts_covered"]
    if match.n_matched == 0 or covered < min_coverage:
        if callable(var_columns):
            var_columns = var_columns()
        raise UserError(
            f"dataset '{row['dataset']}': only {match.n_matched} of {match.n_genes} genes are in the vocabulary "
            f"({covered:.1%} of counts, below tokenize.min_coverage = {min_coverage:.0%}). "
            f"{explain_poor_match(match.symbols, vocab, var_columns)}."
        )


def string_columns(var) -> dict[str, Sequence]:
    """The string-like columns of a var table (candidates for the gene symbols)."""
    out = {}
    for col in var.columns:
        if var[col].dtype == object or str(var[col].dtype) in ("category", "string"):
            out[str(col)] = var[col].astype(str).tolist()
    return out
