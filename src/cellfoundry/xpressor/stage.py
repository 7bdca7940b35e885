"""Xpressor fine-tuning on a frozen SE base: data, Lightning module, training of Xpressor and of
the pooled baselines, encoding of all cells, reconstruction and kNN metrics.

The model itself is in cellfoundry.models.xpressor. Shapes: N = cells, L = sentence length
(slot 0 = CLS), T = L - 1 gene tokens, d = base width, G = decoded genes (the dataset's genes
found in the vocabulary), M = latent tokens, D = Xpressor width.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cellfoundry.models.xpressor import (
    Xpressor,
    XpressorConfig,
    count_parameters,
    log1p_normalize,
    save_xpressor,
)
from cellfoundry.utils import UserError, seed_everything

log = logging.getLogger(__name__)

#: Methods compared on held-out cells: Xpressor and two baselines decoding one pooled vector.
METHODS = ("xpressor", "cls", "mean")


# -- data ------------------------------------------------------------------------------------------
@dataclass
class CellData:
    """Everything the stage reads for one dataset, row i = cell i of qc/filtered.h5ad.

    gene_ids [N, L] int32 and values [N, L] float32 (tokens, may be memmaps); counts [N, G] CSR
    raw counts of the decoded genes; decode_genes [G] vocabulary indices; split [N] str;
    labels {column: codes [N] int64, -1 = missing}; label_classes {column: class names}.
    """

    gene_ids: np.ndarray
    values: np.ndarray
    counts: sp.csr_matrix
    decode_genes: np.ndarray
    gene_symbols: list[str]
    split: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    label_classes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.gene_ids.shape[0])


def decode_targets(adata, vocab_index: dict[str, int]) -> tuple[sp.csr_matrix, np.ndarray, list[str]]:
    """Raw counts [N, G] of the dataset's genes present in the vocabulary, their vocabulary
    indices [G] and symbols. X of `adata` must hold raw counts (the QC contract)."""
    keep = [i for i, g in enumerate(adata.var_names) if g in vocab_index]
    if not keep:
        raise UserError(
            "none of the dataset's genes is in the gene vocabulary; check datasets.<name>.gene_symbols "
            "(gene symbols must match the vocabulary's symbols)."
        )
    symbols = [str(adata.var_names[i]) for i in keep]
    x = adata.X[:, keep]
    counts = sp.csr_matrix(x, dtype=np.float32)
    ids = np.array([vocab_index[s] for s in symbols], dtype=np.int64)
    return counts, ids, symbols


def encode_labels(obs, columns: list[str]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Integer codes (-1 = missing) and sorted class names of each label column."""
    codes, classes = {}, {}
    for col in columns:
        if col not in obs.columns:
            raise UserError(
                f"xpressor.labels names obs column {col!r}, which qc/filtered.h5ad does not have; "
                f"use one of: {', '.join(map(str, obs.columns))}."
            )
        values = obs[col].astype("object")
        present = values.notna().to_numpy()
        names = sorted({str(v) for v in values[present]})
        lookup = {n: i for i, n in enumerate(names)}
        codes[col] = np.array([lookup[str(v)] if ok else -1 for v, ok in zip(values, present)], dtype=np.int64)
        classes[col] = names
    return codes, classes


def load_cell_data(h5ad_path: str, tokens_path: str, vocab, label_columns: list[str]) -> CellData:
    """Read qc/filtered.h5ad and the tokens written for it (checked against the vocabulary)."""
    import anndata as ad

    from cellfoundry.tokenize import read_tokens

    adata = ad.read_h5ad(h5ad_path)
    tokens = read_tokens(tokens_path, vocab_hash=vocab.hash)
    gene_ids, values = _token_arrays(tokens)
    if gene_ids.shape[0] != adata.n_obs:
        raise UserError(
            f"{tokens_path} holds {gene_ids.shape[0]} cells but {h5ad_path} has {adata.n_obs}; "
            "re-run tokenization (snakemake --forcerun tokenize)."
        )
    counts, ids, symbols = decode_targets(adata, vocab.index)
    if "split" not in adata.obs.columns:
        raise UserError(f"{h5ad_path} has no obs['split']; re-run QC.")
    labels, classes = encode_labels(adata.obs, label_columns)
    return CellData(gene_ids, values, counts, ids, symbols, adata.obs["split"].astype(str).to_numpy(), labels, classes)


