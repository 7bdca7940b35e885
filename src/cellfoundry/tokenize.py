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
padded 2-D array, which NumPy does with SIMD sorts.

On disk (``tokens/``): gene_ids.npy int32 [N, L], values.npy float32 [N, L], n_expressed.npy
int32 [N] (plain .npy, memory-mappable), attrs.json, coverage.tsv.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

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
_U32_MAX = np.uint32(0xFFFFFFFF)
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
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    else:
        X = sp.csr_matrix(np.asarray(X))
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
) -> TokenChunk:
    """Tokenize cells `row_offset .. row_offset + n` of a dataset.

    X: [n, G] CSR (or dense) expression over the dataset's genes (raw counts or log1p values).
    local_to_global: int64 [G], vocabulary id of each dataset gene, -1 where absent.
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
    rows = np.repeat(np.arange(n, dtype=np.int32), nnz_row)
    data = np.maximum(X.data.astype(np.float32, copy=False), np.float32(0))

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
    undecided = ~is_raw & (nnz_row * max_term > RAW_EXPM1_SUM)
    if undecided.any():
        sel = undecided[rows]
        with np.errstate(over="ignore"):
            expm1_sum = np.bincount(rows[sel], weights=np.expm1(data[sel].astype(np.float64)), minlength=n)
        is_raw |= expm1_sum > RAW_EXPM1_SUM
    if is_raw.all():
        x = np.log1p(data)
    elif is_raw.any():
        x = np.where(is_raw[rows], np.log1p(data), data)
    else:
        x = data

    total = float(data.sum(dtype=np.float64))
    if all_in_vocab:
        in_vocab = total
        expressed = x > 0
        if expressed.all():  # the usual CSR: only non-zeros stored, every gene in the vocabulary
            expressed = slice(None)
        erow, eloc, ex = rows[expressed], X.indices[expressed], x[expressed]
    else:
        keep = in_vocab_gene[X.indices]
        in_vocab = float(data[keep].sum(dtype=np.float64))
        expressed = keep & (x > 0)
        vocab_local = (np.cumsum(in_vocab_gene) - 1).astype(np.int32)  # dataset gene -> vocabulary-local
        erow, eloc, ex = rows[expressed], vocab_local[X.indices[expressed]], x[expressed]
    n_pos = nnz_row if isinstance(expressed, slice) else np.bincount(erow, minlength=n).astype(np.int64)
    estart = np.concatenate([[0], np.cumsum(n_pos)])
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
        counts = np.where(is_raw[rows], data64, np.expm1(data64))
        library = np.bincount(rows, weights=counts, minlength=n)
        scale = np.divide(target_sum, library, out=np.zeros(n), where=library > 0)
        rank_value = np.log1p(counts[expressed] * scale[erow]).astype(np.float32)

    gene_ids = np.full((n, length), PAD_ID, dtype=np.int32)
    values = np.zeros((n, length), dtype=np.float32)
    gene_ids[:, 0] = CLS_ID
    width = int(n_pos.max()) if n else 0
    if width:
        # Rank each row: sort packed keys of a padded [n, width] array (padding = all ones sorts last).
        gene_bits, tie_bits = key_layout(n_vocab)
        eloc32 = eloc.view(np.uint32) if eloc.dtype == np.int32 else eloc.astype(np.uint32)
        # low word = tie_keys(...) << gene_bits | local gene, computed in place on one array
        low = gene_keys(seed, n_vocab).astype(np.uint32)[eloc32]
        low ^= cell_keys(seed, cells, _STREAM_TIES).astype(np.uint32)[erow]
        low *= _TIE_MULT
        low &= np.uint32((0xFFFFFFFF << gene_bits) & 0xFFFFFFFF)
        low |= eloc32
        ranked = np.full((n, width), _U64_MAX, dtype=np.uint64)
        words = ranked.view(np.uint32).reshape(n, width, 2)  # little-endian: [..., 0] low, [..., 1] high
        filled = np.arange(width) < n_pos[:, None]
        words[..., 1][filled] = np.invert(rank_value.view(np.uint32))  # 0xFFFFFFFF - value bits
        words[..., 0][filled] = low
        del low, filled
        ranked.sort(axis=1)
        W = min(width, L1)
        top = ranked[:, :W].view(np.uint32).reshape(n, W, 2)
        local_to_id = np.full(1 << gene_bits, PAD_ID, dtype=np.int32)
        local_to_id[:n_vocab] = vocab_ids
        gene_ids[:, 1 : 1 + W] = local_to_id[top[..., 0] & np.uint32((1 << gene_bits) - 1)]
        top_val = (_U32_MAX - top[..., 1]).view(np.float32)  # padding decodes to 0.0
        if method == "se":
            denom = np.where(row_sum32 > 0, row_sum32, np.float32(1))[:, None]
            values[:, 1 : 1 + W] = (top_val / denom) * np.float32(100)
        else:
            values[:, 1 : 1 + W] = top_val

    if method == "se":
        _se_fill(gene_ids, values, seed, cells, n_pos, estart, erow, eloc, ex, row_sum32, vocab_ids, L1)

    return TokenChunk(gene_ids, values, n_pos.astype(np.int32), total, in_vocab)


def _se_fill(gene_ids, values, seed, cells, n_pos, estart, erow, eloc, ex, row_sum32, vocab_ids, L1) -> None:
    """SE's filler genes and CLS-slot value, in place (weights float32: x / sum, as SE computes)."""
    n = len(cells)
    n_vocab = len(vocab_ids)
    if n_vocab == 0:
        return
    empty = row_sum32 <= 0  # SE uses softmax of all-zero x: uniform weights
    uniform = np.float32(1) / np.float32(n_vocab)

    # CLS value: 100 * w[vocabulary-local gene 3].
    if n_vocab > CLS_WEIGHT_LOCAL_INDEX:
        hit = eloc == CLS_WEIGHT_LOCAL_INDEX
        cls_w = np.zeros(n, dtype=np.float32)
        cls_w[erow[hit]] = ex[hit] / row_sum32[erow[hit]]
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
    # r-th unexpressed local gene = r + #{expressed e_j (ascending, j-th in its row) with e_j - j <= r}.
    span = n_vocab + 1
    # shifted_j = row * span + e_j - j_in_row: non-decreasing over the whole chunk.
    itype = np.int32 if (n + 1) * span + len(eloc) < 2**31 else np.int64
    row_base = (np.arange(n, dtype=np.int64) * span + estart[:-1]).astype(itype)
    shifted = eloc.astype(itype, copy=True)
    shifted -= np.arange(len(eloc), dtype=itype)
    shifted += row_base[erow]
    queries = (frow * span + r).astype(itype)
    order = np.argsort(queries, kind="stable")  # sorted queries keep the binary searches cache-local
    count = np.empty(total_need, dtype=np.int64)
    count[order] = np.searchsorted(shifted, queries[order], side="right")
    count -= estart[frow]
    filler_loc = r + count
    gene_ids[frow, 1 + n_pos[frow] + fslot] = vocab_ids[filler_loc]
    values[frow, 1 + n_pos[frow] + fslot] = np.where(empty[frow], uniform * np.float32(100), np.float32(0))


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


