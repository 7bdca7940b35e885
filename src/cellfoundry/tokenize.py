"""Top-gene tokenization: each cell becomes a "cell sentence" of L slots for the SE transformer.

Slot 0 is the CLS slot (gene id CLS_ID); slots 1..L-1 hold global vocabulary ids of the cell's
top expressed genes in rank order (expression descending), with a value per slot.

Methods (exact rules in spec/se.md, "Tokenization"):

- ``se`` (SE-600M's sentence): per cell, raw counts are detected (max > 35 or sum(expm1) > 5e6,
  over all the cell's genes) and log1p'd; weights w = x / sum(x) over vocabulary genes (uniform
  if the sum is 0); the top L-1 expressed genes by x fill the sentence, and a cell with fewer
  expressed genes gets unexpressed vocabulary genes of the dataset drawn with replacement as
  fillers (when none is left, the remaining slots are PAD_ID). values = 100 * w; the CLS slot's
  value is 100 * w[vocabulary gene with local index 3].
- ``topk``: up to L-1 expressed genes by expression, the rest PAD_ID; values =
  log1p(count / total * target_sum); CLS and PAD slots have value 0.

All randomness (tie order, fillers) comes from counter-based hashes of (seed, global cell index,
gene or slot), so the tokens of a cell do not depend on chunk size or worker count.

Everything is vectorised over chunks of a CSR matrix: no per-cell Python loop. Ranking packs
(expression bits, tie key, local gene index) into one uint64 per entry and sorts the rows of a
padded 2-D array, which NumPy does with SIMD sorts (about half of the CPU time); fillers are
found with one searchsorted per block of cells. tokenize_h5ad reads a chunk of X with h5py,
tokenizes it in blocks of _BLOCK_CELLS cells into reused buffers, and writes the rows in place
(O_DIRECT where possible, see DIRECT_IO); benchmarks/bench_tokenize.py measures it.

On disk (``tokens/``): gene_ids.npy int32 [N, L], values.npy float32 [N, L], n_expressed.npy
int32 [N] (plain .npy, memory-mappable), attrs.json, coverage.tsv.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from .genes import mapped_genes
from .utils import UserError, atomic_output
from .vocab import GeneMatch, GeneVocab, explain_poor_match, match_genes, read_var

log = logging.getLogger(__name__)

CLS_ID = -2
PAD_ID = -1
METHODS = ("se", "topk")
FORMAT_VERSION = 1

# SE-600M's raw-count detection and CLS-slot quirk (spec/se.md).
RAW_MAX = 35.0
RAW_EXPM1_SUM = 5e6
CLS_WEIGHT_LOCAL_INDEX = 3

_U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TIE_MULT = np.uint32(0x9E3779B1)
_STREAM_TIES, _STREAM_FILL = 1, 2


# ---------------------------------------------------------------------------- random streams


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al.), element-wise on uint64; a fresh array."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def cell_keys(seed: int, cells: np.ndarray, stream: int) -> np.ndarray:
    """One uint64 key per global cell index and stream: the root of that cell's random draws."""
    base = splitmix64(np.array([seed * 8 + stream], dtype=np.uint64))
    return splitmix64(base ^ splitmix64(np.asarray(cells, dtype=np.uint64)))


def gene_keys(seed: int, n_genes: int) -> np.ndarray:
    """One uint64 key per vocabulary-local gene index [n_genes] (for tie-breaking)."""
    base = splitmix64(np.array([seed * 8 + 7], dtype=np.uint64))
    return splitmix64(base + np.arange(n_genes, dtype=np.uint64))


def tie_keys(cell_key: np.ndarray, gene_key: np.ndarray, bits: int) -> np.ndarray:
    """Tie-break keys in [0, 2**bits), uint32: top bits of (gene key XOR cell key) * odd constant,
    on the low 32 bits of both keys (cheap enough to compute for every expressed entry)."""
    mixed = np.asarray(gene_key).astype(np.uint32, copy=False) ^ np.asarray(cell_key).astype(np.uint32, copy=False)
    mixed *= _TIE_MULT
    return mixed >> np.uint32(32 - bits)


def filler_draws(cell_key: np.ndarray, slot: np.ndarray, n_choices: np.ndarray) -> np.ndarray:
    """Uniform integers in [0, n_choices) for filler draw `slot` of a cell (multiply-shift)."""
    h = splitmix64(cell_key + np.asarray(slot, dtype=np.uint64) * _GOLDEN)
    return (((h >> np.uint64(32)) * np.asarray(n_choices, dtype=np.uint64)) >> np.uint64(32)).astype(np.int64)