def _token_arrays(tokens: Any) -> tuple[np.ndarray, np.ndarray]:
    """gene_ids and values from read_tokens' result (a mapping or an object with attributes)."""
    if isinstance(tokens, dict):
        return tokens["gene_ids"], tokens["values"]
    if isinstance(tokens, tuple) and not hasattr(tokens, "gene_ids"):
        return tokens[0], tokens[1]
    return tokens.gene_ids, tokens.values


def split_indices(split: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, validation, test) cell indices: validation is a seeded fraction of the train split
    used for early stopping; the test split is never seen in training."""
    train = np.flatnonzero(split == "train")
    test = np.flatnonzero(split == "test")
    if len(train) < 2:
        raise UserError("fewer than 2 cells in the train split; lower qc.test_fraction or add cells.")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(train)
    n_val = max(1, int(round(val_fraction * len(train))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val]), test


class CellBatches(Dataset):
    """Cells `indices` of `data`; items carry the token inputs (or cached base features),
    dense target counts [G], library size and label codes."""

    def __init__(self, data: CellData, indices: np.ndarray, cache: "BaseCache | None" = None):
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


def base_layer_outputs(base: nn.Module, gene_ids: Tensor, values: Tensor, gene_table: Tensor, layers: list[int]) -> tuple[Tensor, Tensor, Tensor]:
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


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over the non-padding tokens: [B, T, d] -> [B, d], or per layer [B, K, T, d] -> [B, K*d]."""
    keep = (~mask).to(tokens.dtype).unsqueeze(-1)
    if tokens.dim() == 4:
        keep = keep.unsqueeze(1)
    mean = (tokens * keep).sum(-2) / keep.sum(-2).clamp(min=1.0)
    return mean.flatten(1)


def autocast(device: str):
    """bf16 autocast on CUDA, a no-op on the CPU (fp32)."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def base_batches(base: nn.Module, gene_table: Tensor, data: CellData, batch_size: int, device: str, layers: list[int] = (-1,)) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor]]:
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
def compute_base_cache(base: nn.Module, gene_table: Tensor, data: CellData, batch_size: int, device: str, layers: list[int] = (-1,)) -> BaseCache:
    """Run the frozen base once over all cells (inference mode), logging a rate line."""
    n = data.n_cells
    tokens, masks, cls = [], [], []
    start = time.perf_counter()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for _, _, stack, outputs, padding in base_batches(base, gene_table, data, batch_size, device, layers):
        t, m, c = split_outputs(stack, outputs, padding)
        tokens.append(t.to(dtype).cpu())
        masks.append(m.cpu())
        cls.append(c.float().cpu())
    elapsed = time.perf_counter() - start
    log.info("base outputs of %d cells in %.1f s (%.1f cells/s)", n, elapsed, n / max(elapsed, 1e-9))
    return BaseCache(torch.cat(tokens), torch.cat(masks), torch.cat(cls))


def cache_bytes(data: CellData, d_base: int, device: str, n_layers: int = 1) -> int:
    """Memory the base cache of `data` would take (K = n_layers layers read)."""
    per = 2 if device.startswith("cuda") else 4
    return data.n_cells * (data.gene_ids.shape[1] - 1) * (n_layers * d_base * per + 1)


# -- Lightning module -----------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """Optimisation settings (config xpressor.*)."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    max_epochs: int = 20
    patience: int = 5
    gradient_clip: float = 1.0
    val_fraction: float = 0.1
    unfreeze_last_layer: bool = False
    genes_per_step: int | None = None  # decode a random subset of genes per training step


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
        xcfg: XpressorConfig,
        settings: TrainSettings,
    ):
        super().__init__()
        self.base = base
        self.xpressor = Xpressor(xcfg)
        self.settings = settings
        # The gene table can be large (SE-600M: 19,790 x 5,120); it is input data, not a weight.
        self.register_buffer("gene_table", gene_table.float(), persistent=False)
        self.register_buffer("decode_genes", torch.as_tensor(decode_genes, dtype=torch.long), persistent=False)
        freeze_base(self.base, settings.unfreeze_last_layer)
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
        return self.xpressor.encode(tokens, mask)

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
        for name, logits in self.xpressor.classify(latents).items():
            target = batch["labels"][name]
            terms[f"ce_{name}"] = nn.functional.cross_entropy(logits.float(), target, ignore_index=-1)
            terms["loss"] = terms["loss"] + self.xpressor.cfg.label_weight * terms[f"ce_{name}"]
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.losses(batch)
        self.log_dict({f"train_{k}": v for k, v in terms.items()}, on_step=True, on_epoch=True, batch_size=len(batch["row"]))
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        terms = self.losses(batch)
        self.log_dict({f"val_{k}": v for k, v in terms.items()}, on_epoch=True, batch_size=len(batch["row"]), sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)

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


