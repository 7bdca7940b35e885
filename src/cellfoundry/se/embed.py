"""Batched, streaming SE inference: token rows -> cell embeddings on disk.

Embeddings are written batch by batch into an on-disk array (a .npy memmap for a shard, the
`obsm/X_state` dataset of the output .h5ad otherwise), so memory does not grow with the number
of cells N. On CUDA the model runs under bf16 autocast with SDPA (flash) attention; on the CPU in
fp32. Every path runs under torch.inference_mode with dropout off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from cellfoundry.models.se import StateEmbedding
from cellfoundry.progress import Progress
from cellfoundry.utils import UserError, atomic_output, autocast

log = logging.getLogger(__name__)

EMBED_KEY = "X_state"


def shard_rows(n_cells: int, shards: int, shard: int, align: int = 1) -> range:
    """Rows [start, stop) of shard `shard` (0-based) when N cells are split into `shards` parts.

    Boundaries fall on multiples of `align` (the batch size), so every shard sees exactly the
    batches the unsharded run sees and the gathered embeddings are bitwise identical to it."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} outside 0..{shards - 1}")
    n_blocks = -(-n_cells // align)
    bounds = [min(n_cells, align * round(n_blocks * i / shards)) for i in range(shards + 1)]
    return range(bounds[shard], bounds[shard + 1])


def iter_embeddings(
    model: StateEmbedding,
    gene_ids: np.ndarray,
    values: np.ndarray,
    gene_table: torch.Tensor,
    rows: Sequence[int] | range | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress_every_s: float = 30.0,
    progress: Progress | None = None,
) -> Iterator[np.ndarray]:
    """Yield float32 cell embeddings [b, output_dim + 10] for `rows` of the token arrays
    (gene_ids int [N, L], values float [N, L], both may be memmaps), batch by batch, in order.
    Progress is logged through `progress` (shared by a caller that embeds in several calls), by
    default a Progress over these rows."""
    rows = range(len(gene_ids)) if rows is None else rows
    progress = progress or Progress(len(rows), progress_every_s)
    model = model.to(device).eval()
    table = gene_table.to(device=device, dtype=torch.float32)
    with torch.inference_mode(), autocast(device):
        for begin in range(0, len(rows), batch_size):
            idx = rows[begin : begin + batch_size]
            sl = slice(idx[0], idx[-1] + 1) if isinstance(idx, range) else np.asarray(idx)
            # np.array copies: memmapped token files are read-only
            ids = torch.from_numpy(np.array(gene_ids[sl], dtype=np.int64)).to(device, non_blocking=True)
            counts = torch.from_numpy(np.array(values[sl], dtype=np.float32)).to(device, non_blocking=True)
            emb = model(ids, counts, table).float().cpu().numpy()
            progress.update(len(emb))
            yield emb


def read_obs(h5ad_path: str | os.PathLike) -> pd.DataFrame:
    """The cells' obs from an .h5ad (X is not read)."""
    with h5py.File(h5ad_path, "r") as f:
        return ad.io.read_elem(f["obs"])


def write_embedding_h5ad(
    path: str | os.PathLike,
    obs: pd.DataFrame,
    chunks: Iterable[np.ndarray],
    dim: int,
    key: str = EMBED_KEY,
    uns: dict | None = None,
    var: pd.DataFrame | None = None,
) -> None:
    """Write an .h5ad with `obs` (N rows), optional `var`, no X, and obsm[key] [N, dim] float32
    filled from `chunks` in order; written atomically, memory bounded by one chunk."""
    n = len(obs)
    with atomic_output(path) as tmp:
        adata = ad.AnnData(obs=obs.copy(), var=var, uns=uns or {})
        adata.write_h5ad(tmp)
        with h5py.File(tmp, "a") as f:
            # h5py refuses a chunk larger than an empty dataset
            dset = f["obsm"].create_dataset(
                key, shape=(n, dim), dtype="float32", chunks=(min(n, 4096), dim) if n else None
            )
            dset.attrs["encoding-type"] = "array"
            dset.attrs["encoding-version"] = "0.2.0"
            pos = 0
            for chunk in chunks:
                dset[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
        if pos != n:
            raise RuntimeError(f"wrote {pos} embeddings for {n} cells")


def embed_to_h5ad(
    model: StateEmbedding,
    gene_ids: np.ndarray,
    values: np.ndarray,
    gene_table: torch.Tensor,
    obs: pd.DataFrame,
    out_path: str | os.PathLike,
    batch_size: int = 64,
    device: str = "cpu",
    key: str = EMBED_KEY,
    uns: dict | None = None,
) -> None:
    """Embed every token row and write `out_path` (.h5ad with obs and obsm[key])."""
    if len(obs) != len(gene_ids):
        raise UserError(f"{len(gene_ids)} token rows but {len(obs)} cells; re-run tokenize for this dataset.")
    chunks = iter_embeddings(model, gene_ids, values, gene_table, batch_size=batch_size, device=device)
    write_embedding_h5ad(out_path, obs, chunks, model.cfg.embedding_dim, key=key, uns=uns)


def embed_shard_to_npy(
    model: StateEmbedding,
    gene_ids: np.ndarray,
    values: np.ndarray,
    gene_table: torch.Tensor,
    rows: range,
    out_path: str | os.PathLike,
    batch_size: int = 64,
    device: str = "cpu",
) -> None:
    """Embed the token rows `rows` into a float32 .npy [len(rows), output_dim + 10] (memmapped)."""
    with atomic_output(out_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), model.cfg.embedding_dim))
        pos = 0
        for emb in iter_embeddings(model, gene_ids, values, gene_table, rows, batch_size, device):
            out[pos : pos + len(emb)] = emb
            pos += len(emb)
        out.flush()
        del out


