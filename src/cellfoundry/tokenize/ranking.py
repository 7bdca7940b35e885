"""The top-gene ranking of one chunk of cells: each cell becomes a "cell sentence" of L slots.

Slot 0 is the CLS slot (gene id CLS_ID); slots 1..L-1 hold global vocabulary ids of the cell's
top expressed genes in rank order (expression descending), with a value per slot.

Methods (the rules of SE-600M's cell sentence):

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
found with one searchsorted per block of cells.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cellfoundry.utils import UserError

CLS_ID = -2
PAD_ID = -1
METHODS = ("se", "topk")

# SE-600M's raw-count detection and CLS-slot quirk.
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


def as_csr(X) -> sp.csr_matrix:
    """X as a CSR matrix with sorted indices (X itself when it is one already)."""
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
    X = as_csr(X)
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
        if (
            gene_ids.shape != (n, length)
            or values.shape != (n, length)
            or gene_ids.dtype != np.int32
            or values.dtype != np.float32
            or not (gene_ids.flags.c_contiguous and values.flags.c_contiguous)
        ):
            raise ValueError(f"out must be C-contiguous int32 and float32 arrays of shape ({n}, {length})")
    width = int(n_pos.max()) if n else 0
    if width:
        _rank_rows(
            gene_ids,
            values,
            eloc,
            rank_value,
            n_pos,
            width,
            n_vocab,
            vocab_ids,
            seed,
            cells,
            row_sum32 if method == "se" else None,
        )
    else:
        gene_ids.fill(PAD_ID)
        values.fill(0)
    gene_ids[:, 0] = CLS_ID
    values[:, 0] = 0

    if method == "se":
        _se_fill(gene_ids, values, seed, cells, n_pos, estart, eloc, ex, row_sum32, vocab_ids, L1)

    return TokenChunk(gene_ids, values, n_pos.astype(np.int32), total, in_vocab)


def _rank_rows(gene_ids, values, eloc, rank_value, n_pos, width, n_vocab, vocab_ids, seed, cells, row_sum32) -> None:
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
