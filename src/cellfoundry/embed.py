"""Batched, streaming SE inference: token rows -> cell embeddings on disk.

Embeddings are written batch by batch into an on-disk array (a .npy memmap for a shard, the
`obsm/X_state` dataset of the output .h5ad otherwise), so memory does not grow with the number
of cells N. On CUDA the model runs under bf16 autocast with SDPA (flash) attention; on the CPU in
fp32. Every path runs under torch.inference_mode with dropout off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from cellfoundry.models.se import StateEmbedding
from cellfoundry.progress import Progress
from cellfoundry.utils import UserError, atomic_output

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


def autocast_context(device: str):
    """bf16 autocast on CUDA, nothing (fp32) on the CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    with torch.inference_mode(), autocast_context(device):
        for begin in range(0, len(rows), batch_size):
            idx = rows[begin : begin + batch_size]
            sl = slice(idx[0], idx[-1] + 1) if isinstance(idx, range) else np.asarray(idx)
            # np.array copies: memmapped token files are read-only
            ids = torch.from_numpy(np.array(gene_ids[sl], dtype=np.int64)).to(device, non_blocking=True)
            counts = torch.from_numpy(np.array(values[sl], dtype=np.float32)).to(device, non_blocking=True)
            emb = model(ids, counts, table).float().cpu().numpy()
            progress.update(len(emb))
            yield emb


def _read_obs(h5ad_path: str | os.PathLike) -> pd.DataFrame:
    """obs of an .h5ad without reading X."""
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
            dset = f["obsm"].create_dataset(key, shape=(n, dim), dtype="float32", chunks=(min(n, 4096), dim) if n else None)
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


def read_obs(h5ad_path: str | os.PathLike) -> pd.DataFrame:
    """Public wrapper: the cells' obs from an .h5ad (X is not read)."""
    return _read_obs(h5ad_path)


def knn_accuracy(X: np.ndarray, labels: Sequence, n_neighbors: int = 15, folds: int = 5, seed: int = 0) -> float:
    """Mean k-fold (stratified) accuracy of a kNN classifier predicting `labels` from `X`."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray([str(v) for v in labels])
    # tiny data: no more folds than the largest class has cells (scikit-learn's requirement)
    folds = max(2, min(folds, int(np.unique(labels, return_counts=True)[1].max())))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    clf = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(X) - len(X) // folds - 1))
    return float(cross_val_score(clf, np.asarray(X, dtype=np.float32), labels, cv=cv).mean())


def pca_baseline(counts, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """PCA of normalised log1p counts (scanpy's standard recipe) -> [N, n_components]."""
    import scanpy as sc

    adata = ad.AnnData(X=counts.astype(np.float32))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_components = int(min(n_components, adata.n_obs - 1, adata.n_vars - 1))
    sc.pp.pca(adata, n_comps=n_components, random_state=seed)
    return np.asarray(adata.obsm["X_pca"])


# ---------------------------------------------------------------------------- workflow entry points

#: Tokenization method that produces the sentences each SE encoding expects.
METHOD_FOR_ENCODING = {"se": "se", "scaled": "topk"}


def check_tokens_match_model(method: str, encoding: str, tokens_dir: str | os.PathLike) -> None:
    """Raise UserError when the tokens were built for the other encoding."""
    wanted = METHOD_FOR_ENCODING[encoding]
    if method != wanted:
        raise UserError(
            f"tokens in {tokens_dir} use method {method!r} but the SE model uses encoding {encoding!r}, "
            f"which needs method {wanted!r}; set tokenize.method: {wanted} (or se.encoding to match) and re-run."
        )


def embed_provenance(ckpt, vocab_path, cells_h5ad, tokens_dir=None, config: dict | None = None) -> dict:
    """uns of an embedding .h5ad: the provenance record of the embed stage."""
    from cellfoundry.provenance import KEY, provenance

    record = provenance("embed", config, checkpoints={"se": ckpt}, vocab=vocab_path, inputs={"cells": cells_h5ad, "tokens": tokens_dir})
    return {KEY: record}


def run_embedding(
    ckpt: str | os.PathLike,
    vocab_path: str | os.PathLike,
    tokens_dir: str | os.PathLike,
    cells_h5ad: str | os.PathLike,
    out_path: str | os.PathLike,
    batch_size: int = 64,
    device: str = "cpu",
    shards: int = 1,
    shard: int | None = None,
    allow_unsafe_pickle: bool = False,
    config: dict | None = None,
) -> None:
    """Embed a dataset's tokens with the SE checkpoint `ckpt`.

    shard None: write `out_path` as .h5ad (obs of `cells_h5ad`, obsm["X_state"], its provenance
    with `config`, the stage's config section, in uns); else write shard `shard` of `shards`
    (0-based) as a float32 .npy for embed_gather."""
    from cellfoundry.models.se_checkpoint import load_se
    from cellfoundry.tokenize import read_tokens

    model, cfg, vocab = load_se(ckpt, gene_embeddings=vocab_path, allow_unsafe_pickle=allow_unsafe_pickle)
    tokens = read_tokens(tokens_dir, vocab_hash=vocab.hash)
    check_tokens_match_model(tokens.attrs.get("method", "se"), cfg.encoding, tokens_dir)
    log.info("embedding %d cells (L=%d) on %s, batch size %d", len(tokens), tokens.attrs["L"], device, batch_size)
    if shard is None:
        uns = embed_provenance(ckpt, vocab_path, cells_h5ad, tokens_dir, config)
        embed_to_h5ad(model, tokens.gene_ids, tokens.values, vocab.table, read_obs(cells_h5ad), out_path, batch_size, device, uns=uns)
    else:
        rows = shard_rows(len(tokens), shards, shard, align=batch_size)
        log.info("shard %d/%d: cells %d..%d", shard + 1, shards, rows.start, rows.stop)
        embed_shard_to_npy(model, tokens.gene_ids, tokens.values, vocab.table, rows, out_path, batch_size, device)


def _read_embedding(path: str | os.PathLike, key: str, rows: np.ndarray) -> np.ndarray:
    with h5py.File(path, "r") as f:
        dset = f["obsm"][key]
        selection = slice(None) if len(rows) == dset.shape[0] else np.sort(rows)
        return np.asarray(dset[selection], dtype=np.float32)


def report_rows(n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """Rows entering the report: all cells, or a seeded sorted subsample of `max_cells`."""
    if n_cells <= max_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, max_cells, replace=False))


