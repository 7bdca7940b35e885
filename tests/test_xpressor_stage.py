"""Stage-level test of Xpressor: tiny SE checkpoint + vocabulary + tokens + h5ad on disk, then the
training and encoding drivers the rules call (CPU, a few epochs)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfoundry.models.se import SEConfig, StateEmbedding
from cellfoundry.models.se_checkpoint import save_se
from cellfoundry.models.xpressor import decode_expression, load_xpressor
from cellfoundry.tokenize import tokenize_h5ad
from cellfoundry.utils import UserError, file_sha256
from cellfoundry.vocab import build_random_vocab
from cellfoundry.xpressor import resolve_label_columns, run_xpressor_encode, run_xpressor_train

N_CELLS, N_GENES, L, E = 60, 30, 17, 16


def stage_cfg(train: dict | None = None, encode: dict | None = None, **kw) -> dict:
    """A full config["xpressor"] section; `train` / `encode` update those subsections, `kw` the
    top-level keys."""
    # log1p_head off: in 9 steps the NB term alone hardly moves the mean, and the tests below
    # check the stage's mechanics (the head is tested in test_xpressor.py); two layers read.
    cfg = dict(
        n_latent=4,
        d_model=16,
        n_layers=1,
        n_decoder_layers=1,
        n_heads=2,
        mlp_ratio=2,
        decoder_mlp_ratio=1,
        dropout=0.0,
        attention="standard",
        base_layers=[0, -1],
        loss="nb",
        dispersion="gene",
        log1p_head=False,
        mse_weight=1.0,
        labels=["cell_type"],
        label_dim=4,
        label_weight=1.0,
        gene_adapter=False,
        adapter_hidden=16,
        pooled_queries=True,
        unfreeze_last_layer=False,
        train=dict(
            lr=3e-3,
            weight_decay=0.01,
            batch_size=16,
            max_epochs=3,
            genes_per_step=20,
            patience=3,
            lr_patience=1,  # the plateau scheduler's state is part of what a resume restores
            gradient_clip=1.0,
            val_fraction=0.2,
            eval_max_cells=None,
            baselines=True,
            cache_base_outputs=True,
            cache_max_gb=1.0,
        ),
        encode=dict(batch_size=32, knn_k=5),
        trainer={"devices": 1, "num_nodes": 1, "checkpoint_every_n_steps": 5},
    )
    cfg.update(kw)
    cfg["train"].update(train or {})
    cfg["encode"].update(encode or {})
    return cfg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xpressor_stage")
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(N_GENES)]
    types = np.repeat(["a", "b", "c"], N_CELLS // 3)
    programs = rng.gamma(1.0, 2.0, size=(3, N_GENES))
    means = programs[np.repeat(np.arange(3), N_CELLS // 3)]
    counts = rng.poisson(means * 3).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {"ct": pd.Categorical(types), "split": np.where(np.arange(N_CELLS) % 5 == 0, "test", "train")},
        index=[f"c{i}" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
    h5ad = root / "filtered.h5ad"
    adata.write_h5ad(h5ad)
    vocab = build_random_vocab(genes + ["EXTRA1", "EXTRA2"], E, seed=0)
    vocab_path = root / "gene_embeddings.pt"
    vocab.save(vocab_path)
    tokens = root / "tokens"
    tokenize_h5ad(h5ad, tokens, vocab, L, seed=0, source_hash=file_sha256(h5ad))  # as rule tokenize
    torch.manual_seed(0)
    se_cfg = SEConfig(token_dim=E, d_model=32, nhead=4, d_hid=64, nlayers=2, output_dim=32, pad_length=L)
    se_path = root / "pretrained.ckpt"
    save_se(se_path, StateEmbedding(se_cfg), se_cfg)
    other = root / "other.ckpt"
    torch.manual_seed(1)
    save_se(other, StateEmbedding(se_cfg), se_cfg)
    return dict(root=root, h5ad=str(h5ad), vocab=str(vocab_path), tokens=str(tokens), se=str(se_path), other=str(other))


def _train(inputs, out, **kw):
    cfg = stage_cfg(**kw)
    return run_xpressor_train(
        se_checkpoint=inputs["se"],
        vocab=inputs["vocab"],
        tokens=inputs["tokens"],
        h5ad=inputs["h5ad"],
        checkpoint=str(out / "model.ckpt"),
        metrics=str(out / "reconstruction.tsv"),
        work_dir=str(out / "train"),
        settings=cfg,
        label_columns=resolve_label_columns(cfg["labels"], {"cell_type": "ct", "batch": None}),
        seed=0,
        device="cpu",
    )


def test_train_and_encode_stage(inputs, tmp_path):
    summary = _train(inputs, tmp_path)
    assert set(summary["methods"]) == {"xpressor", "cls", "mean"}
    assert 0 < summary["trainable_fraction"] < 1
    assert summary["trainable_parameters"] == summary["methods"]["xpressor"]["trainable_parameters"]
    metrics = pd.read_csv(tmp_path / "reconstruction.tsv", sep="\t")
    assert set(metrics.method) == {"xpressor", "cls", "mean"}
    assert {"pearson_mean", "spearman_mean", "mse"} <= set(metrics.metric)
    assert (metrics.n_cells == N_CELLS // 5).all()
    assert not (tmp_path / "train" / "xpressor" / "checkpoints").exists()  # resume state removed when done
    # an interrupted run resumes only on the same base and cells (resume identity = hyperparameters)
    identity = json.loads((tmp_path / "train" / "xpressor" / "settings_fingerprint.json").read_text())["settings"]
    assert identity["module"]["base_sha256"] == file_sha256(inputs["se"])
    assert identity["data"]["source"] == file_sha256(inputs["h5ad"])

    ckpt = load_xpressor(tmp_path / "model.ckpt", base_checkpoint=inputs["se"])
    assert ckpt.meta["genes"] == [f"G{i}" for i in range(N_GENES)]
    assert ckpt.config.labels == {"ct": ["a", "b", "c"]}
    assert ckpt.base_state_dict == {}
    assert (tmp_path / "model.ckpt").stat().st_size < 200_000  # Xpressor weights only, no base
    with pytest.raises(UserError, match="SHA-256"):
        load_xpressor(tmp_path / "model.ckpt", base_checkpoint=inputs["other"])

    out = dict(
        latents=str(tmp_path / "latents.npy"),
        embedding=str(tmp_path / "embedding.h5ad"),
        summary=str(tmp_path / "summary.json"),
        plot=str(tmp_path / "summary.png"),
    )
    run_xpressor_encode(
        se_checkpoint=inputs["se"],
        vocab=inputs["vocab"],
        tokens=inputs["tokens"],
        h5ad=inputs["h5ad"],
        xpressor_checkpoint=str(tmp_path / "model.ckpt"),
        train_metrics=str(tmp_path / "reconstruction.tsv"),
        settings=stage_cfg(encode={"batch_size": 16}),
        knn_k=5,
        seed=0,
        device="cpu",
        **out,
    )
    latents = np.load(tmp_path / "latents.npy")
    assert latents.shape == (N_CELLS, 4 + 1, 16) and latents.dtype == np.float32
    emb = ad.read_h5ad(tmp_path / "embedding.h5ad")
    assert emb.n_obs == N_CELLS and emb.obsm["X_xpressor"].shape == (N_CELLS, 4)
    assert list(emb.obs_names) == [f"c{i}" for i in range(N_CELLS)]
    stage = json.loads((tmp_path / "summary.json").read_text())
    assert set(stage["knn_accuracy"]["ct"]) == {"xpressor", "se_cls"}
    assert stage["methods"]["xpressor"]["pearson_mean"] > 0
    assert (tmp_path / "summary.png").stat().st_size > 0

    # The public decoder reproduces the training-time prediction from the saved latents alone.
    from cellfoundry.vocab import GeneVocab

    vocab = GeneVocab.load(inputs["vocab"])
    genes = torch.as_tensor(vocab.lookup(ckpt.meta["genes"]))
    pred = decode_expression(ckpt.model, torch.from_numpy(latents[:3]), genes, vocab.table)
    assert pred.shape == (3, N_GENES) and torch.isfinite(pred).all()

    # Deterministic on the CPU: a second run gives identical weights.
    again = tmp_path / "again"
    _train(inputs, again, train={"baselines": False})
    first = load_xpressor(tmp_path / "model.ckpt").model.state_dict()
    second = load_xpressor(again / "model.ckpt").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_label_column_is_a_user_error(inputs, tmp_path):
    with pytest.raises(UserError, match="not_a_column"):
        _train(inputs, tmp_path, labels=["not_a_column"], train={"baselines": False})


def test_resolve_label_columns_maps_roles():
    ds = {"cell_type": "bulk_labels", "batch": None}
    assert resolve_label_columns(["cell_type", "batch", "donor"], ds) == ["bulk_labels", "donor"]


@pytest.mark.parametrize(
    "stop",
    [(14, "signal"), (20, "signal-in-validation"), (11, "crash")],
    ids=["signal", "signal-in-validation", "crash-after-checkpoint-before-validation"],
)
def test_interrupted_training_resumes_to_the_uninterrupted_result(inputs, tmp_path, monkeypatch, stop):
    """xpressor_train stopped (SIGTERM mid-epoch; SIGTERM during the validation after step 20;
    a crash after the step-10 checkpoint, which precedes epoch 0's validation) and re-run gives
    the uninterrupted run's weights (every tensor equal) and loss and validation rows. Not the
    training epoch means (train_*_epoch) of the epoch it resumed in: Lightning keeps no running
    sums in checkpoints, so they average the batches after the resume (none: no row)."""
    from test_preemption import assert_same_weights, interrupted

    from cellfoundry.trainer import read_metrics

    # 10 batches per epoch, 3 validation batches, a checkpoint every 10 steps, 30 steps
    settings = dict(
        train={"baselines": False, "max_epochs": 3, "batch_size": 4},
        trainer={**stage_cfg()["trainer"], "checkpoint_every_n_steps": 10},
    )
    _train(inputs, tmp_path / "reference", **settings)
    interrupted(monkeypatch, *stop, lambda: _train(inputs, tmp_path / "resumed", **settings))
    _train(inputs, tmp_path / "resumed", **settings)
    reference = load_xpressor(tmp_path / "reference" / "model.ckpt").model.state_dict()
    assert_same_weights(load_xpressor(tmp_path / "resumed" / "model.ckpt").model.state_dict(), reference)
    expected, got = (read_metrics(tmp_path / run / "train" / "xpressor") for run in ("reference", "resumed"))
    assert list(expected.dropna(subset=["train_loss_step"])["step"]) == list(range(9, 30, 10))  # a row every 10 steps
    assert list(expected.dropna(subset=["val_loss"])["step"]) == [9, 19, 29]  # one validation per epoch
    epoch_means = [c for c in expected if c.startswith("train_") and c.endswith("_epoch")]

    def without_epoch_means(table):
        table = table.drop(columns=epoch_means)
        return table.dropna(how="all", subset=[c for c in table if c not in ("step", "epoch")]).reset_index(drop=True)

    pd.testing.assert_frame_equal(without_epoch_means(got), without_epoch_means(expected))
    if stop[1] == "crash":  # the resumed attempt ran epoch 0's validation itself
        second = pd.read_csv(tmp_path / "resumed" / "train" / "xpressor" / "logs" / "version_1" / "metrics.csv")
        assert 9 in set(second.dropna(subset=["val_loss"])["step"])
