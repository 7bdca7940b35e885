"""Xpressor's inputs: the cell table read from qc/filtered.h5ad and its tokens, the fit /
validation / test split, batches for training, and the frozen base's outputs (the tokens of the
layers read, run per batch or cached once for all cells).

Shapes: N = cells, L = sentence length (slot 0 = CLS), T = L - 1 gene tokens, d = base width,
G = decoded genes (the dataset's genes found in the vocabulary), K = base layers read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cellfoundry.cells import CellTable
from cellfoundry.progress import Progress
from cellfoundry.resumable import resumable_loader
from cellfoundry.utils import UserError, autocast

log = logging.getLogger(__name__)


@dataclass
class CellData:
    """Everything the stage reads for one dataset, row i = cell i of qc/filtered.h5ad.

    gene_ids [N, L] int32 and values [N, L] float32 (tokens, may be memmaps); counts [N, G] CSR
    raw counts of the decoded genes (None when read for encoding only); decode_genes [G]
    vocabulary indices; split [N] str;
    labels {column: codes [N] int64, -1 = missing}; label_classes {column: class names}.
    """

    gene_ids: np.ndarray
    values: np.ndarray
    counts: sp.csr_matrix | None
    decode_genes: np.ndarray
    gene_symbols: list[str]
    split: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    label_classes: dict[str, list[str]] = field(default_factory=dict)
    source: str | None = None  # SHA-256 of the h5ad the tokens were built from

    @property
    def n_cells(self) -> int:
        return int(self.gene_ids.shape[0])


def decode_targets(table: CellTable, vocab_index: dict[str, int]) -> tuple[sp.csr_matrix, np.ndarray, list[str]]:
    """Raw counts [N, G] of the dataset's genes present in the vocabulary, their vocabulary
    indices [G] and symbols."""
    keep = [i for i, g in enumerate(table.var_names) if g in vocab_index]
    if not keep:
        raise UserError(
            "none of the dataset's genes is in the gene vocabulary; check datasets.<name>.gene_symbols "
            "(gene symbols must match the vocabulary's symbols)."
        )
    symbols = [table.var_names[i] for i in keep]
    ids = np.array([vocab_index[s] for s in symbols], dtype=np.int64)
    # every gene in the vocabulary (the usual case): no column copy of the whole count matrix
    counts = table.counts if len(keep) == table.counts.shape[1] else table.counts[:, keep]
    return counts, ids, symbols


def load_cell_data(h5ad_path: str, tokens_path: str, vocab, label_columns: list[str], counts: bool = True) -> CellData:
    """Read qc/filtered.h5ad and the tokens written for it (checked against the vocabulary);
    without `counts`, no count matrix (encoding reads tokens only: flat memory in N)."""
    table = CellTable.read(h5ad_path, tokens_path, vocab_hash=vocab.hash, counts=counts)
    if counts:
        counts, ids, symbols = decode_targets(table, vocab.index)
    else:
        counts, ids, symbols = None, np.empty(0, dtype=np.int64), []
    labels, classes = table.labels(label_columns, config_key="xpressor.labels")
    return CellData(table.gene_ids, table.values, counts, ids, symbols, table.split, labels, classes, table.source)


def resolve_label_columns(labels: list[str], dataset: dict) -> list[str]:
    """Config xpressor.labels -> obs columns: the roles `cell_type` and `batch` name the
    dataset's configured column (skipped, and logged, when the dataset has none); anything else
    is an obs column name."""
    columns = []
    for name in labels:
        if name in ("cell_type", "batch"):
            if dataset.get(name):
                columns.append(dataset[name])
            else:
                log.warning("xpressor.labels role %r resolves to nothing: the dataset sets no %s column", name, name)
        else:
            columns.append(name)
    if not columns:
        log.warning("training without label tokens (no label columns); X_xpressor is the mean of the latent tokens")
    return list(dict.fromkeys(columns))


def split_indices(
    split: np.ndarray, val_fraction: float, seed: int, eval_max_cells: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, validation, test) cell indices: validation is a seeded fraction of the train split
    used for early stopping; the test split is never seen in training. Validation and test cells
    are each capped at `eval_max_cells` (a seeded subset of the test split): every one of them is
    decoded over all genes, which at 10^5 cells costs more than the training itself."""
    train = np.flatnonzero(split == "train")
    test = np.flatnonzero(split == "test")
    if len(train) < 2:
        raise UserError("fewer than 2 cells in the train split; lower qc.test_fraction or add cells.")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(train)
    n_val = max(1, int(round(val_fraction * len(train))))
    if eval_max_cells is not None:
        n_val = min(n_val, eval_max_cells)
        if len(test) > eval_max_cells:
            test = rng.choice(test, eval_max_cells, replace=False)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val]), np.sort(test)


