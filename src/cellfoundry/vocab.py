"""Gene vocabulary and gene embeddings.

The on-disk format is SE-600M's `protein_embeddings.pt`: a dict gene symbol -> FloatTensor[dim].
A gene's vocabulary index is its position in the dict's insertion order; the embedding table is
the stacked values, shape [V, dim]. A real SE model folder brings its own file; otherwise the
workflow builds one here, either from deterministic random vectors per symbol or from
co-expression (truncated SVD of log-normalised training cells), in the same format.

Also here: matching a dataset's gene symbols to the vocabulary and explaining a poor match.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from .utils import UserError, atomic_output

log = logging.getLogger(__name__)

SOURCES = ("random", "coexpression")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def symbols_hash(symbols: Sequence[str]) -> str:
    """SHA-256 of the ordered symbols: what token ids mean, independent of the vectors."""
    digest = hashlib.sha256()
    for s in symbols:
        digest.update(s.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class GeneVocab:
    """Ordered gene symbols and their embedding table.

    symbols: list[str] of length V (index = vocabulary id); table: FloatTensor [V, dim].
    """

    symbols: list[str]
    table: torch.Tensor
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.table.ndim != 2 or self.table.shape[0] != len(self.symbols):
            raise ValueError(f"table shape {tuple(self.table.shape)} does not match {len(self.symbols)} symbols")
        self.index = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            raise ValueError("gene symbols of a vocabulary must be unique")

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def hash(self) -> str:
        """Identifies the symbol order; tokens carry it so mixing vocabularies is caught."""
        return symbols_hash(self.symbols)

    def lookup(self, symbols: Iterable[str]) -> np.ndarray:
        """Vocabulary ids of `symbols` (exact match), -1 where absent. int64 [len(symbols)]."""
        get = self.index.get
        return np.fromiter((get(str(s), -1) for s in symbols), dtype=np.int64)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {s: self.table[i] for i, s in enumerate(self.symbols)}

    @classmethod
    def from_dict(cls, embeddings: dict) -> GeneVocab:
        if not isinstance(embeddings, dict) or not embeddings:
            raise UserError(
                "a gene-embedding file must hold a non-empty dict gene symbol -> vector "
                "(SE protein_embeddings.pt format)"
            )
        symbols = [str(k) for k in embeddings]
        table = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in embeddings.values()])
        return cls(symbols, table)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        """Read a protein_embeddings.pt-style file (safe unpickling: tensors and strings only)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"gene-embedding file {path} does not exist; "
                "check se.model_folder or build the vocabulary (rule build_vocab)"
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure: turned into a message the user can act on
            raise UserError(
                f"cannot read gene embeddings from {path}: {exc}. Expected a torch dict gene symbol -> FloatTensor"
            ) from exc
        return cls.from_dict(obj)

    def save(self, path: str | os.PathLike) -> None:
        """Write the dict format atomically (values cloned so each is its own small storage).

        Saved through a file object: torch names the archive's root folder after a path, and the
        temporary name would make the bytes differ from run to run."""
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            torch.save({s: self.table[i].clone() for i, s in enumerate(self.symbols)}, fh)


# ---------------------------------------------------------------------------- building


