"""SE checkpoint IO: parity with the reference's embeddings, safe loading, strictness, layout."""

from __future__ import annotations

import argparse
import pickle
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from cellfoundry.models.se import SEConfig, StateEmbedding, TrainingHeads
from cellfoundry.models.se_checkpoint import (
    link_checkpoint,
    load_se,
    read_checkpoint_file,
    save_se,
)
from cellfoundry.tokenize import tokenize_anndata
from cellfoundry.utils import UserError

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "se_reference"  # from shared/fixtures/se_reference (arc-state 0.11.1, fp32 CPU)
CKPT = DATA / "se_reference.ckpt"
GENES = FIXTURE / "protein_embeddings.pt"


def embed_fixture_cells(model, cfg, vocab) -> np.ndarray:
    tokens = tokenize_anndata(ad.read_h5ad(FIXTURE / "cells.h5ad"), vocab, cfg.pad_length, "se", seed=0)
    with torch.inference_mode():
        return model(
            torch.from_numpy(tokens.gene_ids.astype(np.int64)), torch.from_numpy(tokens.values), vocab.table
        ).numpy()


def test_embeddings_equal_the_reference_implementation():
    model, cfg, vocab = load_se(CKPT, gene_embeddings=GENES)
    assert (cfg.token_dim, cfg.d_model, cfg.nhead, cfg.d_hid, cfg.nlayers, cfg.output_dim, cfg.pad_length) == (
        32,
        64,
        4,
        128,
        2,
        48,
        16,
    )
    ours = embed_fixture_cells(model, cfg, vocab)
    reference = np.load(FIXTURE / "reference.npy")
    assert ours.shape == reference.shape == (8, 58)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_plain_weights_only_load_refuses_the_file_but_ours_reads_it():
    with pytest.raises(pickle.UnpicklingError):
        torch.load(CKPT, weights_only=True)
    ckpt = read_checkpoint_file(CKPT)
    assert "state_dict" in ckpt and "cfg" in ckpt["hyper_parameters"]


def test_unknown_pickled_class_needs_the_opt_in(tmp_path):
    ckpt = read_checkpoint_file(CKPT)
    ckpt["hyper_parameters"]["extra"] = argparse.Namespace(a=1)  # not on the allow-list
    path = tmp_path / "odd.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="allow_unsafe_pickle"):
        load_se(path, gene_embeddings=GENES)
    model, cfg, _ = load_se(path, gene_embeddings=GENES, allow_unsafe_pickle=True)
    assert cfg.d_model == 64


def test_model_folder_loads_like_state_emb_transform(tmp_path):
    folder = tmp_path / "SE-tiny"
    folder.mkdir()
    shutil.copy(CKPT, folder / "se_tiny_epoch1.ckpt")
    shutil.copy(GENES, folder / "protein_embeddings.pt")
    model, cfg, vocab = load_se(folder)
    np.testing.assert_allclose(embed_fixture_cells(model, cfg, vocab), np.load(FIXTURE / "reference.npy"), atol=1e-5)
    link = tmp_path / "results" / "pretrained.ckpt"
    assert link_checkpoint(folder, link).name == "se_tiny_epoch1.ckpt"
    assert link.is_symlink() and load_se(link, gene_embeddings=GENES)[1] == cfg


def _write_modified(tmp_path, edit) -> Path:
    ckpt = read_checkpoint_file(CKPT)
    edit(ckpt["state_dict"])
    path = tmp_path / "edited.ckpt"
    torch.save(ckpt, path)
    return path


def test_missing_embedding_key_is_an_error_naming_it(tmp_path):
    path = _write_modified(tmp_path, lambda sd: sd.pop("transformer_encoder.layers.1.norm2.bias"))
    with pytest.raises(UserError, match=r"transformer_encoder\.layers\.1\.norm2\.bias"):
        load_se(path, gene_embeddings=GENES)


