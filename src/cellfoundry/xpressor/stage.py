"""Xpressor's rules: xpressor_train (Xpressor and the pooled baselines on a frozen SE base,
held-out reconstruction) and xpressor_encode (latent tokens and X_xpressor of every cell, kNN
label accuracy, the stage summary and its figure).

The model is cellfoundry.models.xpressor; inputs and base outputs are in .data, the
LightningModule in .module.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor, nn

from cellfoundry.evaluate.knn import knn_split_accuracy
from cellfoundry.evaluate.reconstruction import ReconstructionScores
from cellfoundry.models.xpressor import Xpressor, XpressorConfig, log1p_normalize, save_xpressor
from cellfoundry.progress import Progress
from cellfoundry.utils import (
    UserError,
    atomic_output,
    autocast,
    seed_everything,
    start_stage,
)
from cellfoundry.xpressor.data import (
    BaseCache,
    CellData,
    XpressorDataModule,
    base_batches,
    cache_bytes,
    cell_loader,
    compute_base_cache,
    load_cell_data,
    resolve_layers,
    split_indices,
    split_outputs,
)
from cellfoundry.xpressor.module import TrainSettings, XpressorModule, freeze_base, unfrozen_base_state

log = logging.getLogger(__name__)

#: Methods compared on held-out cells: Xpressor and two baselines decoding one pooled vector.
METHODS = ("xpressor", "cls", "mean")


@dataclass
class StageSettings:
    """The xpressor config section, split into model and training parts (no defaults: the
    schema's are the only ones)."""

    model: dict
    train: TrainSettings
    baselines: bool
    cache_base_outputs: bool
    cache_max_gb: float
    inference_batch_size: int


#: Config key of the xpressor section -> XpressorConfig field, where they differ (XpressorConfig
#: keeps its field names: they are stored in xpressor/model.ckpt).
MODEL_FIELDS = {"n_layers": "n_blocks", "n_decoder_layers": "n_decoder_blocks"}


def stage_settings(cfg: dict) -> StageSettings:
    """Settings from config["xpressor"] (schema defaults already filled; a missing key raises)."""
    model_keys = (
        "n_latent",
        "d_model",
        "n_layers",
        "n_decoder_layers",
        "n_heads",
        "mlp_ratio",
        "decoder_mlp_ratio",
        "dropout",
        "attention",
        "base_layers",
        "loss",
        "dispersion",
        "log1p_head",
        "mse_weight",
        "label_dim",
        "label_weight",
        "gene_adapter",
        "adapter_hidden",
        "pooled_queries",
    )
    recipe = cfg["train"]
    train = TrainSettings(
        lr=recipe["lr"],
        weight_decay=recipe["weight_decay"],
        batch_size=recipe["batch_size"],
        max_epochs=recipe["max_epochs"],
        patience=recipe["patience"],
        lr_patience=recipe["lr_patience"],
        gradient_clip=recipe["gradient_clip"],
        val_fraction=recipe["val_fraction"],
        eval_max_cells=recipe["eval_max_cells"],
        unfreeze_last_layer=cfg["unfreeze_last_layer"],
        genes_per_step=recipe["genes_per_step"],
    )
    if train.lr_patience is not None and train.lr_patience > train.patience - 2:
        # the rate halves after lr_patience + 1 epochs without progress; training stops after patience
        raise UserError(
            f"xpressor.train.lr_patience ({train.lr_patience}) must be at most xpressor.train.patience - 2 "
            f"({train.patience - 2}), or early stopping ends training before the learning rate is ever "
            "lowered; lower lr_patience, raise patience, or set lr_patience: null for a constant rate."
        )
    return StageSettings(
        model={MODEL_FIELDS.get(k, k): cfg[k] for k in model_keys},
        train=train,
        baselines=recipe["baselines"],
        cache_base_outputs=recipe["cache_base_outputs"],
        cache_max_gb=recipe["cache_max_gb"],
        inference_batch_size=cfg["encode"]["batch_size"],
    )


# -- training -------------------------------------------------------------------------------------
def train_one(
    method: str,
    base: nn.Module,
    gene_table: Tensor,
    data: CellData,
    model: dict,
    settings: TrainSettings,
    work_dir: Path,
    cache: BaseCache | None,
    seed: int,
    trainer_kwargs: dict,
    base_sha256: str | None = None,
) -> XpressorModule:
    """Train one method ("xpressor", "cls" or "mean") and return the module with its best
    (lowest validation loss) weights. Resumes from work_dir when an interrupted run of the same
    configuration left a checkpoint there; a different configuration starts afresh
    (cellfoundry.trainer.fit keys the resume on the module's and the data's hyperparameters). Seeded per method, so that
    each method starts from the same random state whatever ran before it."""
    from cellfoundry.trainer import build_trainer, fit

    seed_everything(seed)  # each method starts from the same random state
    if settings.unfreeze_last_layer:
        base = copy.deepcopy(base)  # each method fine-tunes its own copy of the last layer
    module = XpressorModule(base, gene_table, data.decode_genes, model, asdict(settings), base_sha256)
    cells = XpressorDataModule(data, cache, settings.batch_size, settings.val_fraction, settings.eval_max_cells, seed)
    work_dir = Path(work_dir)
    # every method stops and keeps its weights on the validation reconstruction loss: Xpressor's
    # label cross-entropy overfits early and would stop it before its reconstruction does
    monitor = "val_reconstruction"
    best = ModelCheckpoint(dirpath=work_dir / "best", filename="best", monitor=monitor, mode="min", save_top_k=1)
    trainer = build_trainer(
        work_dir,
        max_epochs=settings.max_epochs,
        gradient_clip_val=settings.gradient_clip,
        callbacks=[EarlyStopping(monitor, patience=settings.patience, mode="min"), best],
        log_every_n_steps=max(1, min(10, len(cells.train_loader))),
        **trainer_kwargs,
    )
    fit(trainer, module, datamodule=cells, out_dir=work_dir)
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state, strict=False)
        log.info("%s: best validation loss %.4f (%s)", method, float(best.best_model_score), best.best_model_path)
    module.epochs_trained = trainer.current_epoch
    module.steps_trained = trainer.global_step
    return module.cpu().eval()