class CellBatches(Dataset):
    """Cells `indices` of `data`; items carry the token inputs (or cached base features),
    dense target counts [G], library size and label codes."""

    def __init__(self, data: CellData, indices: np.ndarray, cache: BaseCache | None = None):
        self.data, self.indices, self.cache = data, np.asarray(indices), cache

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i])
        counts = torch.from_numpy(self.data.counts[row].toarray()[0])
        item: dict[str, Any] = {"row": row, "counts": counts, "library": counts.sum()}
        if self.cache is not None:
            item["tokens"] = self.cache.tokens[row].float()
            item["mask"] = self.cache.mask[row]
            item["cls"] = self.cache.cls[row]
        else:
            item["gene_ids"] = torch.from_numpy(np.array(self.data.gene_ids[row], dtype=np.int64))
            item["values"] = torch.from_numpy(np.array(self.data.values[row], dtype=np.float32))
        item["labels"] = {k: int(v[row]) for k, v in self.data.labels.items()}
        return item


def collate(items: list[dict]) -> dict[str, Any]:
    """Stack the items of CellBatches into one batch (label codes per column)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        if key == "labels":
            out[key] = {k: torch.tensor([it[key][k] for it in items]) for k in items[0][key]}
        elif key == "row":
            out[key] = torch.tensor([it[key] for it in items])
        else:
            out[key] = torch.stack([it[key] for it in items])
    return out


def cell_loader(data: CellData, idx: np.ndarray, cache: BaseCache | None, batch_size: int) -> DataLoader:
    """Cells `idx` in order (validation, held-out measurement; Lightning shards it under DDP)."""
    return DataLoader(CellBatches(data, idx, cache), batch_size=batch_size, shuffle=False, collate_fn=collate)


class XpressorDataModule(pl.LightningDataModule):
    """The cells of one training: a seeded `val_fraction` of the train split validates (early
    stopping), the rest trains in a shuffled order that cellfoundry.trainer.fit resumes exactly;
    the test split is never seen. Its hyperparameters identify the data of a resumable run."""

    def __init__(
        self,
        data: CellData,
        cache: BaseCache | None,
        batch_size: int,
        val_fraction: float,
        eval_max_cells: int | None,
        seed: int,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["data", "cache"])
        self.hparams.update(n_cells=data.n_cells, source=data.source)
        self.data, self.cache = data, cache
        self.fit_idx, self.val_idx, _ = split_indices(data.split, val_fraction, seed, eval_max_cells)
        self.train_loader = resumable_loader(
            CellBatches(data, self.fit_idx, cache), batch_size, seed, collate_fn=collate
        )

    def train_dataloader(self) -> DataLoader:
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        return cell_loader(self.data, self.val_idx, self.cache, self.hparams.batch_size)


# -- base model outputs ---------------------------------------------------------------------------
@dataclass
class BaseCache:
    """Frozen base outputs of every cell: gene tokens of the K layers read [N, K, T, d], padding
    mask [N, T], CLS of the last layer [N, d]."""

    tokens: Tensor
    mask: Tensor
    cls: Tensor


def resolve_layers(layers: list[int], n_layers: int) -> list[int]:
    """Config xpressor.base_layers -> indices in 0..n_layers (0 = the input token vectors after the
    count encoding, i = output of transformer layer i, negative = counted from the last)."""
    out = []
    for i in layers:
        j = i + n_layers + 1 if i < 0 else i
        if not 0 <= j <= n_layers:
            raise UserError(
                f"xpressor.base_layers holds {i}, but the base model has {n_layers} layers; use 0 (input tokens) "
                f"to {n_layers}, or -1 to -{n_layers + 1} counted from the last."
            )
        out.append(j)
    if len(set(out)) < len(out):
        raise UserError(f"xpressor.base_layers {layers} names a layer twice (resolved: {out}); list each layer once.")
    return out


def base_layer_outputs(
    base: nn.Module, gene_ids: Tensor, values: Tensor, gene_table: Tensor, layers: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the base and keep the token states of `layers` (resolved indices): ([B, K, L+1, d],
    final outputs [B, L+1, d], key-padding mask [B, L+1]). Only the last layer alone needs no
    access to the base's inner layers."""
    layers = resolve_layers(list(layers), base.cfg.nlayers)
    if layers == [base.cfg.nlayers]:
        outputs, padding = base.encode(gene_ids, values, gene_table)
        return outputs.unsqueeze(1), outputs, padding
    h, padding = base.token_inputs(gene_ids, values, gene_table)
    attn_mask = (~padding)[:, None, None, :] if padding.any() else None
    kept = [h] if 0 in layers else []
    for i, layer in enumerate(base.transformer_encoder.layers, start=1):
        h = layer(h, attn_mask)
        if i in layers:
            kept.append(h)
    return torch.stack(kept, dim=1), h, padding


