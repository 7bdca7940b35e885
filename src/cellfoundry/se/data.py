"""SE pretraining data: the training cells of one or more datasets, their seeded loader, and the
per-batch draws of the objective (task genes, sentence subsets).

Shapes: B cells, L sentence length, G genes of the union of the datasets' vocabulary genes.
"""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cellfoundry.cells import CellTable
from cellfoundry.resumable import resumable_loader
from cellfoundry.utils import UserError

log = logging.getLogger(__name__)

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


class PretrainCells(Dataset):
    """Training cells of one or more datasets.

    Per dataset: token arrays (gene_ids [n, L], values [n, L], memmaps are fine), raw counts CSR
    [n, g] and the vocabulary id of each count column (-1 = not in the vocabulary). Expression
    targets live on the union `gene_cols` of the datasets' vocabulary genes.
    """

    def __init__(self, parts: list[dict]):
        cols = np.unique(np.concatenate([p["gene_vocab_ids"][p["gene_vocab_ids"] >= 0] for p in parts]))
        self.gene_cols = cols.astype(np.int64)
        position = {int(g): i for i, g in enumerate(self.gene_cols)}
        self.parts, self.index = [], []
        for ds, p in enumerate(parts):
            keep = np.flatnonzero(p["gene_vocab_ids"] >= 0)
            counts = sp.csr_matrix(p["counts"])
            depth = np.log1p(np.asarray(counts.sum(axis=1)).ravel()).astype(np.float32)
            counts = counts[:, keep].astype(np.float32)
            counts.data = np.log1p(counts.data)
            target_cols = np.array([position[int(g)] for g in p["gene_vocab_ids"][keep]], dtype=np.int64)
            measured = np.zeros(len(self.gene_cols), dtype=bool)
            measured[target_cols] = True
            self.parts.append(dict(p, expr=counts, target_cols=target_cols, measured=measured, depth=depth))
            self.index += [(ds, int(r)) for r in p["rows"]]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        ds, row = self.index[i]
        p = self.parts[ds]
        expr = np.zeros(len(self.gene_cols), dtype=np.float32)
        line = p["expr"][row]
        expr[p["target_cols"][line.indices]] = line.data
        return {
            "gene_ids": torch.from_numpy(np.array(p["gene_ids"][row], dtype=np.int64)),  # copies: memmaps are read-only
            "values": torch.from_numpy(np.array(p["values"][row], dtype=np.float32)),
            "expr": torch.from_numpy(expr),
            "measured": torch.from_numpy(p["measured"].copy()),
            "log_depth": torch.tensor(p["depth"][row]),
            "dataset": torch.tensor(ds),
        }


class PretrainDataModule(pl.LightningDataModule):
    """The training cells of every pretraining dataset, shuffled and seeded, in full batches
    (the last partial batch is dropped so every step has B cells) that cellfoundry.trainer.fit
    resumes exactly. Its hyperparameters identify the data of a resumable run: the datasets'
    sources (SHA-256 of the h5ad each dataset's tokens were built from), the vocabulary and the
    cells (the sentence length is the module's pad_length)."""

    def __init__(
        self,
        cells: PretrainCells,
        batch_size: int,
        seed: int,
        num_workers: int,
        sources: list[str],
        vocab_hash: str,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["cells", "num_workers"])
        self.hparams["n_cells"] = len(cells)
        self.train_loader = resumable_loader(
            cells,
            min(batch_size, len(cells)),
            seed,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.train_loader


def load_pretraining_cells(tokens_dirs, h5ads, vocab) -> tuple[PretrainCells, int, str, list[str]]:
    """Train-split cells of every dataset. Returns (cells, sentence length L, token method, the
    datasets' sources: SHA-256 of the h5ad each one's tokens were built from)."""
    parts, lengths, methods, sources = [], set(), set(), []
    for tokens_dir, h5ad in zip(tokens_dirs, h5ads):
        table = CellTable.read(h5ad, tokens_dir, vocab_hash=vocab.hash)
        rows = table.rows("train")
        parts.append(
            dict(
                gene_ids=table.gene_ids,
                values=table.values,
                counts=table.counts,
                gene_vocab_ids=vocab.lookup(table.var_names),
                rows=rows,
            )
        )
        sources.append(str(table.source))
        lengths.add(int(table.token_attrs["L"]))
        methods.add(table.token_attrs.get("method", "se"))
        log.info("%s: %d training cells", h5ad, len(rows))
    if len(lengths) != 1 or len(methods) != 1:
        raise UserError(
            f"datasets were tokenized with different settings (L {sorted(lengths)}, method {sorted(methods)}); "
            "re-run tokenize."
        )
    return PretrainCells(parts), lengths.pop(), methods.pop(), sources


def subsample_sentence(
    gene_ids: Tensor, values: Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Keep the CLS slot and `k` random gene slots per cell ([B, L] -> [B, 1 + k]).

    SE has no positions, so a random subset of a sentence is still a valid (shorter) sentence;
    training on subsets costs O(k) instead of O(L) per cell. Padding slots are drawn last."""
    b, length = gene_ids.shape
    if k >= length - 1:
        return gene_ids, values
    score = torch.rand(b, length - 1, generator=generator, device=gene_ids.device) + (gene_ids[:, 1:] < 0).float()
    slots = 1 + score.argsort(dim=1)[:, :k]
    slots = torch.cat([torch.zeros(b, 1, dtype=slots.dtype, device=slots.device), slots], dim=1)
    return gene_ids.gather(1, slots), values.gather(1, slots)


def sample_task_genes(
    expr: Tensor, measured: Tensor, P: int, N: int, S: int, generator: torch.Generator | None = None
) -> Tensor:
    """Task gene columns [B, P + N + S] of `expr` [B, G] (log1p counts; `measured` [B, G] bool).

    P expressed and N unexpressed measured genes per cell (with replacement, so cells with
    few genes work), then S columns shared by every cell of the batch."""
    eps = 1e-6  # keeps a row without any candidates drawable (falls back to any measured gene)
    m = measured.float()
    expressed = (expr > 0).float() * m
    unexpressed = (expr <= 0).float() * m
    cols = []
    if P:
        cols.append(torch.multinomial(expressed + eps * m + eps, P, replacement=True, generator=generator))
    if N:
        cols.append(torch.multinomial(unexpressed + eps * m + eps, N, replacement=True, generator=generator))
    if S:
        common = measured.all(dim=0).float()
        shared = torch.multinomial(common + eps, S, replacement=True, generator=generator)
        cols.append(shared.expand(expr.shape[0], S))
    return torch.cat(cols, dim=1)
