"""SE pretraining: objective pieces, a tiny end-to-end run, the random-weights baseline."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfoundry.models.se import energy_distance
from cellfoundry.models.se_checkpoint import load_se, read_checkpoint_file
from cellfoundry.se.data import sample_task_genes, subsample_sentence
from cellfoundry.se.stage import run_pretrain_se, run_random_se
from cellfoundry.tokenize import tokenize_h5ad
from cellfoundry.vocab import build_random_vocab

SE_CFG = dict(
    model_folder=None,
    allow_unsafe_pickle=False,
    encoding="se",
    d_model=16,
    n_heads=2,
    d_hid=32,
    n_layers=1,
    output_dim=8,
    dropout=0.0,
    pretrain=dict(
        max_steps=40,
        batch_size=16,
        lr=3e-3,
        weight_decay=0.01,
        warmup_steps=4,
        loss="mse",
        P=8,
        N=8,
        S=4,
        dataset_loss_weight=0.1,
        num_workers=0,
        sentence_genes=12,
    ),
    trainer=dict(devices=1, num_nodes=1, checkpoint_every_n_steps=20),
)


def test_energy_distance_is_zero_for_equal_sets_and_grows_with_shift():
    x = torch.randn(3, 20)
    torch.testing.assert_close(energy_distance(x, x[:, torch.randperm(20)]), torch.zeros(3), atol=1e-6, rtol=0)
    near, far = energy_distance(x, x + 0.5), energy_distance(x, x + 3.0)
    assert (near > 0).all() and (far > near).all()


def test_task_genes_are_expressed_unexpressed_and_shared():
    g = torch.Generator().manual_seed(0)
    expr = torch.zeros(4, 30)
    expr[:, :10] = torch.rand(4, 10, generator=g) + 0.1
    measured = torch.ones(4, 30, dtype=torch.bool)
    measured[:, 25:] = False  # genes this dataset does not measure
    task = sample_task_genes(expr, measured, P=6, N=5, S=3, generator=g)
    assert task.shape == (4, 14)
    assert (task[:, :6] < 10).all()  # expressed
    assert ((task[:, 6:11] >= 10) & (task[:, 6:11] < 25)).all()  # unexpressed but measured
    assert (task[:, 11:] == task[0, 11:]).all() and (task[:, 11:] < 25).all()  # shared by the batch


def test_sentence_subsample_keeps_cls_and_prefers_genes_over_padding():
    ids = torch.tensor([[-2, 5, 6, 7, -1, -1], [-2, 1, 2, -1, -1, -1]])
    vals = ids.float() * 10
    sub_ids, sub_vals = subsample_sentence(ids, vals, 2, torch.Generator().manual_seed(0))
    assert sub_ids.shape == (2, 3) and (sub_ids[:, 0] == -2).all()
    assert (sub_ids[:, 1:] >= 0).all()  # padding drawn last
    torch.testing.assert_close(sub_vals, sub_ids.float() * 10)  # values travel with their genes


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    """90 cells of 3 types (disjoint marker programs) x 60 genes, tokenized (L = 24)."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    kinds = np.repeat(["t0", "t1", "t2"], 30)
    rates = np.full((90, 60), 0.3)
    for k in range(3):
        rates[kinds == f"t{k}", 20 * k : 20 * k + 20] = 6.0
    counts = rng.poisson(rates).astype(np.float32)
    genes = [f"G{i}" for i in range(60)]
    obs = pd.DataFrame(
        {"kind": kinds, "split": np.where(np.arange(90) % 5 == 0, "test", "train")}, index=[f"c{i}" for i in range(90)]
    )
    cells = root / "filtered.h5ad"
    ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(cells)
    vocab = build_random_vocab(genes, 16, seed=0)
    vocab_path = root / "genes.pt"
    vocab.save(vocab_path)
    tokens = root / "tokens"
    tokenize_h5ad(cells, tokens, vocab, 24, "se", seed=0)
    return dict(root=root, cells=cells, vocab=vocab_path, tokens=tokens)


def pretrain(data: dict, out: Path, **overrides) -> Path:
    se = {**SE_CFG, "pretrain": {**SE_CFG["pretrain"], **overrides}}
    run_pretrain_se(
        [data["tokens"]],
        [data["cells"]],
        data["vocab"],
        out / "pretrained.ckpt",
        out / "losses.tsv",
        out / "work",
        se,
        0,
        "cpu",
    )
    return out