@torch.inference_mode()
def held_out_scores(
    module: XpressorModule, data: CellData, idx: np.ndarray, cache: BaseCache | None, batch_size: int, device: str
) -> dict[str, float]:
    """Reconstruction metrics of cells `idx` (decoded vs observed log1p-normalised expression),
    batch by batch: memory holds one batch's [cells, genes], not all held-out cells'."""
    module = module.to(device).eval()
    scores = ReconstructionScores()
    progress = Progress(len(idx), verb="scored (held out)")
    for batch in cell_loader(data, idx, cache, batch_size):
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        with autocast(device):
            latents = module.forward_latents(batch)
            out = module.xpressor.decode(latents, module.gene_table[module.decode_genes])
        observed = log1p_normalize(batch["counts"].float(), batch["library"].float(), module.xpressor.cfg.target_sum)
        scores.add(out.log1p.float().cpu().numpy(), observed.cpu().numpy())
        progress.update(len(observed))
    module.cpu()
    return scores.summary()


def train_and_measure(
    *,
    base: nn.Module,
    gene_table: Tensor,
    data: CellData,
    base_sha256: str,
    stage: StageSettings,
    checkpoint: str,
    metrics: str,
    work_dir: str,
    seed: int,
    device: str,
    trainer_kwargs: dict,
) -> dict:
    """Train Xpressor (and the pooled baselines), measure held-out reconstruction, write the
    Xpressor checkpoint and the metrics table (long format). Returns the training summary.
    Under DDP every rank trains; only global rank 0 evaluates, writes and returns the summary."""
    import pandas as pd

    from cellfoundry.trainer import is_global_zero

    d_base = int(base.cfg.d_model) if hasattr(base, "cfg") else int(gene_table.shape[1])
    model = dict(stage.model)
    model["base_layers"] = resolve_layers(model["base_layers"], int(base.cfg.nlayers))
    xcfg = XpressorConfig(d_base=d_base, gene_dim=int(gene_table.shape[1]), labels=data.label_classes, **model)
    log.info("reading base layers %s (0 = input tokens) of %d", xcfg.base_layers, base.cfg.nlayers)
    use_cache = stage.cache_base_outputs and not stage.train.unfreeze_last_layer
    n_cache = cache_bytes(data, d_base, device, xcfg.n_base_layers)
    if use_cache and n_cache > stage.cache_max_gb * 2**30:
        log.warning(
            "base outputs would take %.1f GB > xpressor.train.cache_max_gb; running the base every step instead",
            n_cache / 2**30,
        )
        use_cache = False
    freeze_base(base, False)
    cache = (
        compute_base_cache(base, gene_table, data, stage.inference_batch_size, device, xcfg.base_layers)
        if use_cache
        else None
    )

    methods = METHODS if stage.baselines else METHODS[:1]
    _, _, test_idx = split_indices(data.split, stage.train.val_fraction, seed, stage.train.eval_max_cells)
    if len(test_idx) == 0:
        raise UserError("the test split is empty; set qc.test_fraction > 0 to measure held-out reconstruction.")
    rows, summary = [], {"methods": {}}
    xpressor_module = None
    for method in methods:
        values = {**xcfg.to_dict(), "pooling": None if method == "xpressor" else method}
        if method != "xpressor":
            values["labels"] = {}  # baselines reconstruct only; no label tokens
        module = train_one(
            method,
            base,
            gene_table,
            data,
            values,
            stage.train,
            Path(work_dir) / method,
            cache,
            seed,
            trainer_kwargs,
            base_sha256,
        )
        if not is_global_zero():
            continue  # DDP: the other ranks only train; rank 0 measures and writes
        scores = held_out_scores(module, data, test_idx, cache, stage.inference_batch_size, device)
        trainable = sum(p.numel() for p in module.xpressor.parameters() if p.requires_grad)
        base_trainable = sum(v.numel() for v in unfrozen_base_state(module.base).values())
        base_total = sum(p.numel() for p in module.base.parameters())
        summary["methods"][method] = {
            **scores,
            "trainable_parameters": trainable + base_trainable,
            "epochs": int(module.epochs_trained),
            "steps": int(module.steps_trained),
        }
        for name, value in scores.items():
            rows.append({"method": method, "metric": name, "value": value, "split": "test", "n_cells": len(test_idx)})
        log.info("%s held-out reconstruction: %s", method, json.dumps(scores))
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
            all(
                x["pearson_mean"] > summary["methods"][m]["pearson_mean"] and x["mse"] < summary["methods"][m]["mse"]
                for m in ("cls", "mean")
            )
        )
    meta = {"genes": data.gene_symbols, "label_classes": data.label_classes, "training": summary}
    save_xpressor(checkpoint, xpressor_module.xpressor, base_sha256, unfrozen_base_state(xpressor_module.base), meta)
    with atomic_output(metrics) as tmp:
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
    xpressor = xpressor.to(device).eval()
    n, m, dx = data.n_cells, xpressor.cfg.n_tokens, xpressor.cfg.d_model
    embeddings, se_cls = [], []
    progress = Progress(n, verb="encoded")
    with atomic_output(latents_path) as tmp:
        tmp_npy = tmp.with_name(tmp.name + ".npy")  # open_memmap keeps the given name
        out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(n, m, dx))
        for lo, hi, stack, outputs, padding in base_batches(
            base, gene_table, data, batch_size, device, xpressor.cfg.base_layers
        ):
            with autocast(device):
                tokens, mask, cls = split_outputs(stack, outputs, padding)
                latents = xpressor.encode(tokens, mask, cls)
                emb = xpressor.embedding(latents)
                cell = base.embed_from_outputs(outputs) if hasattr(base, "embed_from_outputs") else outputs[:, 0]
            out[lo:hi] = latents.float().cpu().numpy()
            embeddings.append(emb.float().cpu().numpy())
            se_cls.append(cell.float().cpu().numpy())
            progress.update(hi - lo)
        out.flush()
        del out
        tmp_npy.replace(tmp)
    return np.concatenate(embeddings), np.concatenate(se_cls)


