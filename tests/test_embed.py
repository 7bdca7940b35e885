"""Embedding stage library and CLI: streaming output, shards, parity on the fixture, kNN report.
(The UMAP plot is checked by the workflow test: numba's first compile is too slow for a unit test.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from cellfoundry.cli import main as cli_main
from cellfoundry.models.se_checkpoint import load_se
from cellfoundry.se.embed import gather_shards, read_obs, shard_rows, write_embedding_h5ad
from cellfoundry.se.stage import run_embed, run_embed_knn
from cellfoundry.tokenize import tokenize_h5ad
from cellfoundry.utils import UserError

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "se_reference"
CKPT = DATA / "se_reference.ckpt"
GENES = FIXTURE / "protein_embeddings.pt"
REFERENCE = np.load(FIXTURE / "reference.npy")


@pytest.fixture(scope="module")
def fixture_tokens(tmp_path_factory) -> Path:
    """tokens/ of the fixture's 8 cells (tokenize stage, SE-600M sentence, L = 16)."""
    _, cfg, vocab = load_se(CKPT, gene_embeddings=GENES)
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    tokenize_h5ad(FIXTURE / "cells.h5ad", out, vocab, cfg.pad_length, "se", seed=0, min_coverage=0.0)
    return out


def embed(tmp_path, tokens, batch_size: int = 64, **kw) -> Path:
    out = tmp_path / f"emb_{len(list(tmp_path.iterdir()))}.h5ad"
    run_embed(CKPT, GENES, tokens, FIXTURE / "cells.h5ad", out, {"batch_size": batch_size}, device="cpu", **kw)
    return out


def test_workflow_embedding_matches_reference_and_keeps_obs(tmp_path, fixture_tokens):
    out = embed(tmp_path, fixture_tokens, batch_size=3)
    result = ad.read_h5ad(out)
    cells = ad.read_h5ad(FIXTURE / "cells.h5ad")
    assert list(result.obs_names) == list(cells.obs_names)
    pd.testing.assert_frame_equal(result.obs, cells.obs)
    assert result.obsm["X_state"].dtype == np.float32
    np.testing.assert_allclose(result.obsm["X_state"], REFERENCE, atol=1e-5)


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_sharded_equals_unsharded(tmp_path, fixture_tokens, shards):
    whole = ad.read_h5ad(embed(tmp_path, fixture_tokens, batch_size=2)).obsm["X_state"]
    parts = []
    for k in range(shards):
        part = tmp_path / f"part{k}.npy"
        run_embed(
            CKPT,
            GENES,
            fixture_tokens,
            FIXTURE / "cells.h5ad",
            part,
            {"batch_size": 2},
            device="cpu",
            shards=shards,
            shard=k,
        )
        parts.append(part)
    out = tmp_path / "gathered.h5ad"
    gather_shards(parts, read_obs(FIXTURE / "cells.h5ad"), out, rows_per_chunk=3)
    gathered = ad.read_h5ad(out)
    np.testing.assert_array_equal(gathered.obsm["X_state"], whole)
    assert list(gathered.obs_names) == list(ad.read_h5ad(FIXTURE / "cells.h5ad").obs_names)


def test_shard_rows_cover_all_cells_on_batch_boundaries():
    for n, shards, align in [(679, 3, 64), (8, 3, 2), (5, 4, 64), (100, 7, 1)]:
        rows = [shard_rows(n, shards, k, align) for k in range(shards)]
        assert [i for r in rows for i in r] == list(range(n))
        assert all(r.start % align == 0 for r in rows if len(r))
    with pytest.raises(ValueError):
        shard_rows(10, 2, 2)


def test_streamed_writer_rejects_a_short_stream(tmp_path):
    obs = pd.DataFrame(index=[f"c{i}" for i in range(5)])
    with pytest.raises(RuntimeError, match="wrote 3 embeddings for 5 cells"):
        write_embedding_h5ad(tmp_path / "x.h5ad", obs, [np.zeros((3, 4), np.float32)], 4)
    assert not (tmp_path / "x.h5ad").exists()  # atomic: nothing that looks complete


def test_tokens_of_another_vocabulary_are_refused(tmp_path, fixture_tokens):
    other = tmp_path / "genes.pt"
    table = torch.load(GENES, weights_only=True)
    torch.save(dict(reversed(list(table.items()))), other)  # same genes, other order = other ids
    with pytest.raises(UserError, match="another gene vocabulary"):
        run_embed(
            CKPT, other, fixture_tokens, FIXTURE / "cells.h5ad", tmp_path / "x.h5ad", {"batch_size": 64}, device="cpu"
        )


def test_cli_embeds_a_small_h5ad(tmp_path):
    out = tmp_path / "out.h5ad"
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(CKPT, folder / "model.ckpt")
    shutil.copy(GENES, folder / "protein_embeddings.pt")
    code = cli_main(
        [
            "embed",
            "--model-folder",
            str(folder),
            "--input",
            str(FIXTURE / "cells.h5ad"),
            "--output",
            str(out),
            "--embed-key",
            "X_emb",
            "--batch-size",
            "3",
            "--chunk-size",
            "5",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = ad.read_h5ad(out)
    assert result.n_obs == 8 and result.n_vars == 32  # obs and var kept, X not copied
    np.testing.assert_allclose(result.obsm["X_emb"], REFERENCE, atol=1e-5)


def test_cli_reports_user_errors(tmp_path, capsys):
    args = [
        "embed",
        "--checkpoint",
        str(CKPT),
        "--gene-embeddings",
        str(GENES),
        "--input",
        str(FIXTURE / "cells.h5ad"),
        "--output",
        str(tmp_path / "o.h5ad"),
        "--gene-column",
        "nope",
        "--device",
        "cpu",
    ]
    assert cli_main(args) == 2
    assert "--gene-symbols nope is not a var column" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["embed", "--input", "x.h5ad", "--output", "y.h5ad"])  # neither model nor checkpoint


def test_knn_report(tmp_path, fixture_tokens):
    emb = embed(tmp_path, fixture_tokens)
    cells = ad.read_h5ad(FIXTURE / "cells.h5ad")
    cells.obs["kind"] = np.repeat(["x", "y"], 4)
    labelled = tmp_path / "cells.h5ad"
    cells.write_h5ad(labelled)
    result = run_embed_knn({"se": emb}, labelled, tmp_path / "knn.json", "kind", k=2, pca_components=3)
    assert set(result["accuracy"]) == set(result["macro_f1"]) == {"se", "pca3"}
    assert json.loads((tmp_path / "knn.json").read_text()) == result
    with pytest.raises(UserError, match="no column 'missing'"):
        run_embed_knn({"se": emb}, labelled, tmp_path / "k2.json", "missing")