def gather_shards(
    shard_paths: Sequence[str | os.PathLike],
    obs: pd.DataFrame,
    out_path: str | os.PathLike,
    key: str = EMBED_KEY,
    uns: dict | None = None,
    rows_per_chunk: int = 65536,
) -> None:
    """Concatenate shard .npy files (in shard order) into the output .h5ad, streaming."""
    parts = [np.load(p, mmap_mode="r") for p in shard_paths]
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        raise RuntimeError(f"shards have different widths {sorted(dims)}")
    if sum(len(p) for p in parts) != len(obs):
        raise RuntimeError(f"shards hold {sum(len(p) for p in parts)} rows for {len(obs)} cells")

    def chunks():
        for part in parts:
            for begin in range(0, len(part), rows_per_chunk):
                yield np.asarray(part[begin : begin + rows_per_chunk])

    write_embedding_h5ad(out_path, obs, chunks(), dims.pop(), key=key, uns=uns)


def embed_provenance(se_checkpoint, vocab, h5ad, tokens=None, config: dict | None = None) -> dict:
    """uns of an embedding .h5ad: the provenance record of the embed stage."""
    from cellfoundry.provenance import KEY, provenance

    record = provenance(
        "embed", config, checkpoints={"se": se_checkpoint}, vocab=vocab, inputs={"cells": h5ad, "tokens": tokens}
    )
    return {KEY: record}


def read_embedding_rows(path: str | os.PathLike, rows: np.ndarray, key: str = EMBED_KEY) -> np.ndarray:
    """obsm[key] of the embedding .h5ad at `path`, rows `rows` (all rows: no selection), float32."""
    with h5py.File(path, "r") as f:
        dset = f["obsm"][key]
        selection = slice(None) if len(rows) == dset.shape[0] else np.sort(rows)
        return np.asarray(dset[selection], dtype=np.float32)


def report_rows(n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """Rows entering the report: all cells, or a seeded sorted subsample of `max_cells`."""
    if n_cells <= max_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, max_cells, replace=False))