def key_layout(n_vocab_genes: int) -> tuple[int, int]:
    """(gene_bits, tie_bits) of the low word of the packed sort key.

    Sort key (uint64) = high word: 0xFFFFFFFF - float32 bits of the value (ascending = value
    descending, values are >= 0); low word: tie key (tie_bits) | vocabulary-local gene index
    (gene_bits). The all-ones local index is kept free for padding. Equal tie keys (possible with
    16 bits) fall back to the gene index, so the order is always defined.
    """
    gene_bits = max(16, int(n_vocab_genes).bit_length())
    return gene_bits, 32 - gene_bits


# ---------------------------------------------------------------------------- one chunk


@dataclass
class TokenChunk:
    """Tokens of n cells: gene_ids int32 [n, L], values float32 [n, L], n_expressed int32 [n]
    (expressed vocabulary genes, may exceed L-1); total / in_vocab: summed (clipped) input values
    of the chunk over all genes / over vocabulary genes."""

    gene_ids: np.ndarray
    values: np.ndarray
    n_expressed: np.ndarray
    total: float
    in_vocab: float


def _as_csr(X) -> sp.csr_matrix:
    if not isinstance(X, sp.csr_matrix):  # a csr_matrix is used as it is (never written to)
        X = sp.csr_matrix(X) if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    if not X.has_sorted_indices:
        X = X.copy()
        X.sort_indices()
    return X