# -- rule-level drivers (called by scripts/xpressor_*.py) -----------------------------------------
def _load_base(se_checkpoint: str, vocab: str):
    from cellfoundry.models.se_checkpoint import load_se

    base, _, vocab = load_se(se_checkpoint, gene_embeddings=vocab)
    return base, vocab


def run_xpressor_train(
    *,
    se_checkpoint: str,
    vocab: str,
    tokens: str,
    h5ad: str,
    checkpoint: str,
    metrics: str,
    work_dir: str,
    settings: dict,
    label_columns: list[str],
    seed: int,
    device: str,
    threads: int | None = None,
) -> dict:
    """Rule xpressor_train: load base, vocabulary and cells, train Xpressor and the baselines
    (`settings` = config["xpressor"]), write the checkpoint and the held-out metrics table."""
    from cellfoundry.utils import file_sha256

    device = start_stage(seed, device, threads)
    base, gene_vocab = _load_base(se_checkpoint, vocab)
    data = load_cell_data(h5ad, tokens, gene_vocab, label_columns)
    log.info(
        "%d cells (%d train, %d test), %d decoded genes, labels %s, device %s",
        data.n_cells,
        int((data.split == "train").sum()),
        int((data.split == "test").sum()),
        len(data.decode_genes),
        list(data.label_classes),
        device,
    )
    trainer = settings["trainer"]
    trainer_kwargs = dict(
        devices=trainer["devices"],
        num_nodes=trainer["num_nodes"],
        device=device,
        checkpoint_every_n_steps=trainer["checkpoint_every_n_steps"],
    )
    return train_and_measure(
        base=base,
        gene_table=gene_vocab.table,
        data=data,
        base_sha256=file_sha256(se_checkpoint),
        stage=stage_settings(settings),
        checkpoint=checkpoint,
        metrics=metrics,
        work_dir=work_dir,
        seed=seed,
        device=device,
        trainer_kwargs=trainer_kwargs,
    )


