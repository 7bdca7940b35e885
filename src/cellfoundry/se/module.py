"""SE pretraining: the SE objective and its LightningModule (the data side is se.data, the heads
and losses are in models.se).

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

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from cellfoundry.models.se import SEConfig, StateEmbedding, TrainingHeads, dataset_spread, energy_distance
from cellfoundry.se.data import sample_task_genes, subsample_sentence

LOSSES = ("mse", "energy")


@dataclass
class PretrainConfig:
    """Optimisation and objective settings: the config's `se.pretrain` section without
    `datasets`. No defaults: the schema's are the only ones (config/schema.yaml)."""

    max_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    loss: str
    P: int  # expressed task genes per cell
    N: int  # unexpressed task genes per cell
    S: int  # task genes shared by the batch
    dataset_loss_weight: float
    num_workers: int
    sentence_genes: int | None  # train on this many random gene slots per cell (None: all)


class SEPretrainModule(pl.LightningModule):
    """SE model + training heads trained with the SE objective.

    Batches: dict with gene_ids [B, L] int, values [B, L] float, expr [B, G] float (log1p
    counts over `gene_cols`), measured [B, G] bool, log_depth [B], dataset [B] int.
    `gene_cols` [G] are the vocabulary ids of expr's columns; `gene_table` [V, token_dim].
    """

    def __init__(self, model: dict, pretrain: dict, gene_table: Tensor, gene_cols: Tensor):
        """`model`: SEConfig fields; `pretrain`: PretrainConfig fields. Both are the module's
        hyperparameters (and so its resume identity); the gene table and columns are inputs."""
        super().__init__()
        self.save_hyperparameters(ignore=["gene_table", "gene_cols"])
        self.cfg, self.train_cfg = SEConfig(**model), PretrainConfig(**pretrain)
        self.model = StateEmbedding(self.cfg)
        self.heads = TrainingHeads(self.cfg)
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
            batch["gene_ids"], batch["values"] = subsample_sentence(
                batch["gene_ids"], batch["values"], tc.sentence_genes
            )
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