def tokenize_csr(
    X,
    local_to_global: np.ndarray,
    length: int,
    method: str = "se",
    seed: int = 0,
    row_offset: int = 0,
    target_sum: float = 1e4,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> TokenChunk:
    """Tokenize cells `row_offset .. row_offset + n` of a dataset.

    X: [n, G] CSR (or dense) expression over the dataset's genes (raw counts or log1p values).
    local_to_global: int64 [G], vocabulary id of each dataset gene, -1 where absent.
    out: optional (gene_ids int32 [n, length], values float32 [n, length]) to write the tokens
    into (every element is overwritten); fresh arrays otherwise.
    """
    if method not in METHODS:
        raise UserError(f"tokenize.method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if length < 2:
        raise UserError(f"tokenize.length must be at least 2 (CLS + one gene), got {length}")
    X = _as_csr(X)
    n, G = X.shape
    local_to_global = np.asarray(local_to_global, dtype=np.int64)
    if local_to_global.shape != (G,):
        raise ValueError(f"local_to_global has shape {local_to_global.shape}, expected ({G},)")
    in_vocab_gene = local_to_global >= 0
    all_in_vocab = bool(in_vocab_gene.all())
    vocab_ids = local_to_global[in_vocab_gene]  # vocabulary-local index -> global id
    n_vocab = len(vocab_ids)
    L1 = length - 1

    indptr = X.indptr.astype(np.int64)
    nnz_row = np.diff(indptr)
    rows = None  # row of each stored entry, built only where a rare path needs it

    def entry_rows() -> np.ndarray:
        nonlocal rows
        if rows is None:
            rows = np.repeat(np.arange(n, dtype=np.int32), nnz_row)
        return rows

    data = X.data.astype(np.float32, copy=False)  # never written to: it may be the caller's array
    if data.size and not data.min() >= 0:  # clip negatives (NaN kept as np.maximum keeps it)
        data = np.maximum(data, np.float32(0))

    # Raw-count detection per cell over all its genes (before restricting to the vocabulary):
    # max > 35 or sum(expm1) > 5e6. expm1(max) <= sum <= nnz * expm1(max) settles most cells
    # without summing.
    row_max = np.zeros(n, dtype=np.float32)
    has = nnz_row > 0
    if data.size:
        row_max[has] = np.maximum.reduceat(data, indptr[:-1][has])
    with np.errstate(over="ignore"):
        max_term = np.expm1(row_max.astype(np.float64))
    is_raw = (row_max > RAW_MAX) | (max_term > RAW_EXPM1_SUM)
    # Capped: only cells not yet raw (max_term <= RAW_EXPM1_SUM) are asked, and the cap keeps
    # nnz * expm1(max) of a raw cell with max near 709 from overflowing float64.
    undecided = ~is_raw & (nnz_row * np.minimum(max_term, RAW_EXPM1_SUM) > RAW_EXPM1_SUM)
    if undecided.any():
        sel = undecided[entry_rows()]
        with np.errstate(over="ignore"):
            expm1_sum = np.bincount(rows[sel], weights=np.expm1(data[sel].astype(np.float64)), minlength=n)
        is_raw |= expm1_sum > RAW_EXPM1_SUM
    if is_raw.all():
        x = np.log1p(data)
    elif is_raw.any():
        x = np.where(is_raw[entry_rows()], np.log1p(data), data)
    else:
        x = data

    total = float(data.sum(dtype=np.float64))
    if all_in_vocab:
        in_vocab = total
        if not x.size or x.min() > 0:  # the usual CSR: only non-zeros stored, every gene in the vocabulary
            expressed = slice(None)
            eloc, ex, n_pos = X.indices, x, nnz_row
        else:
            expressed = x > 0
            eloc, ex = X.indices[expressed], x[expressed]
    else:
        keep = in_vocab_gene[X.indices]
        in_vocab = float(data[keep].sum(dtype=np.float64))
        expressed = keep & (x > 0)
        vocab_local = (np.cumsum(in_vocab_gene) - 1).astype(np.int32)  # dataset gene -> vocabulary-local
        eloc, ex = vocab_local[X.indices[expressed]], x[expressed]
    if not isinstance(expressed, slice):
        n_pos = np.bincount(entry_rows()[expressed], minlength=n).astype(np.int64)
    estart = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_pos, out=estart[1:])
    cells = np.arange(row_offset, row_offset + n, dtype=np.int64)

    if method == "se":
        rank_value = ex
        # Sum per cell in float64 (exact for log-count values), then weights in float32 as SE does.
        row_sum = np.zeros(n, dtype=np.float64)
        nonempty = n_pos > 0
        if nonempty.any():
            row_sum[nonempty] = np.add.reduceat(ex, estart[:-1][nonempty], dtype=np.float64)
        row_sum32 = row_sum.astype(np.float32)
    else:
        # topk: log1p of library-size-normalised counts (log input is mapped back to counts).
        data64 = data.astype(np.float64)
        with np.errstate(over="ignore"):  # expm1 of raw counts > 709 is inf, and np.where discards it
            counts = np.where(is_raw[entry_rows()], data64, np.expm1(data64))
        library = np.bincount(rows, weights=counts, minlength=n)
        scale = np.divide(target_sum, library, out=np.zeros(n), where=library > 0)
        rank_value = np.log1p(counts[expressed] * np.repeat(scale, n_pos)).astype(np.float32)
        del data64, counts

    if out is None:
        gene_ids = np.empty((n, length), dtype=np.int32)
        values = np.empty((n, length), dtype=np.float32)
    else:
        gene_ids, values = out
        if gene_ids.shape != (n, length) or values.shape != (n, length) or gene_ids.dtype != np.int32 \
                or values.dtype != np.float32 or not (gene_ids.flags.c_contiguous and values.flags.c_contiguous):
            raise ValueError(f"out must be C-contiguous int32 and float32 arrays of shape ({n}, {length})")
    width = int(n_pos.max()) if n else 0
    if width:
        _rank_rows(gene_ids, values, eloc, rank_value, n_pos, width, n_vocab, vocab_ids, seed, cells,
                   row_sum32 if method == "se" else None)
    else:
        gene_ids.fill(PAD_ID)
        values.fill(0)
    gene_ids[:, 0] = CLS_ID
    values[:, 0] = 0

    if method == "se":
        _se_fill(gene_ids, values, seed, cells, n_pos, estart, eloc, ex, row_sum32, vocab_ids, L1)

    return TokenChunk(gene_ids, values, n_pos.astype(np.int32), total, in_vocab)


def _rank_rows(gene_ids, values, eloc, rank_value, n_pos, width, n_vocab, vocab_ids, seed, cells,
               row_sum32) -> None:
    """Slots 1.. of every row: the expressed genes ranked by value, tie key, local gene index;
    PAD_ID / 0.0 after them (slot 0 is left to the caller).

    One uint64 key per entry (high word: inverted float32 bits of the value; low word: tie key |
    local gene index, see key_layout) is scattered into a padded [n, width] array (padding = all
    ones, sorts last and decodes to PAD_ID / 0.0) whose rows NumPy sorts with its SIMD sort."""
    n, length = gene_ids.shape
    gene_bits, _ = key_layout(n_vocab)
    eloc32 = eloc.view(np.uint32) if eloc.dtype == np.int32 else eloc.astype(np.uint32)
    # low word = tie_keys(cell key, gene key) << gene_bits | local gene, computed in place on one array
    low = _gene_keys32(seed, n_vocab)[eloc32.astype(np.intp)]
    low ^= np.repeat(cell_keys(seed, cells, _STREAM_TIES).astype(np.uint32), n_pos)
    low *= _TIE_MULT
    low &= np.uint32((0xFFFFFFFF << gene_bits) & 0xFFFFFFFF)
    low |= eloc32
    key = np.empty(len(low), dtype=np.uint64)
    words = key.view(np.uint32).reshape(-1, 2)  # little-endian: [:, 0] low word, [:, 1] high word
    words[:, 0] = low
    del low
    np.invert(rank_value.view(np.uint32), out=words[:, 1])  # 0xFFFFFFFF - value bits: descending
    del words
    # Row i of `ranked` lines up with output row i: column 0 stands for the CLS slot, the keys sort
    # in columns 1..width, and padding columns reach at least the sentence length, so the first
    # `length` columns decode straight into the (contiguous) output rows.
    ranked = np.full((n, 1 + max(width, length - 1)), _U64_MAX, dtype=np.uint64)
    ranked[:, 1 : 1 + width][np.arange(width) < n_pos[:, None]] = key
    del key
    ranked[:, 1 : 1 + width].sort(axis=1)
    top = ranked[:, :length]
    local_to_id = np.full(1 << gene_bits, PAD_ID, dtype=np.int32)
    local_to_id[:n_vocab] = vocab_ids
    if gene_bits == 16:  # the low 16 bits are the local gene index
        gene_idx = top.view(np.uint16)[..., ::4].astype(np.intp)
    else:
        gene_idx = (top.view(np.uint32)[..., ::2] & np.uint32((1 << gene_bits) - 1)).astype(np.intp)
    np.take(local_to_id, gene_idx, out=gene_ids, mode="clip")
    del gene_idx
    # The value's float32 bits are the inverted high word (padding decodes to 0.0).
    np.invert(top.view(np.uint32)[..., 1::2], out=values.view(np.uint32))
    if row_sum32 is not None:  # se: 100 * w, w = x / sum(x) in float32
        denom = np.where(row_sum32 > 0, row_sum32, np.float32(1))[:, None]
        np.divide(values, denom, out=values)
        np.multiply(values, np.float32(100), out=values)


@functools.lru_cache(maxsize=8)
def _gene_keys32(seed: int, n_genes: int) -> np.ndarray:
    """Low 32 bits of gene_keys (the part the tie key uses); cached per (seed, genes)."""
    keys = gene_keys(seed, n_genes).astype(np.uint32)
    keys.flags.writeable = False
    return keys


def _se_fill(gene_ids, values, seed, cells, n_pos, estart, eloc, ex, row_sum32, vocab_ids, L1) -> None:
    """SE's filler genes and CLS-slot value, in place (weights float32: x / sum, as SE computes)."""
    n = len(cells)
    n_vocab = len(vocab_ids)
    if n_vocab == 0:
        return
    empty = row_sum32 <= 0  # SE uses softmax of all-zero x: uniform weights
    uniform = np.float32(1) / np.float32(n_vocab)

    # CLS value: 100 * w[vocabulary-local gene 3]. A row's local indices ascend, so gene 3 is one
    # of its first four entries when it is expressed.
    if n_vocab > CLS_WEIGHT_LOCAL_INDEX:
        cls_w = np.zeros(n, dtype=np.float32)
        for k in range(CLS_WEIGHT_LOCAL_INDEX + 1):
            pos = estart[:-1] + k
            ok = np.flatnonzero(k < n_pos)
            hit = ok[eloc[pos[ok]] == CLS_WEIGHT_LOCAL_INDEX]
            cls_w[hit] = ex[pos[hit]] / row_sum32[hit]
        cls_w[empty] = uniform
        values[:, 0] = cls_w * np.float32(100)

    need = np.maximum(L1 - n_pos, 0)
    n_unexpressed = n_vocab - n_pos
    need[n_unexpressed <= 0] = 0  # nothing left to draw: the slots stay PAD (see docs)
    total_need = int(need.sum())
    if not total_need:
        return
    frow = np.repeat(np.arange(n), need)
    fslot = np.arange(total_need) - np.repeat(np.cumsum(need) - need, need)
    r = filler_draws(cell_keys(seed, cells, _STREAM_FILL)[frow], fslot, n_unexpressed[frow])
    # The r-th unexpressed local gene is r + c, c = #{expressed e_j of the row: e_j - j <= r}
    # (j: e_j's position in its row; e_j - j, the number of unexpressed genes below e_j, does not
    # decrease along a row). One searchsorted over the chunk answers every draw: shifted_j =
    # row * span + e_j - j is non-decreasing over the whole chunk, the query is row * span + r.
    # Queries are searched in ascending order (much faster), so each row's draws are sorted first,
    # with their slot packed in the low bits (a row-wise SIMD sort of a small padded array).
    slot_bits = int(L1).bit_length()
    kdtype = np.int32 if int(n_vocab).bit_length() + slot_bits <= 31 else np.int64
    in_row = np.arange(int(need.max())) < need[:, None]
    packed = np.full(in_row.shape, np.iinfo(kdtype).max, dtype=kdtype)
    packed[in_row] = (r << slot_bits) | fslot
    packed.sort(axis=1)
    packed = packed[in_row]  # row by row, as frow
    r = (packed >> slot_bits).astype(np.int64)
    fslot = (packed & ((1 << slot_bits) - 1)).astype(np.int64)
    del packed, in_row
    span = n_vocab + 1
    itype = np.int32 if (n + 1) * span + len(eloc) < 2**31 else np.int64
    shifted = np.arange(len(eloc), dtype=itype)
    np.subtract(eloc, shifted, out=shifted)
    shifted += np.repeat((np.arange(n, dtype=np.int64) * span + estart[:-1]).astype(itype), n_pos)
    count = np.searchsorted(shifted, (frow * span + r).astype(itype), side="right")
    del shifted
    count -= estart[frow]
    filler_loc = r + count
    flat = frow * gene_ids.shape[1] + 1 + n_pos[frow] + fslot
    gene_ids.reshape(-1)[flat] = vocab_ids[filler_loc]
    fill_empty = empty[frow]
    if fill_empty.any():  # other filler slots keep the 0.0 their padding decoded to
        values.reshape(-1)[flat[fill_empty]] = uniform * np.float32(100)


# ---------------------------------------------------------------------------- whole datasets


@dataclass
class Tokens:
    """Tokens of N cells: gene_ids int32 [N, L], values float32 [N, L], n_expressed int32 [N]
    (memory-mapped when read from disk), attrs (vocab_hash, L, method, seed, source_hash, n_cells)."""

    gene_ids: np.ndarray
    values: np.ndarray
    n_expressed: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.gene_ids.shape[0])

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells [start:stop] as in-memory arrays (a contiguous read of each file)."""
        return (np.array(self.gene_ids[start:stop]), np.array(self.values[start:stop]),
                np.array(self.n_expressed[start:stop]))


def coverage_row(name: str, match: GeneMatch, vocab: GeneVocab, total: float, in_vocab: float,
                 mapped: np.ndarray | None = None) -> dict[str, Any]:
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


def check_coverage(row: dict[str, Any], min_coverage: float, match: GeneMatch, vocab: GeneVocab,
                   var_columns: dict[str, Sequence] | Callable[[], dict[str, Sequence]] | None = None) -> None:
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


def tokenize_anndata(adata, vocab: GeneVocab, length: int, method: str = "se", seed: int = 0,
                     chunk_size: int = 1024, target_sum: float = 1e4, min_coverage: float = 0.0,
                     name: str = "input") -> Tokens:
    """Tokenize an in-memory AnnData (X over var_names as gene symbols); returns in-memory Tokens."""
    match = match_genes(adata.var_names, vocab)
    N = adata.n_obs
    gene_ids = np.empty((N, length), dtype=np.int32)
    values = np.empty((N, length), dtype=np.float32)
    n_expressed = np.empty(N, dtype=np.int32)
    total = in_vocab = 0.0
    for start in range(0, N, chunk_size):
        stop = min(start + chunk_size, N)
        chunk = tokenize_csr(adata.X[start:stop], match.local_to_global, length, method, seed, start, target_sum,
                             out=(gene_ids[start:stop], values[start:stop]))
        n_expressed[start:stop] = chunk.n_expressed
        total += chunk.total
        in_vocab += chunk.in_vocab
    row = coverage_row(name, match, vocab, total, in_vocab)
    check_coverage(row, min_coverage, match, vocab, _string_columns(adata.var))
    attrs = _attrs(vocab, length, method, seed, None, N, target_sum)
    return Tokens(gene_ids, values, n_expressed, attrs)


def _attrs(vocab, length, method, seed, source_hash, n_cells, target_sum) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "vocab_hash": vocab.hash,
        "vocab_size": len(vocab),
        "L": int(length),
        "method": method,
        "seed": int(seed),
        "target_sum": float(target_sum) if method == "topk" else None,
        "source_hash": source_hash,
        "n_cells": int(n_cells),
        "cls_id": CLS_ID,
        "pad_id": PAD_ID,
    }


def _string_columns(var) -> dict[str, Sequence]:
    out = {}
    for col in var.columns:
        if var[col].dtype == object or str(var[col].dtype) in ("category", "string"):
            out[str(col)] = var[col].astype(str).tolist()
    return out


_ARRAYS = ("gene_ids", "values", "n_expressed")


def _var_names(path: str | os.PathLike) -> list[str] | None:
    """The var index (gene symbols) of an h5ad in anndata's dataframe encoding, read with h5py
    alone (importing anndata costs more than reading); None for any other layout."""
    import h5py

    with h5py.File(path, "r") as f:
        var = f.get("var")
        if not isinstance(var, h5py.Group) or var.attrs.get("encoding-type") != "dataframe":
            return None
        index = var.get(str(var.attrs.get("_index", "_index")))
        if not isinstance(index, h5py.Dataset) or index.attrs.get("encoding-type") != "string-array":
            return None
        return index.asstr()[()].tolist()


# Token rows are written with O_DIRECT where the file system takes it: the page-aligned part of
# each chunk goes from the chunk's buffer straight to the file, without a copy into fresh page-cache
# pages (on the VMs measured, first touches of fresh memory cost more than tokenizing). Set to False
# to write everything through the page cache; the files are the same.
DIRECT_IO = True
_ALIGN = 4096  # O_DIRECT alignment of file offsets, lengths and memory (every Linux file system takes 4 KiB)
_DIRECT_MIN = 1 << 16  # smaller writes go through the page cache


class _CountsReader:
    """Rows [a:b] of an h5ad's X without loading obs/var, so memory stays flat whatever the number
    of cells. A CSR X is read with h5py as two contiguous slices (data, indices) of the rows."""

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.file = h5py.File(path, "r")
        X = self.file["X"]
        self.csr = isinstance(X, h5py.Group) and X.attrs.get("encoding-type") == "csr_matrix"
        if self.csr:
            self.data, self.indices = X["data"], X["indices"]
            self.indptr = X["indptr"]
            self.shape = tuple(int(s) for s in X.attrs["shape"])
            self.X = None
        else:  # csc or dense: anndata's backed access
            import anndata as ad

            self.X = ad.io.sparse_dataset(X) if isinstance(X, h5py.Group) else X
            self.shape = tuple(int(s) for s in self.X.shape)
        self.n_obs = self.shape[0]

    def rows(self, start: int, stop: int):
        if not self.csr:
            return self.X[start:stop]
        indptr = self.indptr[start : stop + 1].astype(np.int64)
        a, b = int(indptr[0]), int(indptr[-1])
        indptr -= a
        data = self.data[a:b] if b > a else np.zeros(0, dtype=self.data.dtype)
        indices = self.indices[a:b] if b > a else np.zeros(0, dtype=self.indices.dtype)
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.shape[1]))

    def close(self) -> None:
        self.file.close()


class _RowWriter:
    """Writes chunks of token rows at their place in the pre-sized .npy files of a tokens folder
    (plain positional writes: nothing mapped, nothing held after a call). With DIRECT_IO, the
    4 KiB-aligned middle of each chunk is written with O_DIRECT from the chunk's own buffer
    (`buffers` places the rows so that their file-aligned bytes are memory-aligned), the few
    bytes before and after it through the page cache; any O_DIRECT refusal falls back to plain
    writes."""

    def __init__(self, out_dir: str | os.PathLike, offsets: dict[str, int], length: int):
        self.offsets, self.length = offsets, length
        paths = {name: Path(out_dir) / f"{name}.npy" for name in _ARRAYS}
        self.fd = {name: os.open(p, os.O_WRONLY) for name, p in paths.items()}
        self.direct: dict[str, int] = {}
        if DIRECT_IO and hasattr(os, "O_DIRECT"):
            for name in ("gene_ids", "values"):
                try:
                    self.direct[name] = os.open(paths[name], os.O_WRONLY | os.O_DIRECT)
                except OSError:
                    break
        self._buffers: dict[str, np.ndarray] = {}

    def buffers(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(gene_ids, values) arrays [n, length] for rows start.. (reused from call to call)."""
        out = []
        for name, dtype in (("gene_ids", np.int32), ("values", np.float32)):
            nbytes = n * self.length * 4
            buf = self._buffers.get(name)
            if buf is None or buf.nbytes < nbytes + 2 * _ALIGN:
                buf = self._buffers[name] = np.empty(nbytes + 2 * _ALIGN, dtype=np.uint8)
            at = (-buf.ctypes.data) % _ALIGN + (self.offsets[name] + start * self.length * 4) % _ALIGN
            out.append(buf[at : at + nbytes].view(dtype).reshape(n, self.length))
        return out[0], out[1]

    def write(self, start: int, chunk: TokenChunk) -> None:
        for name in _ARRAYS:
            arr = np.ascontiguousarray(getattr(chunk, name))
            row_bytes = arr.itemsize * (arr.shape[1] if arr.ndim == 2 else 1)
            self._write(name, arr, self.offsets[name] + start * row_bytes)

    def _write(self, name: str, arr: np.ndarray, pos: int) -> None:
        view = memoryview(arr).cast("B")
        fd = self.direct.get(name)
        a0 = -(-pos // _ALIGN) * _ALIGN  # the aligned middle [a0, a1) of [pos, pos + len)
        a1 = (pos + len(view)) // _ALIGN * _ALIGN
        if fd is not None and a1 - a0 >= _DIRECT_MIN and (arr.ctypes.data + a0 - pos) % _ALIGN == 0:
            try:
                _pwrite_all(fd, view[a0 - pos : a1 - pos], a0)
            except OSError:  # this file system wants something else: plain writes from now on
                os.close(self.direct.pop(name))
            else:
                _pwrite_all(self.fd[name], view[: a0 - pos], pos)
                _pwrite_all(self.fd[name], view[a1 - pos :], a1)
                return
        _pwrite_all(self.fd[name], view, pos)

    def close(self) -> None:
        for fd in (*self.fd.values(), *self.direct.values()):
            os.close(fd)
        self.fd, self.direct, self._buffers = {}, {}, {}


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    while view:
        written = os.pwrite(fd, view, pos)
        view, pos = view[written:], pos + written


_WORKER: dict[str, Any] = {}


def _keep_freed_memory(keep: bool = True) -> None:
    """Ask glibc to keep freed chunk buffers for the next chunk instead of returning them to the
    OS: fresh pages (page faults, zeroing) otherwise cost about a third of the CPU time.
    keep=False restores glibc's defaults and hands the kept memory back."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if keep:
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc maximum)
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
            libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: arrays above the threshold from the heap too
        else:
            libc.mallopt(-4, 65536)
            libc.mallopt(-3, 128 << 10)
            libc.mallopt(-1, 128 << 10)
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the defaults only cost speed
        pass


def _worker_init(path: str, out_dir: str, offsets: dict[str, int], length: int) -> None:
    _keep_freed_memory()
    _WORKER["reader"] = _CountsReader(path)
    _WORKER["writer"] = _RowWriter(out_dir, offsets, length)


def _worker_close() -> None:
    _WORKER.pop("reader").close()
    _WORKER.pop("writer").close()


def _worker_chunk(args) -> tuple[int, int, float, float]:
    """Tokenize rows [start, stop) of the worker's open h5ad and write them in place."""
    start, stop, local_to_global, length, method, seed, target_sum = args
    reader, writer = _WORKER["reader"], _WORKER["writer"]
    chunk = _tokenize_rows(reader.rows(start, stop), start, local_to_global, length, method, seed, target_sum,
                           out=writer.buffers(start, stop - start))
    writer.write(start, chunk)
    return start, stop, chunk.total, chunk.in_vocab


def _tokenize_rows(X, start, local_to_global, length, method, seed, target_sum, out=None) -> TokenChunk:
    """tokenize_csr of a chunk read whole, _BLOCK_CELLS rows at a time (the temporaries of a block
    stay small and warm in cache; the tokens do not depend on it), into `out` if given."""
    X = _as_csr(X)
    n = X.shape[0]
    if out is None:
        out = np.empty((n, length), dtype=np.int32), np.empty((n, length), dtype=np.float32)
    gene_ids, values = out
    n_expressed = np.empty(n, dtype=np.int32)
    total = in_vocab = 0.0
    for a in range(0, n, _BLOCK_CELLS):
        b = min(a + _BLOCK_CELLS, n)
        block = tokenize_csr(_csr_rows(X, a, b), local_to_global, length, method, seed, start + a, target_sum,
                             out=(gene_ids[a:b], values[a:b]))
        n_expressed[a:b] = block.n_expressed
        total, in_vocab = total + block.total, in_vocab + block.in_vocab
    return TokenChunk(gene_ids, values, n_expressed, total, in_vocab)


_BLOCK_CELLS = 512


def _csr_rows(X: sp.csr_matrix, a: int, b: int) -> sp.csr_matrix:
    """Rows [a, b) of a CSR matrix as views of its data and indices (scipy's slicing copies)."""
    if a == 0 and b == X.shape[0]:
        return X
    p, q = int(X.indptr[a]), int(X.indptr[b])
    rows = sp.csr_matrix((b - a, X.shape[1]), dtype=X.dtype)
    # Set directly: the constructor would copy views that are much smaller than their base.
    rows.data, rows.indices, rows.indptr = X.data[p:q], X.indices[p:q], X.indptr[a : b + 1] - p
    rows.has_sorted_indices = X.has_sorted_indices
    return rows


def tokenize_h5ad(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab: GeneVocab,
    length: int,
    method: str = "se",
    seed: int = 0,
    chunk_size: int = 2048,
    workers: int = 1,
    min_coverage: float = 0.5,
    target_sum: float = 1e4,
    dataset: str = "dataset",
    source_hash: str | None = None,
) -> dict[str, Any]:
    """Tokenize an h5ad file out of core into `out_dir` (written atomically); returns the coverage row.

    The h5ad is read `chunk_size` cells at a time (X only, with h5py), so memory does not grow with
    the number of cells; `workers` > 1 tokenizes chunks in that many processes (same output).
    """
    if method not in METHODS:
        raise UserError(f"tokenize.method '{method}' is unknown; use one of {', '.join(METHODS)}")
    _keep_freed_memory()  # for the whole call (worker processes inherit it); restored after
    try:
        return _tokenize_h5ad(path, out_dir, vocab, length, method, seed, chunk_size, workers, min_coverage,
                              target_sum, dataset, source_hash)
    finally:
        _keep_freed_memory(False)


def _tokenize_h5ad(path, out_dir, vocab, length, method, seed, chunk_size, workers, min_coverage, target_sum,
                   dataset, source_hash) -> dict[str, Any]:
    var_names = _var_names(path)
    if var_names is None:  # another layout of var: anndata reads it
        var = read_var(path)
        var_names, columns = var.index, _string_columns(var)
        del var
        var_columns = lambda: columns  # noqa: E731
    else:  # the other var columns only matter to explain a poor match
        var_columns = lambda: _string_columns(read_var(path))  # noqa: E731
    match = match_genes(var_names, vocab)
    del var_names
    reader = _CountsReader(path)
    try:
        N = reader.n_obs
        if N == 0:
            raise UserError(f"{path} holds no cells; check the QC thresholds of dataset '{dataset}'")
        # Fail fast on a vocabulary mismatch, judged on the first chunk (kept and written below).
        first = _tokenize_rows(reader.rows(0, min(chunk_size, N)), 0, match.local_to_global, length, method, seed,
                               target_sum)
    finally:
        reader.close()
    check_coverage(coverage_row(dataset, match, vocab, first.total, first.in_vocab),
                   min_coverage, match, vocab, var_columns)
    log.info("dataset %s: %d of %d genes in the vocabulary (%d genes); %d cells, L = %d, method %s, %d worker(s)",
             dataset, match.n_matched, match.n_genes, len(vocab), N, length, method, workers)

    out_dir = Path(out_dir)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        offsets = {}
        for name, dtype, shape in (("gene_ids", np.int32, (N, length)), ("values", np.float32, (N, length)),
                                   ("n_expressed", np.int32, (N,))):
            mm = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            offsets[name] = mm.offset
            del mm
        done = len(first.n_expressed)
        total, in_vocab = first.total, first.in_vocab
        jobs = [(s, min(s + chunk_size, N), match.local_to_global, length, method, seed, target_sum)
                for s in range(done, N, chunk_size)]
        init_args = (str(path), str(tmp), offsets, length)
        t0 = last = time.perf_counter()
        if workers > 1:
            import multiprocessing as mp

            writer = _RowWriter(tmp, offsets, length)
            writer.write(0, first)
            writer.close()
            del first
            # fork: a rule script has no __main__ guard, so spawned children would re-run it.
            method_name = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method_name).Pool(workers, initializer=_worker_init, initargs=init_args) as pool:
                for start, stop, t, v in pool.imap_unordered(_worker_chunk, jobs):
                    total, in_vocab, done = total + t, in_vocab + v, done + stop - start
                    last = _progress(done, N, t0, last)
        else:
            _worker_init(*init_args)
            try:
                _WORKER["writer"].write(0, first)
                del first
                for job in jobs:
                    start, stop, t, v = _worker_chunk(job)
                    total, in_vocab, done = total + t, in_vocab + v, done + stop - start
                    last = _progress(done, N, t0, last)
            finally:
                _worker_close()
        row = coverage_row(dataset, match, vocab, total, in_vocab, mapped_genes(path))
        check_coverage(row, min_coverage, match, vocab, var_columns)
        _write_tsv(tmp / "coverage.tsv", [row])
        attrs = _attrs(vocab, length, method, seed, source_hash, N, target_sum)
        (tmp / "attrs.json").write_text(json.dumps(attrs, indent=2) + "\n")
    log.info("dataset %s: %d of %d genes matched, %.1f%% of counts covered; tokens in %s",
             dataset, row["n_genes_matched"], row["n_genes"], 100 * row["fraction_counts_covered"], out_dir)
    return row