def run_xpressor_encode(
    *,
    se_checkpoint: str,
    vocab: str,
    tokens: str,
    h5ad: str,
    xpressor_checkpoint: str,
    train_metrics: str,
    latents: str,
    embedding: str,
    summary: str,
    plot: str,
    settings: dict,
    knn_k: int,
    seed: int,
    device: str,
    threads: int | None = None,
) -> dict:
    """Rule xpressor_encode: latents of every cell (`latents`, .npy), X_xpressor (`embedding`,
    .h5ad), kNN label accuracy beside the SE CLS embedding, the stage `summary` (JSON) and its
    `plot` beside the training's held-out table `train_metrics`. `settings` (config["xpressor"])
    gives encode.batch_size and goes into the provenance record of the embedding."""
    import anndata as ad
    import pandas as pd

    from cellfoundry.models.xpressor import load_xpressor
    from cellfoundry.plots import xpressor_summary
    from cellfoundry.provenance import KEY as PROVENANCE_KEY
    from cellfoundry.provenance import provenance

    device = start_stage(seed, device, threads)
    base, gene_vocab = _load_base(se_checkpoint, vocab)
    ckpt = load_xpressor(xpressor_checkpoint, base_checkpoint=se_checkpoint)
    if ckpt.base_state_dict:
        base.load_state_dict(ckpt.base_state_dict, strict=False)
        log.info("applied %d fine-tuned base tensors from %s", len(ckpt.base_state_dict), xpressor_checkpoint)
    labels = list(ckpt.meta.get("label_classes", {}))
    data = load_cell_data(h5ad, tokens, gene_vocab, labels, counts=False)
    batch_size = settings["encode"]["batch_size"]
    cells, se_cls = encode_cells(base, ckpt.model, gene_vocab.table, data, latents, batch_size, device)

    obs = ad.read_h5ad(h5ad, backed="r").obs.copy()
    out = ad.AnnData(obs=obs)
    out.obsm["X_xpressor"] = cells.astype(np.float32)
    out.uns["xpressor"] = {
        "embedding": "label token bottleneck" if labels else "mean of latent tokens",
        "labels": labels,
    }
    out.uns[PROVENANCE_KEY] = provenance(
        "xpressor_encode",
        settings,
        checkpoints={"se": se_checkpoint, "xpressor": xpressor_checkpoint},
        vocab=vocab,
        inputs={"cells": h5ad, "tokens": tokens},
    )
    with atomic_output(embedding) as tmp:
        out.write_h5ad(tmp)

    train = np.flatnonzero(data.split == "train")
    test = np.flatnonzero(data.split == "test")
    knn = {}
    for col, codes in data.labels.items():
        knn[col] = {
            "xpressor": knn_split_accuracy(cells, codes, train, test, knn_k),
            "se_cls": knn_split_accuracy(se_cls, codes, train, test, knn_k),
        }
        log.info(
            "kNN accuracy of %s on test cells: X_xpressor %.3f, SE CLS %.3f",
            col,
            knn[col]["xpressor"],
            knn[col]["se_cls"],
        )
    training = ckpt.meta.get("training", {})
    result = {
        **{k: v for k, v in training.items() if k != "methods"},
        "methods": training.get("methods", {}),
        "knn_accuracy": knn,
        "knn_k": knn_k,
        "n_latent_tokens": ckpt.config.n_tokens,
        "latent_dim": ckpt.config.d_model,
        "embedding_dim": int(cells.shape[1]),
        "config": ckpt.config.to_dict() | {"labels": {k: len(v) for k, v in ckpt.config.labels.items()}},
    }
    with atomic_output(summary) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    xpressor_summary(plot, pd.read_csv(train_metrics, sep="\t"), knn)
    return result