def split_outputs(stack: Tensor, outputs: Tensor, padding: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Layer states [B, K, L+1, d], final outputs [B, L+1, d], mask [B, L+1] -> gene tokens
    [B, K, T, d], their mask [B, T], CLS of the last layer [B, d]. Position 0 is CLS and the last
    is the dataset token; both are left out of the gene tokens."""
    return stack[:, :, 1:-1], padding[:, 1:-1], outputs[:, 0]


@torch.inference_mode()
def base_batches(
    base: nn.Module, gene_table: Tensor, data: CellData, batch_size: int, device: str, layers: list[int] = (-1,)
) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor]]:
    """The frozen base over every cell's tokens (memmapped, read batch by batch), inference mode:
    yields (lo, hi, layer states [n, K, L+1, d], final outputs [n, L+1, d], padding [n, L+1])."""
    base = base.to(device).eval()
    table = gene_table.to(device)
    for lo in range(0, data.n_cells, batch_size):
        hi = min(data.n_cells, lo + batch_size)
        ids = torch.from_numpy(np.array(data.gene_ids[lo:hi], dtype=np.int64)).to(device)
        vals = torch.from_numpy(np.array(data.values[lo:hi], dtype=np.float32)).to(device)
        with autocast(device):
            stack, outputs, padding = base_layer_outputs(base, ids, vals, table, layers)
        yield lo, hi, stack, outputs, padding


@torch.inference_mode()
def compute_base_cache(
    base: nn.Module, gene_table: Tensor, data: CellData, batch_size: int, device: str, layers: list[int] = (-1,)
) -> BaseCache:
    """Run the frozen base once over all cells (inference mode), logging progress."""
    tokens, masks, cls = [], [], []
    progress = Progress(data.n_cells, verb="ran the SE model on")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for lo, hi, stack, outputs, padding in base_batches(base, gene_table, data, batch_size, device, layers):
        t, m, c = split_outputs(stack, outputs, padding)
        tokens.append(t.to(dtype).cpu())
        masks.append(m.cpu())
        cls.append(c.float().cpu())
        progress.update(hi - lo)
    return BaseCache(torch.cat(tokens), torch.cat(masks), torch.cat(cls))


def cache_bytes(data: CellData, d_base: int, device: str, n_layers: int = 1) -> int:
    """Memory the base cache of `data` would take (K = n_layers layers read)."""
    per = 2 if device.startswith("cuda") else 4
    return data.n_cells * (data.gene_ids.shape[1] - 1) * (n_layers * d_base * per + 1)