def test_misshaped_key_is_an_error_naming_it(tmp_path):
    def edit(sd):
        sd["bin_encoder.weight"] = torch.zeros(11, 64)

    with pytest.raises(UserError, match=r"bin_encoder\.weight \(11, 64\) \(expected \(10, 64\)\)"):
        load_se(_write_modified(tmp_path, edit), gene_embeddings=GENES)


def test_training_only_keys_are_ignored_and_needed(tmp_path):
    # the fixture holds binary_decoder.*, dataset_encoder.*, gene_embedding_layer.*, pe_embedding.*
    keys = read_checkpoint_file(CKPT)["state_dict"].keys()
    assert any(k.startswith("binary_decoder.") for k in keys) and "pe_embedding.weight" in keys
    path = _write_modified(
        tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(("binary_decoder", "pe_embedding"))]
    )
    load_se(path, gene_embeddings=GENES)  # not needed for embedding


def test_gene_embeddings_must_exist_and_match_token_dim(tmp_path):
    with pytest.raises(UserError, match="protein_embeddings.pt"):
        load_se(CKPT)  # no protein_embeddings.pt beside tests/data/se_reference.ckpt
    wrong = tmp_path / "genes.pt"
    torch.save({"A": torch.zeros(16), "B": torch.ones(16)}, wrong)
    with pytest.raises(UserError, match="token_dim 32"):
        load_se(CKPT, gene_embeddings=wrong)


def test_saved_checkpoint_has_the_reference_layout_and_round_trips(tmp_path):
    ref_ckpt = read_checkpoint_file(CKPT)
    _, cfg, vocab = load_se(CKPT, gene_embeddings=GENES)
    torch.manual_seed(3)
    model = StateEmbedding(cfg).eval()
    path = tmp_path / "own.ckpt"
    save_se(
        path,
        model,
        cfg,
        training_state=TrainingHeads(cfg).state_dict(),
        gene_embeddings=str(GENES),
        gene_table=vocab.table,
    )
    ours = read_checkpoint_file(path)
    ref_shapes = {k: tuple(v.shape) for k, v in ref_ckpt["state_dict"].items()}
    assert {k: tuple(v.shape) for k, v in ours["state_dict"].items()} == ref_shapes
    assert set(ours) >= {"state_dict", "hyper_parameters", "cfg_yaml", "pytorch-lightning_version"}
    for key in ("token_dim", "d_model", "nhead", "d_hid", "nlayers", "output_dim"):
        assert ours["hyper_parameters"][key] == ref_ckpt["hyper_parameters"][key]
    loaded, cfg2, vocab2 = load_se(path, gene_embeddings=GENES)
    assert cfg2 == cfg
    np.testing.assert_array_equal(embed_fixture_cells(loaded, cfg2, vocab2), embed_fixture_cells(model, cfg, vocab))


def test_own_config_round_trips_scaled_encoding(tmp_path):
    cfg = SEConfig(
        token_dim=32, d_model=16, nhead=2, d_hid=32, nlayers=1, output_dim=8, pad_length=12, encoding="scaled"
    )
    path = tmp_path / "scaled.ckpt"
    save_se(path, StateEmbedding(cfg), cfg)
    assert load_se(path, gene_embeddings=GENES)[1] == cfg


def test_checkpoint_bytes_depend_on_the_contents_only(tmp_path):
    """Same payload, different file names (and temporary names): the same bytes, so checksums of
    checkpoints (e.g. Xpressor's base_sha256) are reproducible from run to run."""
    from cellfoundry.checkpoints import load_checkpoint, save_checkpoint

    payload = {"format": "x", "state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "meta": {"genes": ["A", "B"]}}
    save_checkpoint(tmp_path / "first.ckpt", payload)
    save_checkpoint(tmp_path / "second.ckpt", payload)
    assert (tmp_path / "first.ckpt").read_bytes() == (tmp_path / "second.ckpt").read_bytes()
    assert torch.equal(load_checkpoint(tmp_path / "second.ckpt")["state_dict"]["w"], payload["state_dict"]["w"])
