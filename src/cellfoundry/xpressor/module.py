"""Xpressor's LightningModule: trains an Xpressor (or a pooled baseline) on a frozen SE base.

The model itself is cellfoundry.models.xpressor.Xpressor; the batches come from
cellfoundry.xpressor.data. Shapes: B = cells, T = gene tokens, d = base width, G = decoded genes.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from cellfoundry.models.xpressor import Xpressor, XpressorConfig, masked_mean
from cellfoundry.utils import UserError
from cellfoundry.xpressor.data import base_layer_outputs, split_outputs


@dataclass
class TrainSettings:
    """Optimisation settings (config xpressor.train.* and xpressor.unfreeze_last_layer). No
    defaults: the schema's are the only ones (config/schema.yaml)."""

    lr: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int
    lr_patience: int | None  # halve the lr after this many epochs without progress (None: constant)
    gradient_clip: float | None
    val_fraction: float
    eval_max_cells: int | None  # validation cells, and held-out cells scored, at most
    unfreeze_last_layer: bool
    genes_per_step: int | None  # decode a random subset of genes per training step


class XpressorModule(pl.LightningModule):
    """Trains an Xpressor (or a pooled baseline) on top of a frozen base.

    The base's parameters have requires_grad False (except its last layer when
    `unfreeze_last_layer`) and it stays in eval mode (no dropout) even while training. Batches
    either carry cached base features or token inputs, in which case the base runs under
    no_grad (or with gradients only through the unfrozen last layer).
    """

    def __init__(
        self,
        base: nn.Module,
        gene_table: Tensor,
        decode_genes: np.ndarray,
        model: dict,
        train: dict,
        base_sha256: str | None = None,
    ):
        """`model`: XpressorConfig fields; `train`: TrainSettings fields; `base_sha256`: the base
        checkpoint's hash. They are the module's hyperparameters (and so its resume identity);
        base, gene table and decoded genes are inputs."""
        super().__init__()
        self.save_hyperparameters(ignore=["base", "gene_table", "decode_genes"])
        self.base = base
        self.xpressor = Xpressor(XpressorConfig.from_dict(model))
        self.settings = TrainSettings(**train)
        # The gene table can be large (SE-600M: 19,790 x 5,120); it is input data, not a weight.
        self.register_buffer("gene_table", gene_table.float(), persistent=False)
        self.register_buffer("decode_genes", torch.as_tensor(decode_genes, dtype=torch.long), persistent=False)
        freeze_base(self.base, self.settings.unfreeze_last_layer)
        self.strict_loading = False  # resume checkpoints hold only the trainable weights

    # The base never trains in Lightning's sense: keep its dropout off.
    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self

    def base_features(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Gene tokens [B, T, d], mask [B, T], CLS [B, d] of the batch."""
        if "tokens" in batch:
            return batch["tokens"], batch["mask"], batch["cls"]
        grad = self.settings.unfreeze_last_layer and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            stack, outputs, padding = base_layer_outputs(
                self.base, batch["gene_ids"], batch["values"], self.gene_table, self.xpressor.cfg.base_layers
            )
        return split_outputs(stack, outputs, padding)

    def forward_latents(self, batch: dict) -> Tensor:
        tokens, mask, cls = self.base_features(batch)
        pooling = self.xpressor.cfg.pooling
        if pooling == "cls":
            return self.xpressor.encode(cls)
        if pooling == "mean":  # the mean of each layer read, concatenated
            return self.xpressor.encode(masked_mean(tokens, mask))
        return self.xpressor.encode(tokens, mask, cls)

    def losses(self, batch: dict) -> dict[str, Tensor]:
        latents = self.forward_latents(batch)
        genes, counts = self.decode_genes, batch["counts"].float()
        library = batch["library"].float()
        n_sub = self.settings.genes_per_step
        if self.training and n_sub and n_sub < len(genes):
            # A random gene subset per step: the decoder's cost is per cell x gene, and genes never
            # attend to each other. The loss scales the subset's fractions to its observed share
            # of the library.
            pick = torch.randperm(len(genes), device=counts.device)[:n_sub]
            genes, counts = genes[pick], counts[:, pick]
        out = self.xpressor.decode(latents, self.gene_table[genes])
        terms = self.xpressor.reconstruction_loss(out, counts, library)
        terms["reconstruction"] = terms["loss"]  # what every method is compared on
        for name, logits in self.xpressor.classify(latents).items():
            target = batch["labels"][name]
            terms[f"ce_{name}"] = nn.functional.cross_entropy(logits.float(), target, ignore_index=-1)
            terms["loss"] = terms["loss"] + self.xpressor.cfg.label_weight * terms[f"ce_{name}"]
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.losses(batch)
        self.log_dict(
            {f"train_{k}": v for k, v in terms.items()}, on_step=True, on_epoch=True, batch_size=len(batch["row"])
        )
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        terms = self.losses(batch)
        self.log_dict(
            {f"val_{k}": v for k, v in terms.items()}, on_epoch=True, batch_size=len(batch["row"]), sync_dist=True
        )

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        if self.settings.lr_patience is None:
            return optimizer
        # At a constant lr the validation loss jitters by as much as the methods differ, and
        # early stopping then picks a noisy epoch; halving on a plateau lets each method settle.
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.5, patience=self.settings.lr_patience
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": plateau, "monitor": "val_reconstruction", "interval": "epoch"},
        }

    def trainable_state(self) -> dict[str, Tensor]:
        """The weights that train: Xpressor + (optionally) the base's unfrozen parameters."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names or k.startswith("xpressor.")}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep resume checkpoints small: the frozen base is an input, not something we train.
        checkpoint["state_dict"] = self.trainable_state()


def freeze_base(base: nn.Module, unfreeze_last_layer: bool) -> None:
    """requires_grad False everywhere, except the last transformer layer when asked."""
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    if unfreeze_last_layer:
        layers = getattr(getattr(base, "transformer_encoder", None), "layers", None)
        if not layers:
            raise UserError("xpressor.unfreeze_last_layer needs a base model with transformer_encoder.layers.")
        for p in layers[-1].parameters():
            p.requires_grad_(True)


def unfrozen_base_state(base: nn.Module) -> dict[str, Tensor]:
    """The base's parameters that were trained (empty when the base stayed frozen)."""
    return {n: p.detach().cpu() for n, p in base.named_parameters() if p.requires_grad}
