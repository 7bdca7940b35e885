"""SE pretraining: the SE objective, its Lightning module and data module.

The objective (spec se.md, "Training objective"): from a cell's embedding, predict the log1p
expression of task genes — P genes expressed in the cell, N unexpressed genes, S genes shared
across the batch — with `binary_decoder(concat[gene_embedding_layer(gene), cell embedding,
read depth, dataset embedding])`. Loss "mse" compares gene by gene; "energy" is the reference's
energy distance per cell over its task genes plus one across cells per shared gene. The dataset
loss keeps the 10-d dataset part constant within a dataset and, with more than one dataset,
adds the reference's dataset classification from the cell embedding.

Shapes: B cells, L sentence length, G genes of the union of the datasets' vocabulary genes,
T = P + N + S task genes, d model width, V vocabulary size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cellfoundry.models.se import DATASET_DIM, SEConfig, SkipBlock, StateEmbedding

log = logging.getLogger(__name__)

LOSSES = ("mse", "energy")


@dataclass
class PretrainConfig:
    """Optimisation and objective settings (config `se.pretrain`)."""

    max_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    loss: str = "mse"
    P: int = 32  # expressed task genes per cell
    N: int = 32  # unexpressed task genes per cell
    S: int = 32  # task genes shared by the batch
    dataset_loss_weight: float = 0.1
    num_workers: int = 0
    sentence_genes: int | None = None  # train on this many random gene slots per cell (None: all)


class TrainingHeads(nn.Module):
    """The reference's training-only heads, with its parameter names (binary_decoder.*,
    dataset_encoder.*), so that checkpoints carry every key the reference builds."""

    def __init__(self, cfg: SEConfig):
        super().__init__()
        width = cfg.d_model + cfg.output_dim + 1 + DATASET_DIM  # gene, cell, read depth, dataset
        self.binary_decoder = nn.Sequential(SkipBlock(width, cfg.dropout), SkipBlock(width, cfg.dropout), nn.Linear(width, 1))
        self.dataset_encoder = nn.Sequential(
            nn.Linear(cfg.output_dim, cfg.d_model),
            nn.ReLU(),
            nn.LayerNorm(cfg.d_model),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_model, max(cfg.num_datasets, 1)),
        )


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Energy distance between 1-D sample sets, per row: x [R, n], y [R, m] -> [R].

    2 E|x - y| - E|x - x'| - E|y - y'| (V-statistic, >= 0)."""
    xy = (x[:, :, None] - y[:, None, :]).abs().mean(dim=(1, 2))
    xx = (x[:, :, None] - x[:, None, :]).abs().mean(dim=(1, 2))
    yy = (y[:, :, None] - y[:, None, :]).abs().mean(dim=(1, 2))
    return 2 * xy - xx - yy