def coverage_row(name: str, match: GeneMatch, vocab: GeneVocab, total: float, in_vocab: float) -> dict[str, Any]:
    return {
        "dataset": name,
        "n_genes": match.n_genes,
        "n_genes_matched": match.n_matched,
        "fraction_genes_matched": round(match.gene_fraction, 6),
        "fraction_counts_covered": round(in_vocab / total, 6) if total > 0 else 0.0,
        "vocab_size": len(vocab),
    }


def check_coverage(row: dict[str, Any], min_coverage: float, match: GeneMatch, vocab: GeneVocab,
                   var_columns: dict[str, Sequence] | None = None) -> None:
    """Raise UserError when too few counts fall on vocabulary genes, saying why."""
    covered = row["fraction_counts_covered"]
    if match.n_matched == 0 or covered < min_coverage:
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
        chunk = tokenize_csr(adata.X[start:stop], match.local_to_global, length, method, seed, start, target_sum)
        gene_ids[start:stop], values[start:stop], n_expressed[start:stop] = chunk.gene_ids, chunk.values, chunk.n_expressed
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


class _CountsReader:
    """Rows [a:b] of an h5ad's X without loading obs/var (h5py + anndata's backed sparse
    dataset), so memory stays flat whatever the number of cells."""

    def __init__(self, path: str | os.PathLike):
        import anndata as ad
        import h5py

        self.file = h5py.File(path, "r")
        X = self.file["X"]
        self.X = ad.io.sparse_dataset(X) if isinstance(X, h5py.Group) else X
        self.n_obs = int(self.X.shape[0])

    def rows(self, start: int, stop: int):
        return self.X[start:stop]

    def close(self) -> None:
        self.file.close()


