"""Tokenizing whole datasets: an in-memory AnnData (tokenize_anndata), or an h5ad out of core
(tokenize_h5ad), which reads a chunk of X with h5py, tokenizes it in blocks of _BLOCK_CELLS cells
into reused buffers, and writes the rows in place (O_DIRECT where possible, see DIRECT_IO), in one
process or several; benchmarks/bench_tokenize.py measures it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellfoundry.genes import mapped_genes
from cellfoundry.progress import Progress
from cellfoundry.tokenize.coverage import check_coverage, coverage_row, string_columns
from cellfoundry.tokenize.ranking import METHODS, TokenChunk, as_csr, tokenize_csr
from cellfoundry.tokenize.store import ARRAYS, Tokens, token_attrs, write_tsv
from cellfoundry.utils import UserError, atomic_output
from cellfoundry.vocab import GeneVocab, match_genes, read_var

log = logging.getLogger(__name__)


def tokenize_anndata(
    adata,
    vocab: GeneVocab,
    length: int,
    method: str = "se",
    seed: int = 0,
    chunk_size: int = 1024,
    target_sum: float = 1e4,
    min_coverage: float = 0.0,
    name: str = "input",
) -> Tokens:
    """Tokenize an in-memory AnnData (X over var_names as gene symbols); returns in-memory Tokens."""
    match = match_genes(adata.var_names, vocab)
    N = adata.n_obs
    gene_ids = np.empty((N, length), dtype=np.int32)
    values = np.empty((N, length), dtype=np.float32)
    n_expressed = np.empty(N, dtype=np.int32)
    total = in_vocab = 0.0
    for start in range(0, N, chunk_size):
        stop = min(start + chunk_size, N)
        chunk = tokenize_csr(
            adata.X[start:stop],
            match.local_to_global,
            length,
            method,
            seed,
            start,
            target_sum,
            out=(gene_ids[start:stop], values[start:stop]),
        )
        n_expressed[start:stop] = chunk.n_expressed
        total += chunk.total
        in_vocab += chunk.in_vocab
    row = coverage_row(name, match, vocab, total, in_vocab)
    check_coverage(row, min_coverage, match, vocab, string_columns(adata.var))
    attrs = token_attrs(vocab, length, method, seed, None, N, target_sum)
    return Tokens(gene_ids, values, n_expressed, attrs)


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
        paths = {name: Path(out_dir) / f"{name}.npy" for name in ARRAYS}
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
        for name in ARRAYS:
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
    chunk = _tokenize_rows(
        reader.rows(start, stop),
        start,
        local_to_global,
        length,
        method,
        seed,
        target_sum,
        out=writer.buffers(start, stop - start),
    )
    writer.write(start, chunk)
    return start, stop, chunk.total, chunk.in_vocab


def _tokenize_rows(X, start, local_to_global, length, method, seed, target_sum, out=None) -> TokenChunk:
    """tokenize_csr of a chunk read whole, _BLOCK_CELLS rows at a time (the temporaries of a block
    stay small and warm in cache; the tokens do not depend on it), into `out` if given."""
    X = as_csr(X)
    n = X.shape[0]
    if out is None:
        out = np.empty((n, length), dtype=np.int32), np.empty((n, length), dtype=np.float32)
    gene_ids, values = out
    n_expressed = np.empty(n, dtype=np.int32)
    total = in_vocab = 0.0
    for a in range(0, n, _BLOCK_CELLS):
        b = min(a + _BLOCK_CELLS, n)
        block = tokenize_csr(
            _csr_rows(X, a, b),
            local_to_global,
            length,
            method,
            seed,
            start + a,
            target_sum,
            out=(gene_ids[a:b], values[a:b]),
        )
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
        return _tokenize_h5ad(
            path,
            out_dir,
            vocab,
            length,
            method,
            seed,
            chunk_size,
            workers,
            min_coverage,
            target_sum,
            dataset,
            source_hash,
        )
    finally:
        _keep_freed_memory(False)


def _tokenize_h5ad(
    path, out_dir, vocab, length, method, seed, chunk_size, workers, min_coverage, target_sum, dataset, source_hash
) -> dict[str, Any]:
    var_names = _var_names(path)
    if var_names is None:  # another layout of var: anndata reads it
        var = read_var(path)
        var_names, columns = var.index, string_columns(var)
        del var
        var_columns = lambda: columns  # noqa: E731
    else:  # the other var columns only matter to explain a poor match
        var_columns = lambda: string_columns(read_var(path))  # noqa: E731
    match = match_genes(var_names, vocab)
    del var_names
    reader = _CountsReader(path)
    try:
        N = reader.n_obs
        if N == 0:
            raise UserError(f"{path} holds no cells; check the QC thresholds of dataset '{dataset}'")
        progress = Progress(N, every_s=10, verb="tokenized")
        # Fail fast on a vocabulary mismatch, judged on the first chunk (kept and written below).
        first = _tokenize_rows(
            reader.rows(0, min(chunk_size, N)), 0, match.local_to_global, length, method, seed, target_sum
        )
    finally:
        reader.close()
    check_coverage(
        coverage_row(dataset, match, vocab, first.total, first.in_vocab), min_coverage, match, vocab, var_columns
    )
    log.info(
        "dataset %s: %d of %d genes in the vocabulary (%d genes); %d cells, L = %d, method %s, %d worker(s)",
        dataset,
        match.n_matched,
        match.n_genes,
        len(vocab),
        N,
        length,
        method,
        workers,
    )

    out_dir = Path(out_dir)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        offsets = {}
        for name, dtype, shape in (
            ("gene_ids", np.int32, (N, length)),
            ("values", np.float32, (N, length)),
            ("n_expressed", np.int32, (N,)),
        ):
            mm = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            offsets[name] = mm.offset
            del mm
        total, in_vocab = first.total, first.in_vocab
        jobs = [
            (s, min(s + chunk_size, N), match.local_to_global, length, method, seed, target_sum)
            for s in range(len(first.n_expressed), N, chunk_size)
        ]
        progress.update(len(first.n_expressed))
        init_args = (str(path), str(tmp), offsets, length)
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
                    total, in_vocab = total + t, in_vocab + v
                    progress.update(stop - start)
        else:
            _worker_init(*init_args)
            try:
                _WORKER["writer"].write(0, first)
                del first
                for job in jobs:
                    start, stop, t, v = _worker_chunk(job)
                    total, in_vocab = total + t, in_vocab + v
                    progress.update(stop - start)
            finally:
                _worker_close()
        row = coverage_row(dataset, match, vocab, total, in_vocab, mapped_genes(path))
        check_coverage(row, min_coverage, match, vocab, var_columns)
        write_tsv(tmp / "coverage.tsv", [row])
        attrs = token_attrs(vocab, length, method, seed, source_hash, N, target_sum)
        (tmp / "attrs.json").write_text(json.dumps(attrs, indent=2) + "\n")
    log.info(
        "dataset %s: %d of %d genes matched, %.1f%% of counts covered; tokens in %s",
        dataset,
        row["n_genes_matched"],
        row["n_genes"],
        100 * row["fraction_counts_covered"],
        out_dir,
    )
    return row