@pytest.mark.parametrize("loss", ["mse", "energy"])
def test_pretraining_lowers_its_loss_and_writes_an_se_checkpoint(tiny_data, tmp_path, loss):
    out = pretrain(tiny_data, tmp_path, loss=loss)
    losses = pd.read_csv(out / "losses.tsv", sep="\t")
    assert len(losses) >= 4
    assert losses["train_loss"].tail(3).mean() < 0.8 * losses["train_loss"].head(2).mean()
    assert not (out / "work" / "checkpoints").exists()  # a finished run leaves nothing to resume
    assert (out / "work" / "settings_fingerprint.json").exists()  # an interrupted one resumes only with these settings
    model, cfg, vocab = load_se(out / "pretrained.ckpt", gene_embeddings=tiny_data["vocab"])
    assert (cfg.d_model, cfg.nlayers, cfg.pad_length, cfg.token_dim) == (16, 1, 24, 16)
    keys = read_checkpoint_file(out / "pretrained.ckpt")["state_dict"].keys()
    for prefix in ("binary_decoder.2.", "dataset_encoder.4.", "gene_embedding_layer.0.", "pe_embedding."):
        assert any(k.startswith(prefix) for k in keys), prefix


def test_pretraining_is_deterministic_on_cpu(tiny_data, tmp_path):
    a = pretrain(tiny_data, tmp_path / "a", max_steps=6)
    b = pretrain(tiny_data, tmp_path / "b", max_steps=6)
    sa = read_checkpoint_file(a / "pretrained.ckpt")["state_dict"]
    sb = read_checkpoint_file(b / "pretrained.ckpt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_model_has_the_same_architecture_and_seeded_weights(tiny_data, tmp_path):
    out = pretrain(tiny_data, tmp_path, max_steps=4)
    for name in ("r1", "r2"):
        run_random_se(out / "pretrained.ckpt", tiny_data["vocab"], out / f"{name}.ckpt", seed=7)
    trained = read_checkpoint_file(out / "pretrained.ckpt")["state_dict"]
    r1 = read_checkpoint_file(out / "r1.ckpt")["state_dict"]
    r2 = read_checkpoint_file(out / "r2.ckpt")["state_dict"]
    assert {k: v.shape for k, v in r1.items()} == {k: v.shape for k, v in trained.items()}
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    assert not torch.equal(r1["encoder.0.weight"], trained["encoder.0.weight"])
    assert (
        load_se(out / "r1.ckpt", gene_embeddings=tiny_data["vocab"])[1]
        == load_se(out / "pretrained.ckpt", gene_embeddings=tiny_data["vocab"])[1]
    )


@pytest.mark.parametrize("stop", [(6, "signal"), (9, "crash")], ids=["signal", "crash-after-checkpoint"])
def test_interrupted_pretraining_resumes_to_the_uninterrupted_result(tiny_data, tmp_path, monkeypatch, stop):
    """pretrain_se stopped at a step (SIGTERM; a crash one step after the step-8 checkpoint) and
    re-run writes the uninterrupted run's weights (every tensor equal) and its whole loss table,
    each step once. Dropout and sentence subsampling are on, so every random stream counts."""
    from test_preemption import assert_same_weights, interrupted

    se = {
        **SE_CFG,
        "dropout": 0.1,
        "pretrain": {**SE_CFG["pretrain"], "max_steps": 12},  # 4 batches per epoch
        "trainer": {**SE_CFG["trainer"], "checkpoint_every_n_steps": 4},
    }

    def run(out: Path) -> None:
        run_pretrain_se(
            [tiny_data["tokens"]],
            [tiny_data["cells"]],
            tiny_data["vocab"],
            out / "pretrained.ckpt",
            out / "losses.tsv",
            out / "work",
            se,
            0,
            "cpu",
        )

    run(tmp_path / "reference")
    interrupted(monkeypatch, *stop, lambda: run(tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "losses.tsv").exists()
    run(tmp_path / "resumed")
    reference, resumed = (
        read_checkpoint_file(tmp_path / d / "pretrained.ckpt")["state_dict"] for d in ("reference", "resumed")
    )
    assert_same_weights(resumed, reference)
    expected = pd.read_csv(tmp_path / "reference" / "losses.tsv", sep="\t")
    assert list(expected["step"]) == list(range(12))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed" / "losses.tsv", sep="\t"), expected)
