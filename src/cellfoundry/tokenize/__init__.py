"""Top-gene tokenization: each QC'd cell becomes the "cell sentence" the SE model reads.

`ranking` ranks the genes of a chunk of cells (the algorithm and its named random streams),
`engine` tokenizes whole datasets (in memory, or an h5ad out of core in parallel), `store` is the
on-disk tokens folder, `coverage` judges how well the vocabulary matches a dataset, and `stage`
holds the rule entry points (run_build_vocab, run_tokenize).
"""

from cellfoundry.tokenize.coverage import check_coverage, coverage_row
from cellfoundry.tokenize.engine import tokenize_anndata, tokenize_h5ad
from cellfoundry.tokenize.ranking import (
    CLS_ID,
    METHODS,
    PAD_ID,
    TokenChunk,
    cell_keys,
    filler_draws,
    gene_keys,
    key_layout,
    splitmix64,
    tie_keys,
    tokenize_csr,
)
from cellfoundry.tokenize.stage import run_build_vocab, run_tokenize
from cellfoundry.tokenize.store import FORMAT_VERSION, Tokens, read_tokens

__all__ = [
    "CLS_ID",
    "FORMAT_VERSION",
    "METHODS",
    "PAD_ID",
    "TokenChunk",
    "Tokens",
    "cell_keys",
    "check_coverage",
    "coverage_row",
    "filler_draws",
    "gene_keys",
    "key_layout",
    "read_tokens",
    "run_build_vocab",
    "run_tokenize",
    "splitmix64",
    "tie_keys",
    "tokenize_anndata",
    "tokenize_csr",
    "tokenize_h5ad",
]