def subsample_sentence(gene_ids: Tensor, values: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
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


def dataset_spread(ds_emb: Tensor, dataset: Tensor) -> Tensor:
    """Mean squared distance of each cell's dataset embedding [B, 10] from its dataset's batch
    mean. The dataset part of SE's output should identify the dataset, not the cell: without
    this term a single-dataset model uses it as a second, unnormalised cell channel that swamps
    the normalised CLS part in Euclidean distances."""
    onehot = F.one_hot(dataset, int(dataset.max()) + 1).to(ds_emb.dtype)  # [B, K]
    means = (onehot.T @ ds_emb) / onehot.sum(0).clamp(min=1)[:, None]  # [K, 10]
    return ((ds_emb - means[dataset]) ** 2).sum(-1).mean()


def sample_task_genes(expr: Tensor, measured: Tensor, P: int, N: int, S: int, generator: torch.Generator | None = None) -> Tensor:
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


class SEPretrainModule(pl.LightningModule):
    """SE model + training heads trained with the SE objective.

    Batches: dict with gene_ids [B, L] int, values [B, L] float, expr [B, G] float (log1p
    counts over `gene_cols`), measured [B, G] bool, log_depth [B], dataset [B] int.
    `gene_cols` [G] are the vocabulary ids of expr's columns; `gene_table` [V, token_dim].
    """

    def __init__(self, cfg: SEConfig, train_cfg: PretrainConfig, gene_table: Tensor, gene_cols: Tensor):
        super().__init__()
        self.cfg, self.train_cfg = cfg, train_cfg
        self.model = StateEmbedding(cfg)
        self.heads = TrainingHeads(cfg)
        # Inputs, not weights: kept out of Lightning checkpoints (the vocabulary file has them).
        self.register_buffer("gene_table", gene_table.float(), persistent=False)
        self.register_buffer("gene_cols", gene_cols.long(), persistent=False)

    def predict_expression(self, batch: dict, task: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted log1p expression [B, T] of task columns `task` [B, T], and the cell
        embeddings [B, output_dim + 10]."""
        emb = self.model(batch["gene_ids"], batch["values"], self.gene_table)
        cell, ds = emb[:, : self.cfg.output_dim], emb[:, self.cfg.output_dim :]
        genes = F.normalize(self.gene_table[self.gene_cols[task]], dim=-1)  # [B, T, token_dim]
        gene_h = self.model.encoder(genes)  # the reference's gene_embedding_layer is the encoder
        t = task.shape[1]
        features = torch.cat(
            [
                gene_h,
                cell[:, None].expand(-1, t, -1),
                batch["log_depth"][:, None, None].expand(-1, t, 1).to(gene_h.dtype),
                ds[:, None].expand(-1, t, -1),
            ],
            dim=-1,
        )
        return self.heads.binary_decoder(features).squeeze(-1), emb

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        tc = self.train_cfg
        if tc.sentence_genes:
            batch = dict(batch)
            batch["gene_ids"], batch["values"] = subsample_sentence(batch["gene_ids"], batch["values"], tc.sentence_genes)
        task = sample_task_genes(batch["expr"], batch["measured"], tc.P, tc.N, tc.S)
        target = batch["expr"].gather(1, task)
        pred, emb = self.predict_expression(batch, task)
        pred = pred.float()
        if tc.loss == "mse":
            loss = F.mse_loss(pred, target)
        else:
            per_cell = energy_distance(pred[:, : tc.P + tc.N], target[:, : tc.P + tc.N]).mean() if tc.P + tc.N else 0.0
            shared = energy_distance(pred[:, tc.P + tc.N :].T, target[:, tc.P + tc.N :].T).mean() if tc.S else 0.0
            loss = per_cell + shared
        self.log("expr_loss", loss.detach(), prog_bar=True)
        if tc.dataset_loss_weight > 0:
            ds_loss = dataset_spread(emb[:, self.cfg.output_dim :].float(), batch["dataset"])
            if self.cfg.num_datasets > 1:
                logits = self.heads.dataset_encoder(emb[:, : self.cfg.output_dim]).float()
                ds_loss = ds_loss + F.cross_entropy(logits, batch["dataset"])
            self.log("dataset_loss", ds_loss.detach())
            loss = loss + tc.dataset_loss_weight * ds_loss
        self.log("train_loss", loss.detach(), prog_bar=True)
        return loss

    def configure_optimizers(self):
        tc = self.train_cfg
        opt = torch.optim.AdamW(self.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        total = max(tc.max_steps, 1)
        warmup = min(tc.warmup_steps, total - 1)

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LogProgress(pl.Callback):
    """A rate line in the rule's log every `every` steps (Lightning's bar goes to the terminal)."""

    def __init__(self, every: int, batch_size: int):
        self.every, self.batch_size = every, batch_size
        self.start = self.start_step = None

    def on_train_start(self, trainer, module) -> None:
        import time

        self.start, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        import time

        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            rate = (step - self.start_step) / max(time.perf_counter() - self.start, 1e-9)
            loss = trainer.callback_metrics.get("train_loss")
            log.info("step %d/%d  loss %.4f  %.2f steps/s  %.0f cells/s", step, trainer.max_steps,
                     float("nan") if loss is None else float(loss), rate, rate * self.batch_size * trainer.world_size)


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


def train_loader(cells: PretrainCells, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled, seeded loader that cellfoundry.train.fit resumes exactly; the last partial batch
    is dropped so every step has B cells."""
    from cellfoundry.train import resumable_loader

    return resumable_loader(cells, min(batch_size, len(cells)), seed, drop_last=True,
                            num_workers=num_workers, persistent_workers=num_workers > 0)


# ---------------------------------------------------------------------------- workflow entry points


def se_config_from(se: dict, token_dim: int, pad_length: int, num_datasets: int) -> SEConfig:
    """SEConfig from the config's `se` section and the data's sizes."""
    return SEConfig(
        token_dim=token_dim,
        d_model=se["d_model"],
        nhead=se["nhead"],
        d_hid=se["d_hid"],
        nlayers=se["nlayers"],
        output_dim=se["output_dim"],
        dropout=se["dropout"],
        pad_length=pad_length,
        encoding=se["encoding"],
        num_datasets=num_datasets,
    )


def load_pretraining_cells(tokens_dirs, h5ads, vocab) -> tuple[PretrainCells, int, str]:
    """Train-split cells of every dataset. Returns (cells, sentence length L, token method)."""
    import anndata as ad

    from cellfoundry.tokenize import read_tokens
    from cellfoundry.utils import UserError

    parts, lengths, methods = [], set(), set()
    for tokens_dir, h5ad in zip(tokens_dirs, h5ads):
        tokens = read_tokens(tokens_dir, vocab_hash=vocab.hash)
        adata = ad.read_h5ad(h5ad)
        if adata.n_obs != len(tokens):
            raise UserError(f"{tokens_dir} has {len(tokens)} cells but {h5ad} has {adata.n_obs}; re-run tokenize.")
        rows = np.flatnonzero(adata.obs["split"].astype(str).to_numpy() == "train")
        if len(rows) == 0:
            raise UserError(f"{h5ad} has no cells with obs['split'] == 'train'; lower qc.test_fraction.")
        parts.append(dict(gene_ids=tokens.gene_ids, values=tokens.values, counts=adata.X,
                          gene_vocab_ids=vocab.lookup(adata.var_names), rows=rows))
        lengths.add(int(tokens.attrs["L"]))
        methods.add(tokens.attrs.get("method", "se"))
        log.info("%s: %d training cells", h5ad, len(rows))
    if len(lengths) != 1 or len(methods) != 1:
        raise UserError(f"datasets were tokenized with different settings (L {sorted(lengths)}, method {sorted(methods)}); re-run tokenize.")
    return PretrainCells(parts), lengths.pop(), methods.pop()


def run_pretraining(tokens_dirs, h5ads, vocab_path, out_ckpt, out_losses, work_dir, se: dict, seed: int, device: str) -> None:
    """Train an SE model (config section `se`) on the datasets' train splits and write it in the
    SE-600M checkpoint layout to `out_ckpt`, with the loss curve in `out_losses` (TSV).

    Lightning keeps resumable checkpoints in `work_dir/checkpoints` while training; they are
    removed after a finished run, so that a forced re-run starts afresh, and an interrupted run
    is resumed only with unchanged settings (cellfoundry.train.fit). Under DDP every rank runs
    this function; only global rank 0 writes the outputs."""
    import shutil
    from pathlib import Path

    from cellfoundry.embed import check_tokens_match_model
    from cellfoundry.models.se_checkpoint import save_se
    from cellfoundry.train import build_trainer, fit, read_metrics
    from cellfoundry.utils import atomic_output, seed_everything
    from cellfoundry.vocab import GeneVocab

    seed_everything(seed)
    vocab = GeneVocab.load(vocab_path)
    cells, length, method = load_pretraining_cells(tokens_dirs, h5ads, vocab)
    check_tokens_match_model(method, se["encoding"], tokens_dirs[0])
    cfg = se_config_from(se, vocab.dim, length, len(tokens_dirs))
    train_cfg = PretrainConfig(**se["pretrain"])
    log.info("pretraining %s on %d cells for %d steps", cfg, len(cells), train_cfg.max_steps)
    module = SEPretrainModule(cfg, train_cfg, vocab.table, torch.from_numpy(cells.gene_cols))
    trainer_cfg = se["trainer"]
    trainer = build_trainer(
        work_dir,
        max_steps=train_cfg.max_steps,
        devices=trainer_cfg["devices"],
        num_nodes=trainer_cfg["num_nodes"],
        device=device,
        checkpoint_every_n_steps=trainer_cfg["checkpoint_every_n_steps"],
        log_every_n_steps=max(1, min(10, train_cfg.max_steps // 20)),
        callbacks=[LogProgress(max(1, train_cfg.max_steps // 20), train_cfg.batch_size)],
    )
    # a checkpoint is resumed only by a run of the same model, objective, data and seed
    settings = {"se": {k: v for k, v in se.items() if k != "trainer"}, "seed": seed, "datasets": [str(t) for t in tokens_dirs],
                "cells": len(cells), "sentence_length": length, "vocab": vocab.hash}
    fit(trainer, module, train_loader(cells, train_cfg.batch_size, seed, train_cfg.num_workers), out_dir=work_dir, settings=settings)
    if not trainer.is_global_zero:
        return
    save_se(out_ckpt, module.model, cfg, training_state=module.heads.state_dict(),
            gene_embeddings=str(vocab_path), gene_table=vocab.table)
    metrics = read_metrics(work_dir)  # every attempt's rows, when the run was interrupted and resumed
    losses = metrics[[c for c in ("step", "train_loss", "expr_loss", "dataset_loss") if c in metrics]].dropna(subset=["train_loss"])
    with atomic_output(out_losses) as tmp:
        losses.to_csv(tmp, sep="\t", index=False)
    shutil.rmtree(Path(work_dir) / "checkpoints", ignore_errors=True)
    log.info("wrote %s (final loss %.4f)", out_ckpt, float(losses["train_loss"].iloc[-1]))


def write_random_model(pretrained_ckpt, vocab_path, out_ckpt, seed: int, allow_unsafe_pickle: bool = False) -> None:
    """An untrained model of `pretrained_ckpt`'s architecture (seeded init), in the same layout."""
    from cellfoundry.models.se_checkpoint import config_from_checkpoint, read_checkpoint_file, save_se
    from cellfoundry.vocab import GeneVocab

    cfg = config_from_checkpoint(read_checkpoint_file(pretrained_ckpt, allow_unsafe_pickle=allow_unsafe_pickle))
    torch.manual_seed(seed)
    model, heads = StateEmbedding(cfg), TrainingHeads(cfg)
    vocab = GeneVocab.load(vocab_path)
    save_se(out_ckpt, model, cfg, training_state=heads.state_dict(), gene_embeddings=str(vocab_path), gene_table=vocab.table)
    log.info("wrote random-weights SE model %s (%s)", out_ckpt, cfg)