class RateLogger(Callback):
    """One log line per epoch with losses and optimiser steps per second (the rule's progress)."""

    def __init__(self, name: str):
        self.name = name
        self.start = 0.0
        self.steps = 0

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start, self.steps = time.perf_counter(), trainer.global_step

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train_loss_epoch", "val_loss", "val_mse")}
        log.info(
            "%s epoch %d: %s; %.1f steps/s",
            self.name,
            trainer.current_epoch,
            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            (trainer.global_step - self.steps) / elapsed,
        )


# -- training -------------------------------------------------------------------------------------
def collate(items: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        if key == "labels":
            out[key] = {k: torch.tensor([it[key][k] for it in items]) for k in items[0][key]}
        elif key == "row":
            out[key] = torch.tensor([it[key] for it in items])
        else:
            out[key] = torch.stack([it[key] for it in items])
    return out


def _loader(data: CellData, idx: np.ndarray, cache: BaseCache | None, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """The shuffled training loader resumes exactly (cellfoundry.train.resumable_loader); the
    validation loader is plain (Lightning shards it under DDP)."""
    from cellfoundry.train import resumable_loader

    cells = CellBatches(data, idx, cache)
    if shuffle:
        return resumable_loader(cells, batch_size, seed, collate_fn=collate)
    return DataLoader(cells, batch_size=batch_size, shuffle=False, collate_fn=collate)


def train_one(
    method: str,
    base: nn.Module,
    gene_table: Tensor,
    data: CellData,
    xcfg: XpressorConfig,
    settings: TrainSettings,
    work_dir: Path,
    cache: BaseCache | None,
    seed: int,
    trainer_kwargs: dict,
) -> XpressorModule:
    """Train one method ("xpressor", "cls" or "mean") and return the module with its best
    (lowest validation loss) weights. Resumes from work_dir when an interrupted run of the same
    configuration left a checkpoint there; a different configuration starts afresh
    (cellfoundry.train.fit keys the resume on these settings)."""
    from cellfoundry.train import build_trainer, fit

    work_dir = Path(work_dir)
    run_settings = {"method": method, "model": xcfg.to_dict(), "train": settings.__dict__, "seed": seed,
                    "n_cells": data.n_cells, "trainer": trainer_kwargs}
    seed_everything(seed)
    if settings.unfreeze_last_layer:
        base = copy.deepcopy(base)  # each method fine-tunes its own copy of the last layer
    module = XpressorModule(base, gene_table, data.decode_genes, xcfg, settings)
    fit_idx, val_idx, _ = split_indices(data.split, settings.val_fraction, seed)
    train_loader = _loader(data, fit_idx, cache, settings.batch_size, True, seed)
    val_loader = _loader(data, val_idx, cache, settings.batch_size, False, seed)
    best = ModelCheckpoint(dirpath=work_dir / "best", filename="best", monitor="val_loss", mode="min", save_top_k=1)
    trainer = build_trainer(
        work_dir,
        max_epochs=settings.max_epochs,
        gradient_clip_val=settings.gradient_clip,
        callbacks=[EarlyStopping("val_loss", patience=settings.patience, mode="min"), best, RateLogger(method)],
        log_every_n_steps=max(1, min(10, len(train_loader))),
        enable_progress_bar=False,
        **trainer_kwargs,
    )
    fit(trainer, module, train_loader, val_loader, out_dir=work_dir, settings=run_settings)
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state, strict=False)
        log.info("%s: best validation loss %.4f (%s)", method, float(best.best_model_score), best.best_model_path)
    module.epochs_trained = trainer.current_epoch
    module.steps_trained = trainer.global_step
    return module.cpu().eval()


# -- evaluation -----------------------------------------------------------------------------------
def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(1) / denom, np.nan)