def _symbol_seed(seed: int, symbol: str) -> list[int]:
    """Philox key words for one symbol: the vector depends on (seed, symbol) only."""
    digest = hashlib.sha256(f"{seed}\0{symbol}".encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def random_vectors(symbols: Sequence[str], dim: int, seed: int) -> np.ndarray:
    """Unit-norm Gaussian vectors, one per symbol, float32 [len(symbols), dim].

    Each vector is drawn from its own generator keyed by (seed, symbol), so a gene's vector does
    not change when other genes are added or removed.
    """
    out = np.empty((len(symbols), dim), dtype=np.float32)
    for i, s in enumerate(symbols):
        gen = np.random.Generator(np.random.Philox(key=np.array(_symbol_seed(seed, s)[:2], dtype=np.uint64)))
        v = gen.standard_normal(dim)
        out[i] = v / np.linalg.norm(v)
    return out


def build_random_vocab(symbols: Sequence[str], dim: int, seed: int) -> GeneVocab:
    """Vocabulary of `symbols` (order kept) with deterministic random unit vectors."""
    return GeneVocab(list(symbols), torch.from_numpy(random_vectors(symbols, dim, seed)))


def log_normalise(X: sp.csr_matrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """log1p(counts / total * target_sum) per cell; X: CSR [cells, genes] raw counts."""
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    X.data *= np.repeat(scale, np.diff(X.indptr))
    np.log1p(X.data, out=X.data)
    return X


def build_coexpression_vocab(matrices: Sequence[tuple[sp.spmatrix, Sequence[str]]], dim: int, seed: int) -> GeneVocab:
    """Gene vectors from co-expression across the given cells.

    matrices: (X [cells, genes] raw counts, gene symbols) per dataset. Genes are the sorted union
    of all symbols; the cells are stacked over that union, log-normalised, and a truncated SVD
    gives each gene the row `V * S` (its loadings on the top `dim` components). Rows are scaled
    to unit norm. Genes never seen expressed, and dimensions beyond the matrix rank, take their
    deterministic random vector instead, so no gene gets a zero vector.
    """
    from sklearn.utils.extmath import randomized_svd, svd_flip

    symbols = sorted({str(s) for _, syms in matrices for s in syms})
    position = {s: i for i, s in enumerate(symbols)}
    blocks = []
    for X, syms in matrices:
        X = log_normalise(sp.csr_matrix(X))
        cols = np.array([position[str(s)] for s in syms], dtype=np.int64)
        X = sp.csr_matrix((X.data, cols[X.indices], X.indptr), shape=(X.shape[0], len(symbols)))
        blocks.append(X)
    X = sp.vstack(blocks, format="csr")
    fallback = random_vectors(symbols, dim, seed)
    rank = min(dim, X.shape[0] - 1, X.shape[1] - 1)
    table = fallback.copy()
    if rank >= 1 and X.nnz:
        U, S, Vt = randomized_svd(X, n_components=rank, n_iter=5, random_state=seed)
        U, Vt = svd_flip(U, Vt)  # fixed signs: same input, same vectors
        loadings = (Vt.T * S).astype(np.float64)  # [genes, rank]
        norms = np.linalg.norm(loadings, axis=1)
        seen = norms > 1e-12
        table[seen, :rank] = (loadings[seen] / norms[seen, None]).astype(np.float32)
        table[seen, rank:] = 0.0
        log.info(
            "co-expression vectors: %d cells, %d genes, rank %d of dim %d, "
            "%d genes without expression use random vectors",
            X.shape[0],
            len(symbols),
            rank,
            dim,
            int((~seen).sum()),
        )
    return GeneVocab(symbols, torch.from_numpy(table))


# ---------------------------------------------------------------------------- matching


@dataclass
class GeneMatch:
    """How a dataset's genes map onto a vocabulary.

    local_to_global: int64 [G] vocabulary id per dataset gene, -1 where not in the vocabulary.
    """

    local_to_global: np.ndarray
    symbols: list[str]

    @property
    def n_genes(self) -> int:
        return len(self.symbols)

    @property
    def n_matched(self) -> int:
        """Distinct vocabulary genes the dataset covers: a symbol listed twice counts once."""
        return int(np.unique(self.local_to_global[self.local_to_global >= 0]).size)

    @property
    def gene_fraction(self) -> float:
        return self.n_matched / max(self.n_genes, 1)


def match_genes(symbols: Sequence[str], vocab: GeneVocab) -> GeneMatch:
    """Exact symbol matching (SE's rule); unmatched genes are dropped by the tokenizer."""
    symbols = [str(s) for s in symbols]
    return GeneMatch(vocab.lookup(symbols), symbols)


def explain_poor_match(symbols: Sequence[str], vocab: GeneVocab, var_columns: dict[str, Sequence] | None = None) -> str:
    """A hint on why few of `symbols` are in the vocabulary, naming what would match better."""
    symbols = [str(s) for s in symbols]
    n = max(len(symbols), 1)
    hints = []
    examples = ", ".join(symbols[:3])
    ensembl = sum(bool(_ENSEMBL.match(s)) for s in symbols) / n
    if ensembl > 0.5:
        hints.append(
            f"the gene names look like Ensembl IDs (e.g. {examples}) but the vocabulary holds gene symbols; "
            "point datasets.<name>.gene_symbols at a var column of symbols"
        )
    upper = sum(s.upper() in vocab.index for s in symbols) / n
    exact = sum(s in vocab.index for s in symbols) / n
    if upper > exact + 0.2:
        hints.append(
            f"{upper:.0%} would match in upper case (e.g. {examples}): these look like mouse symbols against a "
            "human vocabulary; map them to human orthologs (or use a vocabulary of this species)"
        )
    best = None
    for name, values in (var_columns or {}).items():
        vals = [str(v) for v in values]
        frac = sum(v in vocab.index for v in vals) / max(len(vals), 1)
        if frac > exact and (best is None or frac > best[1]):
            best = (name, frac)
    if best is not None:
        hints.append(
            f"var column '{best[0]}' matches {best[1]:.0%} of genes: set datasets.<name>.gene_symbols: {best[0]}"
        )
    if not hints:
        vocab_examples = ", ".join(vocab.symbols[:3])
        hints.append(f"dataset genes look like {examples}; vocabulary genes look like {vocab_examples}")
    return "; ".join(hints)


# ---------------------------------------------------------------------------- from datasets


def read_var(path: str | os.PathLike):
    """The var DataFrame of an h5ad (index = gene symbols), without reading X or obs."""
    import anndata as ad
    import h5py

    with h5py.File(path, "r") as f:
        return ad.io.read_elem(f["var"])


def read_training_counts(
    path: str | os.PathLike, max_cells: int | None, seed: int, chunk: int = 10_000
) -> tuple[sp.csr_matrix, list[str]]:
    """Counts of a QC'd h5ad's training cells (obs["split"] == "train"; all cells when the column
    is absent), at most `max_cells` of them chosen with `seed`, read in backed mode chunk by chunk.
    Returns (CSR [cells, genes], gene symbols)."""
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    try:
        symbols = [str(s) for s in adata.var_names]
        if "split" in adata.obs:
            rows = np.flatnonzero(adata.obs["split"].astype(str).to_numpy() == "train")
        else:
            rows = np.arange(adata.n_obs)
        if max_cells is not None and len(rows) > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_cells, replace=False))
        parts = []
        for start in range(0, adata.n_obs, chunk):
            wanted = rows[(rows >= start) & (rows < start + chunk)] - start
            if len(wanted):
                block = adata.X[start : min(start + chunk, adata.n_obs)]
                parts.append(sp.csr_matrix(block)[wanted])
    finally:
        adata.file.close()
    X = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, len(symbols)), dtype=np.float32)
    return X, symbols


def build_vocab_from_h5ads(
    paths: Sequence[str | os.PathLike], source: str, dim: int, seed: int, max_cells: int | None = None
) -> GeneVocab:
    """The workflow's own vocabulary over the union of the datasets' genes (sorted symbols).

    source "random": deterministic random vectors per symbol; "coexpression": truncated SVD of
    the log-normalised training cells (at most `max_cells` per dataset).
    """
    if source not in SOURCES:
        raise UserError(f"vocab.source '{source}' is unknown; use one of {', '.join(SOURCES)}")
    if source == "random":
        symbols = {str(s) for path in paths for s in read_var(path).index}
        return build_random_vocab(sorted(symbols), dim, seed)
    matrices = []
    for path in paths:
        X, symbols = read_training_counts(path, max_cells, seed)
        log.info("%s: %d training cells x %d genes for co-expression", path, X.shape[0], X.shape[1])
        matrices.append((X, symbols))
    return build_coexpression_vocab(matrices, dim, seed)
