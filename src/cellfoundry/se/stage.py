"""The SE stage's rule entry points: pretrain_se, random_se, link_se_checkpoint, embed,
embed_gather, embed_knn and embed_umap. Each `run_<rule>` resolves the device, sets torch's
threads and the seed before any work."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np

from cellfoundry.models.se import SEConfig
from cellfoundry.utils import UserError, atomic_output, resolve_device, set_torch_threads, start_stage

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def se_config_from(settings: dict, token_dim: int, pad_length: int, num_datasets: int) -> SEConfig:
    """SEConfig from the config's `se` section and the data's sizes (SEConfig keeps SE-600M's
    field names: config n_heads -> nhead, n_layers -> nlayers)."""
    return SEConfig(
        token_dim=token_dim,
        d_model=settings["d_model"],
        nhead=settings["n_heads"],
        d_hid=settings["d_hid"],
        nlayers=settings["n_layers"],
        output_dim=settings["output_dim"],
        dropout=settings["dropout"],
        pad_length=pad_length,
        encoding=settings["encoding"],
        num_datasets=num_datasets,
    )


# ---------------------------------------------------------------------------- pretraining


def run_pretrain_se(
    tokens: Sequence[PathLike],
    h5ad: Sequence[PathLike],
    vocab: PathLike,
    checkpoint: PathLike,
    losses: PathLike,
    work_dir: PathLike,
    settings: dict,
    seed: int,
    device: str = "auto",
    threads: int | None = None,
    datasets: Sequence[str] | None = None,
    datasets_record: PathLike | None = None,
    log_path: PathLike | None = None,
) -> None:
    """Rule pretrain_se: train an SE model (config section `se`, as `settings`) on the train
    splits of the datasets with token dirs `tokens` and QC outputs `h5ad` (same order).

    With se.trainer devices x num_nodes > 1 inside a SLURM job, launch.run_stage starts one process
    per GPU (srun) that each run `train_se`; otherwise it runs here, with `threads` torch threads.
    `datasets_record` (optional) receives the JSON list `datasets` of the datasets trained on."""
    from cellfoundry.launch import run_stage

    device = resolve_device(device)
    log.info("pretraining on datasets %s", list(datasets or []))
    kwargs = dict(
        tokens=[str(p) for p in tokens],
        h5ad=[str(p) for p in h5ad],
        vocab=str(vocab),
        checkpoint=str(checkpoint),
        losses=str(losses),
        work_dir=str(work_dir),
        settings=dict(settings),
        seed=seed,
        device=device,
    )
    run_stage(
        train_se,
        kwargs,
        trainer=settings["trainer"],
        log_path=log_path,
        threads=threads,
        trainer_key="se.trainer",
        resources_key="resources.pretrain_se",
    )
    if datasets_record is not None:
        # with se.pretrain.datasets null, later runs keep training on this list (workflow/rules/common.smk)
        with atomic_output(datasets_record) as tmp:
            tmp.write_text(json.dumps(list(datasets or [])))


def train_se(tokens, h5ad, vocab, checkpoint, losses, work_dir, settings: dict, seed: int, device: str) -> None:
    """One process (a DDP rank, or the only one) of pretrain_se: train and write the model in the
    SE-600M checkpoint layout to `checkpoint`, with the loss curve in `losses` (TSV).

    Lightning keeps resumable checkpoints in `work_dir/checkpoints` while training; they are
    removed after a finished run, so that a forced re-run starts afresh, and an interrupted run
    is resumed only with unchanged settings (cellfoundry.trainer.fit). Under DDP every rank runs
    this function, so each seeds itself here; only global rank 0 writes the outputs."""
    import torch

    from cellfoundry.models.se_checkpoint import save_se
    from cellfoundry.se.data import PretrainDataModule, check_tokens_match_model, load_pretraining_cells
    from cellfoundry.se.module import PretrainConfig, SEPretrainModule
    from cellfoundry.trainer import build_trainer, fit, read_metrics
    from cellfoundry.vocab import GeneVocab

    start_stage(seed)
    gene_vocab = GeneVocab.load(vocab)
    cells, length, method, sources = load_pretraining_cells(tokens, h5ad, gene_vocab)
    check_tokens_match_model(method, settings["encoding"], tokens[0])
    cfg = se_config_from(settings, gene_vocab.dim, length, len(tokens))
    train_cfg = PretrainConfig(**settings["pretrain"])
    log.info("pretraining %s on %d cells for %d steps", cfg, len(cells), train_cfg.max_steps)
    module = SEPretrainModule(asdict(cfg), asdict(train_cfg), gene_vocab.table, torch.from_numpy(cells.gene_cols))
    trainer_cfg = settings["trainer"]
    trainer = build_trainer(
        work_dir,
        max_steps=train_cfg.max_steps,
        devices=trainer_cfg["devices"],
        num_nodes=trainer_cfg["num_nodes"],
        device=device,
        checkpoint_every_n_steps=trainer_cfg["checkpoint_every_n_steps"],
        log_every_n_steps=max(1, min(10, train_cfg.max_steps // 20)),
    )
    # resumed only by a run of the same model, objective, data and seed (the hyperparameters of both)
    data = PretrainDataModule(
        cells,
        train_cfg.batch_size,
        seed,
        train_cfg.num_workers,
        sources=sources,
        vocab_hash=gene_vocab.hash,
    )
    fit(trainer, module, datamodule=data, out_dir=work_dir)
    if not trainer.is_global_zero:
        return
    save_se(
        checkpoint,
        module.model,
        cfg,
        training_state=module.heads.state_dict(),
        gene_embeddings=str(vocab),
        gene_table=gene_vocab.table,
    )
    metrics = read_metrics(work_dir)  # every attempt's rows, when the run was interrupted and resumed
    table = metrics[[c for c in ("step", "train_loss", "expr_loss", "dataset_loss") if c in metrics]].dropna(
        subset=["train_loss"]
    )
    with atomic_output(losses) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    shutil.rmtree(Path(work_dir) / "checkpoints", ignore_errors=True)
    log.info("wrote %s (final loss %.4f)", checkpoint, float(table["train_loss"].iloc[-1]))


def run_random_se(
    se_checkpoint: PathLike, vocab: PathLike, checkpoint: PathLike, seed: int, allow_unsafe_pickle: bool = False
) -> None:
    """Rule random_se: an untrained model of `se_checkpoint`'s architecture (seeded init), in the
    same layout, as the baseline."""
    from cellfoundry.models.se import StateEmbedding, TrainingHeads
    from cellfoundry.models.se_checkpoint import config_from_checkpoint, read_checkpoint_file, save_se
    from cellfoundry.vocab import GeneVocab

    start_stage(seed)  # reading the checkpoint draws no random numbers: the init sees this seed
    cfg = config_from_checkpoint(read_checkpoint_file(se_checkpoint, allow_unsafe_pickle=allow_unsafe_pickle))
    model, heads = StateEmbedding(cfg), TrainingHeads(cfg)
    gene_vocab = GeneVocab.load(vocab)
    save_se(
        checkpoint,
        model,
        cfg,
        training_state=heads.state_dict(),
        gene_embeddings=str(vocab),
        gene_table=gene_vocab.table,
    )
    log.info("wrote random-weights SE model %s (%s)", checkpoint, cfg)


def run_link_se_checkpoint(folder: PathLike, checkpoint: PathLike, allow_unsafe_pickle: bool = False) -> None:
    """Rule link_se_checkpoint: `checkpoint` becomes a symbolic link to the user's SE checkpoint
    in `folder` (SE-600M is several GB), opened (safely) first so that a wrong folder fails here."""
    from cellfoundry.models.se_checkpoint import link_checkpoint

    link_checkpoint(folder, checkpoint, allow_unsafe_pickle)
    log.info("linked %s", checkpoint)


# ---------------------------------------------------------------------------- embedding


def run_embed(
    se_checkpoint: PathLike,
    vocab: PathLike,
    tokens: PathLike,
    h5ad: PathLike,
    embedding: PathLike,
    settings: dict,
    device: str = "auto",
    threads: int | None = None,
    shards: int = 1,
    shard: int | None = None,
    allow_unsafe_pickle: bool = False,
) -> None:
    """Rule embed: embed a dataset's tokens with the SE checkpoint `se_checkpoint`, in batches of
    settings["batch_size"] (`settings`: the config's `embed` section).

    shard None: write `embedding` as .h5ad (obs of `h5ad`, obsm["X_state"], its provenance with
    `settings` in uns); else write shard `shard` of `shards` (0-based) as a float32 .npy for
    embed_gather."""
    from cellfoundry.models.se_checkpoint import load_se
    from cellfoundry.se.data import check_tokens_match_model
    from cellfoundry.se.embed import embed_provenance, embed_shard_to_npy, embed_to_h5ad, read_obs, shard_rows
    from cellfoundry.tokenize import read_tokens

    device = resolve_device(device)
    set_torch_threads(threads)
    batch_size = settings["batch_size"]
    model, cfg, gene_vocab = load_se(se_checkpoint, gene_embeddings=vocab, allow_unsafe_pickle=allow_unsafe_pickle)
    token_arrays = read_tokens(tokens, vocab_hash=gene_vocab.hash)
    check_tokens_match_model(token_arrays.attrs.get("method", "se"), cfg.encoding, tokens)
    log.info(
        "embedding %d cells (L=%d) on %s, batch size %d", len(token_arrays), token_arrays.attrs["L"], device, batch_size
    )
    ids, values = token_arrays.gene_ids, token_arrays.values
    if shard is None:
        uns = embed_provenance(se_checkpoint, vocab, h5ad, tokens, settings)
        embed_to_h5ad(model, ids, values, gene_vocab.table, read_obs(h5ad), embedding, batch_size, device, uns=uns)
    else:
        rows = shard_rows(len(token_arrays), shards, shard, align=batch_size)
        log.info("shard %d/%d: cells %d..%d", shard + 1, shards, rows.start, rows.stop)
        embed_shard_to_npy(model, ids, values, gene_vocab.table, rows, embedding, batch_size, device)


def run_embed_gather(
    shards: Sequence[PathLike],
    h5ad: PathLike,
    embedding: PathLike,
    se_checkpoint: PathLike,
    vocab: PathLike,
    tokens: PathLike,
    settings: dict,
) -> None:
    """Rule embed_gather: concatenate the embedding `shards`, in order, into one .h5ad with the
    obs of `h5ad` and the provenance run_embed records for the whole dataset."""
    from cellfoundry.se.embed import embed_provenance, gather_shards, read_obs

    uns = embed_provenance(se_checkpoint, vocab, h5ad, tokens, settings)
    gather_shards(list(shards), read_obs(h5ad), embedding, uns=uns)


# ---------------------------------------------------------------------------- reports


def run_embed_knn(
    embeddings: dict[str, PathLike],
    h5ad: PathLike,
    metrics: PathLike,
    label: str | None,
    k: int = 15,
    pca_components: int = 50,
    max_cells: int = 20000,
    seed: int = 0,
) -> dict:
    """Rule embed_knn: kNN label transfer (stratified 5-fold, evaluate.knn) of obs[label] from
    each embedding {name: .h5ad}, beside PCA of the counts (evaluate.baselines), written to
    `metrics` as JSON: "accuracy" and "macro_f1" {name: value}. At most `max_cells` cells (seeded
    subsample). Unlabelled cells (NaN / empty label) are left out and counted ("n_unlabelled");
    without labels the JSON says why the accuracy was skipped ("skipped")."""
    from cellfoundry.evaluate.baselines import pca_baseline
    from cellfoundry.evaluate.embedding import label_skip_reason
    from cellfoundry.evaluate.knn import knn_label_transfer
    from cellfoundry.se.embed import read_embedding_rows, report_rows
    from cellfoundry.utils import unlabelled

    start_stage(seed)
    folds = 5
    cells = ad.read_h5ad(h5ad, backed="r")
    rows = report_rows(cells.n_obs, max_cells, seed)
    result: dict = {"label": label, "n_cells": int(len(rows)), "k": k, "folds": folds, "accuracy": {}, "macro_f1": {}}
    if label is not None and label not in cells.obs:
        raise UserError(f"obs of {h5ad} has no column {label!r}; fix datasets.<name>.cell_type.")
    y = cells.obs[label].iloc[rows].to_numpy(dtype=object) if label is not None else None
    result["n_unlabelled"] = int(unlabelled(y).sum()) if y is not None else int(len(rows))
    reason = label_skip_reason(y)
    if reason:
        result["skipped"] = f"kNN label accuracy: {reason}"
        log.warning("kNN label accuracy skipped: %s", reason)
    else:
        keep = ~unlabelled(y)
        y = y[keep].astype(str)
        features = {name: read_embedding_rows(path, rows)[keep] for name, path in embeddings.items()}
        counts = cells.X[rows] if len(rows) < cells.n_obs else cells.to_memory().X
        X_pca = pca_baseline(ad.AnnData(X=counts), n_pcs=pca_components, seed=seed)
        features[f"pca{X_pca.shape[1]}"] = X_pca[keep]
        for name, X in features.items():
            scores = knn_label_transfer(X, y, k=k, n_folds=folds, seed=seed)
            result["accuracy"][name], result["macro_f1"][name] = scores["knn_accuracy"], scores["knn_macro_f1"]
        log.info("kNN accuracy on %s: %s", label, ", ".join(f"{n} {v:.3f}" for n, v in result["accuracy"].items()))
    with atomic_output(metrics) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


def run_embed_umap(
    embedding: PathLike, plot: PathLike, labels: Sequence[str], max_cells: int = 20000, seed: int = 0
) -> None:
    """Rule embed_umap: UMAP of the embedding's obsm["X_state"], one panel per obs column in
    `labels` (at most `max_cells` cells, a seeded subsample)."""
    from cellfoundry import plots
    from cellfoundry.se.embed import EMBED_KEY, read_embedding_rows, read_obs, report_rows

    start_stage(seed)
    obs = read_obs(embedding)
    rows = report_rows(len(obs), max_cells, seed)
    missing = [c for c in labels if c not in obs]
    if missing:
        raise UserError(f"obs of {embedding} has no column {missing[0]!r}; fix datasets.<name>.cell_type / batch.")
    colour_by = {c: obs[c].iloc[rows].astype(str).to_numpy() for c in labels} or {"cells": np.full(len(rows), "cell")}
    X = read_embedding_rows(embedding, rows)
    plots.umap_scatter(plot, X, colour_by, seed=seed, title=f"{Path(embedding).stem} embedding ({EMBED_KEY})")