def _progress(done: int, N: int, t0: float, last: float) -> float:
    now = time.perf_counter()
    if done == N or now - last > 10:
        log.info("tokenized %d / %d cells (%.0f cells/s)", done, N, done / max(now - t0, 1e-9))
        return now
    return last


def _write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    lines = ["\t".join(keys)] + ["\t".join(str(r[k]) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def read_tokens(path: str | os.PathLike, vocab_hash: str | None = None, mmap: bool = True) -> Tokens:
    """Open a tokens/ folder (memory-mapped by default, so slicing rows [a:b] reads only them).

    Raises UserError when the folder is incomplete or was built with another vocabulary than
    `vocab_hash` (GeneVocab.hash of the vocabulary the model uses).
    """
    path = Path(path)
    attrs_file = path / "attrs.json"
    if not attrs_file.is_file():
        raise UserError(f"{path} is not a complete tokens folder (no attrs.json); re-run the tokenize rule")
    attrs = json.loads(attrs_file.read_text())
    if vocab_hash is not None and attrs.get("vocab_hash") != vocab_hash:
        raise UserError(
            f"tokens in {path} were built with another gene vocabulary (hash {str(attrs.get('vocab_hash'))[:12]}..., "
            f"the model's is {vocab_hash[:12]}...); re-run the tokenize rule with this model's vocabulary "
            f"(e.g. snakemake --forcerun tokenize)"
        )
    mode = "r" if mmap else None
    arrays = [np.load(path / f"{name}.npy", mmap_mode=mode) for name in ("gene_ids", "values", "n_expressed")]
    n, L = attrs["n_cells"], attrs["L"]
    if arrays[0].shape != (n, L) or arrays[1].shape != (n, L) or arrays[2].shape != (n,):
        raise UserError(f"tokens in {path} do not match their attrs.json (N={n}, L={L}); re-run the tokenize rule")
    return Tokens(*arrays, attrs)