_WORKER: dict[str, Any] = {}


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed chunk buffers instead of returning them to the OS after every
    chunk: the page faults of fresh mappings otherwise cost about a third of the CPU time."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc maximum): chunk arrays from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc: the defaults only cost speed
        pass


def _worker_init(path: str) -> None:
    _keep_freed_memory()
    _WORKER["reader"] = _CountsReader(path)


def _worker_chunk(args) -> tuple[int, int, float, float]:
    """Tokenize rows [start, stop) of the worker's open h5ad and write them in place."""
    out_dir, offsets, start, stop, local_to_global, length, method, seed, target_sum = args
    chunk = tokenize_csr(_WORKER["reader"].rows(start, stop), local_to_global, length, method, seed, start, target_sum)
    _write_rows(out_dir, offsets, start, chunk)
    return start, stop, chunk.total, chunk.in_vocab


def _write_rows(out_dir: str | Path, offsets: dict[str, int], start: int, chunk: TokenChunk) -> None:
    """Write a chunk's rows at their place in each .npy (plain positional writes: no page
    faults of a writable mapping, nothing held in memory after the call)."""
    for name in _ARRAYS:
        arr = np.ascontiguousarray(getattr(chunk, name))
        row_bytes = arr.itemsize * (arr.shape[1] if arr.ndim == 2 else 1)
        fd = os.open(Path(out_dir) / f"{name}.npy", os.O_WRONLY)
        try:
            view, pos = memoryview(arr).cast("B"), offsets[name] + start * row_bytes
            while view:
                written = os.pwrite(fd, view, pos)
                view, pos = view[written:], pos + written
        finally:
            os.close(fd)


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

    The h5ad is read in backed mode, `chunk_size` cells at a time, so memory does not grow with
    the number of cells; `workers` > 1 tokenizes chunks in that many processes (same output).
    """
    if method not in METHODS:
        raise UserError(f"tokenize.method '{method}' is unknown; use one of {', '.join(METHODS)}")
    var = read_var(path)
    match = match_genes(var.index, vocab)
    var_columns = _string_columns(var)
    del var
    reader = _CountsReader(path)
    try:
        N = reader.n_obs
        if N == 0:
            raise UserError(f"{path} holds no cells; check the QC thresholds of dataset '{dataset}'")
        # Fail fast on a vocabulary mismatch, judged on the first chunk (kept and written below).
        first = tokenize_csr(reader.rows(0, min(chunk_size, N)), match.local_to_global, length, method, seed, 0, target_sum)
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
        _write_rows(tmp, offsets, 0, first)
        done = len(first.n_expressed)
        total, in_vocab = first.total, first.in_vocab
        del first
        jobs = [(str(tmp), offsets, s, min(s + chunk_size, N), match.local_to_global, length, method, seed, target_sum)
                for s in range(done, N, chunk_size)]
        t0 = last = time.perf_counter()
        if workers > 1:
            import multiprocessing as mp

            # fork: a rule script has no __main__ guard, so spawned children would re-run it.
            method_name = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method_name).Pool(workers, initializer=_worker_init, initargs=(str(path),)) as pool:
                for start, stop, t, v in pool.imap_unordered(_worker_chunk, jobs):
                    total, in_vocab, done = total + t, in_vocab + v, done + stop - start
                    last = _progress(done, N, t0, last)
        else:
            _worker_init(str(path))
            try:
                for job in jobs:
                    start, stop, t, v = _worker_chunk(job)
                    total, in_vocab, done = total + t, in_vocab + v, done + stop - start
                    last = _progress(done, N, t0, last)
            finally:
                _WORKER.pop("reader").close()
        row = coverage_row(dataset, match, vocab, total, in_vocab)
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