def reconstruction_metrics(predicted: np.ndarray, observed: np.ndarray) -> dict[str, float]:
    """Per-cell Pearson and Spearman (mean and median over cells) and MSE of predicted vs observed
    log1p-normalised expression, both [N, G]."""
    from scipy.stats import rankdata

    pearson = _rowwise_pearson(predicted, observed)
    spearman = _rowwise_pearson(rankdata(predicted, axis=1), rankdata(observed, axis=1))
    return {
        "pearson_mean": float(np.nanmean(pearson)),
        "pearson_median": float(np.nanmedian(pearson)),
        "spearman_mean": float(np.nanmean(spearman)),
        "spearman_median": float(np.nanmedian(spearman)),
        "mse": float(np.mean((predicted - observed) ** 2)),
    }


@torch.inference_mode()
def predict_log1p(module: XpressorModule, data: CellData, idx: np.ndarray, cache: BaseCache | None, batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded and observed log1p-normalised expression [n, G] of cells `idx`."""
    module = module.to(device).eval()
    preds, obs = [], []
    for batch in _loader(data, idx, cache, batch_size, False, 0):
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        with autocast(device):
            latents = module.forward_latents(batch)
            out = module.xpressor.decode(latents, module.gene_table[module.decode_genes])
        preds.append(out.log1p.float().cpu().numpy())
        obs.append(log1p_normalize(batch["counts"].float(), batch["library"].float(), module.xpressor.cfg.target_sum).cpu().numpy())
    module.cpu()
    return np.concatenate(preds), np.concatenate(obs)


def knn_accuracy(embedding: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = 15) -> float:
    """Accuracy of a k-nearest-neighbour classifier fitted on the train cells, on the test cells
    (cells with a missing label, code -1, are left out)."""
    from sklearn.neighbors import KNeighborsClassifier

    train = train[labels[train] >= 0]
    test = test[labels[test] >= 0]
    if len(test) == 0 or len(train) == 0:
        return float("nan")
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train))).fit(embedding[train], labels[train])
    return float((clf.predict(embedding[test]) == labels[test]).mean())


# -- stage entry points ---------------------------------------------------------------------------
@dataclass
class StageSettings:
    """The xpressor config section, split into model and training parts."""

    model: dict
    train: TrainSettings
    baselines: bool = True
    cache_base_outputs: bool = True
    cache_max_gb: float = 8.0
    inference_batch_size: int = 64


def stage_settings(cfg: dict) -> StageSettings:
    """Settings from config["xpressor"] (schema defaults already filled)."""
    model_keys = (
        "n_latent", "d_model", "n_blocks", "n_decoder_blocks", "n_heads", "mlp_ratio", "decoder_mlp_ratio", "dropout",
        "attention", "base_layers", "loss", "dispersion", "log1p_head", "mse_weight", "label_dim", "label_weight", "gene_adapter", "adapter_hidden",
    )  # fmt: skip
    train = TrainSettings(
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        batch_size=cfg["batch_size"],
        max_epochs=cfg["max_epochs"],
        patience=cfg["patience"],
        gradient_clip=cfg["gradient_clip"],
        val_fraction=cfg["val_fraction"],
        unfreeze_last_layer=cfg["unfreeze_last_layer"],
        genes_per_step=cfg["genes_per_step"],
    )
    return StageSettings(
        model={k: cfg[k] for k in model_keys},
        train=train,
        baselines=cfg["baselines"],
        cache_base_outputs=cfg["cache_base_outputs"],
        cache_max_gb=cfg["cache_max_gb"],
        inference_batch_size=cfg["inference_batch_size"],
    )


def run_training(
    *,
    base: nn.Module,
    gene_table: Tensor,
    data: CellData,
    base_sha256: str,
    stage: StageSettings,
    out_ckpt: str,
    out_metrics: str,
    work_dir: str,
    seed: int,
    device: str,
    trainer_kwargs: dict,
) -> dict:
    """Train Xpressor (and the pooled baselines), measure held-out reconstruction, write the
    Xpressor checkpoint and the metrics table (long format). Returns the training summary.
    Under DDP every rank trains; only global rank 0 evaluates, writes and returns the summary."""
    import pandas as pd

    from cellfoundry.train import is_global_zero

    d_base = int(base.cfg.d_model) if hasattr(base, "cfg") else int(gene_table.shape[1])
    model = dict(stage.model)
    model["base_layers"] = resolve_layers(model.get("base_layers", [-1]), int(base.cfg.nlayers))
    xcfg = XpressorConfig(d_base=d_base, gene_dim=int(gene_table.shape[1]), labels=data.label_classes, **model)
    log.info("reading base layers %s (0 = input tokens) of %d", xcfg.base_layers, base.cfg.nlayers)
    use_cache = stage.cache_base_outputs and not stage.train.unfreeze_last_layer
    n_cache = cache_bytes(data, d_base, device, xcfg.n_base_layers)
    if use_cache and n_cache > stage.cache_max_gb * 2**30:
        log.warning("base outputs would take %.1f GB > xpressor.cache_max_gb; running the base every step instead", n_cache / 2**30)
        use_cache = False
    freeze_base(base, False)
    cache = compute_base_cache(base, gene_table, data, stage.inference_batch_size, device, xcfg.base_layers) if use_cache else None

    methods = METHODS if stage.baselines else METHODS[:1]
    _, _, test_idx = split_indices(data.split, stage.train.val_fraction, seed)
    if len(test_idx) == 0:
        raise UserError("the test split is empty; set qc.test_fraction > 0 to measure held-out reconstruction.")
    rows, summary = [], {"methods": {}}
    xpressor_module = None
    for method in methods:
        values = {**xcfg.to_dict(), "pooling": None if method == "xpressor" else method}
        if method != "xpressor":
            values["labels"] = {}  # baselines reconstruct only; no label tokens
        cfg_m = XpressorConfig.from_dict(values)
        module = train_one(method, base, gene_table, data, cfg_m, stage.train, Path(work_dir) / method, cache, seed, trainer_kwargs)
        if not is_global_zero():
            continue  # DDP: the other ranks only train; rank 0 measures and writes
        pred, obs = predict_log1p(module, data, test_idx, cache, stage.inference_batch_size, device)
        metrics = reconstruction_metrics(pred, obs)
        trainable, _ = count_parameters(module.xpressor)
        base_trainable = sum(v.numel() for v in unfrozen_base_state(module.base).values())
        base_total = sum(p.numel() for p in module.base.parameters())
        summary["methods"][method] = {
            **metrics,
            "trainable_parameters": trainable + base_trainable,
            "epochs": int(module.epochs_trained),
            "steps": int(module.steps_trained),
        }
        for name, value in metrics.items():
            rows.append({"method": method, "metric": name, "value": value, "split": "test", "n_cells": len(test_idx)})
        log.info("%s held-out reconstruction: %s", method, json.dumps(metrics))
        if method == "xpressor":
            xpressor_module = module
            summary["trainable_parameters"] = trainable + base_trainable
            summary["base_parameters"] = base_total
            summary["trainable_fraction"] = (trainable + base_trainable) / (trainable + base_total)
            log.info(
                "trainable parameters: %d of %d (%.4f%%); base frozen%s",
                trainable + base_trainable,
                trainable + base_total,
                100 * summary["trainable_fraction"],
                " except its last layer" if stage.train.unfreeze_last_layer else "",
            )
        else:
            del module
    if not is_global_zero():
        return {}
    summary.update(
        n_cells=data.n_cells,
        n_genes_decoded=len(data.decode_genes),
        n_test_cells=int(len(test_idx)),
        base_sha256=base_sha256,
        cached_base_outputs=bool(use_cache),
    )
    if stage.baselines:
        x = summary["methods"]["xpressor"]
        summary["xpressor_beats_baselines"] = bool(
            all(x["pearson_mean"] > summary["methods"][m]["pearson_mean"] and x["mse"] < summary["methods"][m]["mse"] for m in ("cls", "mean"))
        )
    meta = {"genes": data.gene_symbols, "label_classes": data.label_classes, "training": summary}
    save_xpressor(out_ckpt, xpressor_module.xpressor, base_sha256, unfrozen_base_state(xpressor_module.base), meta)
    from cellfoundry.utils import atomic_output

    with atomic_output(out_metrics) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    for method in methods:  # a finished run needs no resume state
        shutil.rmtree(Path(work_dir) / method / "checkpoints", ignore_errors=True)
        shutil.rmtree(Path(work_dir) / method / "best", ignore_errors=True)
    return summary


@torch.inference_mode()
def encode_cells(
    base: nn.Module,
    xpressor: Xpressor,
    gene_table: Tensor,
    data: CellData,
    latents_path: str,
    batch_size: int,
    device: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Latent tokens of every cell, written chunk by chunk to `latents_path` (.npy, float32
    [N, M, D], atomically). Returns (X_xpressor [N, k], SE CLS embeddings [N, output_dim + 10])."""
    from cellfoundry.utils import atomic_output

    xpressor = xpressor.to(device).eval()
    n, m, dx = data.n_cells, xpressor.cfg.n_tokens, xpressor.cfg.d_model
    embeddings, se_cls = [], []
    start = time.perf_counter()
    with atomic_output(latents_path) as tmp:
        tmp_npy = tmp.with_name(tmp.name + ".npy")  # open_memmap keeps the given name
        out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(n, m, dx))
        for lo, hi, stack, outputs, padding in base_batches(base, gene_table, data, batch_size, device, xpressor.cfg.base_layers):
            with autocast(device):
                tokens, mask, _ = split_outputs(stack, outputs, padding)
                latents = xpressor.encode(tokens, mask)
                emb = xpressor.embedding(latents)
                cell = base.embed_from_outputs(outputs) if hasattr(base, "embed_from_outputs") else outputs[:, 0]
            out[lo:hi] = latents.float().cpu().numpy()
            embeddings.append(emb.float().cpu().numpy())
            se_cls.append(cell.float().cpu().numpy())
            if (lo // batch_size) % 50 == 0:
                rate = hi / max(time.perf_counter() - start, 1e-9)
                log.info("encoded %d/%d cells (%.1f cells/s)", hi, n, rate)
        out.flush()
        del out
        tmp_npy.replace(tmp)
    log.info("encoded %d cells in %.1f s", n, time.perf_counter() - start)
    return np.concatenate(embeddings), np.concatenate(se_cls)


# -- rule-level drivers (called by scripts/xpressor_*.py) -----------------------------------------
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


def _load_base(se_checkpoint: str, vocab_path: str):
    from cellfoundry.models.se_checkpoint import load_se

    base, _, vocab = load_se(se_checkpoint, gene_embeddings=vocab_path)
    return base, vocab


def train_stage(
    *,
    se_checkpoint: str,
    vocab_path: str,
    tokens: str,
    h5ad: str,
    out_ckpt: str,
    out_metrics: str,
    work_dir: str,
    cfg: dict,
    label_columns: list[str],
    seed: int,
    device: str,
) -> dict:
    """Rule xpressor_train: load base, vocabulary and cells, then run_training."""
    from cellfoundry.utils import file_sha256, resolve_device

    device = resolve_device(device)
    seed_everything(seed)
    base, vocab = _load_base(se_checkpoint, vocab_path)
    data = load_cell_data(h5ad, tokens, vocab, label_columns)
    log.info(
        "%d cells (%d train, %d test), %d decoded genes, labels %s, device %s",
        data.n_cells, int((data.split == "train").sum()), int((data.split == "test").sum()),
        len(data.decode_genes), list(data.label_classes), device,
    )  # fmt: skip
    trainer = cfg["trainer"]
    trainer_kwargs = dict(
        devices=trainer["devices"],
        num_nodes=trainer["num_nodes"],
        device=device,
        checkpoint_every_n_steps=trainer["checkpoint_every_n_steps"],
    )
    return run_training(
        base=base,
        gene_table=vocab.table,
        data=data,
        base_sha256=file_sha256(se_checkpoint),
        stage=stage_settings(cfg),
        out_ckpt=out_ckpt,
        out_metrics=out_metrics,
        work_dir=work_dir,
        seed=seed,
        device=device,
        trainer_kwargs=trainer_kwargs,
    )


def encode_stage(
    *,
    se_checkpoint: str,
    vocab_path: str,
    tokens: str,
    h5ad: str,
    xpressor_ckpt: str,
    metrics_tsv: str,
    out_latents: str,
    out_h5ad: str,
    out_summary: str,
    out_plot: str,
    batch_size: int,
    knn_k: int,
    device: str,
    config: dict | None = None,
) -> dict:
    """Rule xpressor_encode: latents of every cell, X_xpressor, kNN label accuracy beside the SE
    CLS embedding, the stage summary and its figure. `config` (the stage's config section) goes
    into the provenance record of embedding.h5ad."""
    import anndata as ad
    import pandas as pd

    from cellfoundry.models.xpressor import load_xpressor
    from cellfoundry.provenance import KEY as PROVENANCE_KEY, provenance
    from cellfoundry.utils import atomic_output, resolve_device

    device = resolve_device(device)
    base, vocab = _load_base(se_checkpoint, vocab_path)
    ckpt = load_xpressor(xpressor_ckpt, base_checkpoint=se_checkpoint)
    if ckpt.base_state_dict:
        base.load_state_dict(ckpt.base_state_dict, strict=False)
        log.info("applied %d fine-tuned base tensors from %s", len(ckpt.base_state_dict), xpressor_ckpt)
    labels = list(ckpt.meta.get("label_classes", {}))
    data = load_cell_data(h5ad, tokens, vocab, labels)
    embedding, se_cls = encode_cells(base, ckpt.model, vocab.table, data, out_latents, batch_size, device)

    obs = ad.read_h5ad(h5ad, backed="r").obs.copy()
    out = ad.AnnData(obs=obs)
    out.obsm["X_xpressor"] = embedding.astype(np.float32)
    out.uns["xpressor"] = {"embedding": "label token bottleneck" if labels else "mean of latent tokens", "labels": labels}
    out.uns[PROVENANCE_KEY] = provenance(
        "xpressor_encode", config, checkpoints={"se": se_checkpoint, "xpressor": xpressor_ckpt}, vocab=vocab_path,
        inputs={"cells": h5ad, "tokens": tokens},
    )
    with atomic_output(out_h5ad) as tmp:
        out.write_h5ad(tmp)

    train = np.flatnonzero(data.split == "train")
    test = np.flatnonzero(data.split == "test")
    knn = {}
    for col, codes in data.labels.items():
        knn[col] = {
            "xpressor": knn_accuracy(embedding, codes, train, test, knn_k),
            "se_cls": knn_accuracy(se_cls, codes, train, test, knn_k),
        }
        log.info("kNN accuracy of %s on test cells: X_xpressor %.3f, SE CLS %.3f", col, knn[col]["xpressor"], knn[col]["se_cls"])
    training = ckpt.meta.get("training", {})
    summary = {
        **{k: v for k, v in training.items() if k != "methods"},
        "methods": training.get("methods", {}),
        "knn_accuracy": knn,
        "knn_k": knn_k,
        "n_latent_tokens": ckpt.config.n_tokens,
        "latent_dim": ckpt.config.d_model,
        "embedding_dim": int(embedding.shape[1]),
        "config": ckpt.config.to_dict() | {"labels": {k: len(v) for k, v in ckpt.config.labels.items()}},
    }
    with atomic_output(out_summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    with atomic_output(out_plot) as tmp:
        plot_summary(pd.read_csv(metrics_tsv, sep="\t"), knn, tmp)
    return summary


def plot_summary(metrics, knn: dict, path) -> None:
    """Bar charts: held-out reconstruction per method and metric; kNN accuracy per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["pearson_mean", "spearman_mean", "mse"]
    fig, axes = plt.subplots(1, len(shown) + (1 if knn else 0), figsize=(3.2 * (len(shown) + 1), 3.2))
    methods = list(dict.fromkeys(metrics["method"]))
    for ax, metric in zip(axes, shown):
        values = [float(metrics[(metrics.method == m) & (metrics.metric == metric)].value.iloc[0]) for m in methods]
        ax.bar(methods, values, color=["C0", "C7", "C8"][: len(methods)])
        ax.set_title(f"held-out {metric}")
    if knn:
        ax = axes[-1]
        cols = list(knn)
        x = np.arange(len(cols))
        ax.bar(x - 0.2, [knn[c]["xpressor"] for c in cols], 0.4, label="X_xpressor")
        ax.bar(x + 0.2, [knn[c]["se_cls"] for c in cols], 0.4, label="SE CLS", color="C7")
        ax.set_xticks(x, cols)
        ax.set_ylim(0, 1)
        ax.set_title("kNN label accuracy (test)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