def knn_report(
    embeddings: dict[str, str],
    cells_h5ad: str | os.PathLike,
    out_json: str | os.PathLike,
    label: str | None,
    knn_neighbors: int = 15,
    pca_components: int = 50,
    max_cells: int = 20000,
    seed: int = 0,
    key: str = EMBED_KEY,
) -> dict:
    """kNN accuracy (stratified 5-fold) of predicting obs[label] from each embedding, beside PCA
    of the normalised log1p counts; written as JSON. At most `max_cells` cells (seeded subsample).
    Unlabelled cells (NaN / empty label) are left out and counted ("n_unlabelled"); without labels
    the JSON says why the accuracy was skipped ("skipped")."""
    import json

    from cellfoundry.evaluate.embedding import label_skip_reason
    from cellfoundry.utils import unlabelled

    cells = ad.read_h5ad(cells_h5ad, backed="r")
    rows = report_rows(cells.n_obs, max_cells, seed)
    result: dict = {"label": label, "n_cells": int(len(rows)), "k": knn_neighbors, "folds": 5, "accuracy": {}}
    if label is not None and label not in cells.obs:
        raise UserError(f"obs of {cells_h5ad} has no column {label!r}; fix datasets.<name>.cell_type.")
    y = cells.obs[label].iloc[rows].to_numpy(dtype=object) if label is not None else None
    result["n_unlabelled"] = int(unlabelled(y).sum()) if y is not None else int(len(rows))
    reason = label_skip_reason(y)
    if reason:
        result["skipped"] = f"kNN label accuracy: {reason}"
        log.warning("kNN label accuracy skipped: %s", reason)
    else:
        keep = ~unlabelled(y)
        y = y[keep].astype(str)
        for name, path in embeddings.items():
            result["accuracy"][name] = knn_accuracy(_read_embedding(path, key, rows)[keep], y, knn_neighbors, seed=seed)
        counts = cells.X[rows] if len(rows) < cells.n_obs else cells.to_memory().X
        X_pca = pca_baseline(counts, pca_components, seed)
        result["accuracy"][f"pca{X_pca.shape[1]}"] = knn_accuracy(X_pca[keep], y, knn_neighbors, seed=seed)
        log.info("kNN accuracy on %s: %s", label, ", ".join(f"{k} {v:.3f}" for k, v in result["accuracy"].items()))
    with atomic_output(out_json) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


def umap_plot(
    embedding_h5ad: str | os.PathLike,
    out_png: str | os.PathLike,
    labels: Sequence[str],
    max_cells: int = 20000,
    seed: int = 0,
    key: str = EMBED_KEY,
) -> None:
    """UMAP of obsm[key] coloured by each obs column in `labels` (one panel each)."""
    from cellfoundry import plots

    obs = _read_obs(embedding_h5ad)
    rows = report_rows(len(obs), max_cells, seed)
    missing = [c for c in labels if c not in obs]
    if missing:
        raise UserError(f"obs of {embedding_h5ad} has no column {missing[0]!r}; fix datasets.<name>.cell_type / batch.")
    colour_by = {c: obs[c].iloc[rows].astype(str).to_numpy() for c in labels} or {"cells": np.full(len(rows), "cell")}
    X = _read_embedding(embedding_h5ad, key, rows)
    plots.umap_scatter(out_png, X, colour_by, seed=seed, title=f"{Path(embedding_h5ad).stem} embedding ({key})")
