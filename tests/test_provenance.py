"""uns["cellfoundry"]: the record of which model, config and inputs made each .h5ad output
(QC, embed and its gather, Xpressor encode, diffusion samples; the CLI's in test_cli.py)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import run_snakemake
from test_diffusion import CONDITIONS, SAMPLE, SETTINGS, synthetic  # noqa: F401 - the fixture
from test_embed import CKPT, FIXTURE, GENES, fixture_tokens  # noqa: F401 - the fixture
from test_xpressor_stage import _train, inputs  # noqa: F401 - the fixture

from cellfoundry import __version__
from cellfoundry import provenance as prov
from cellfoundry.provenance import provenance, read_provenance
from cellfoundry.se.embed import embed_provenance, gather_shards, read_obs
from cellfoundry.se.stage import run_embed
from cellfoundry.utils import file_sha256


def test_paths_below_the_working_directory_are_recorded_relative(tmp_path, monkeypatch):
    """The same run in another clone records the same bytes (QC's filtered.h5ad feeds the
    tokens' source hash); a path elsewhere stays absolute."""
    (tmp_path / "wf" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "wf")
    assert prov.recorded_path(tmp_path / "wf" / "data" / "x.h5ad") == "data/x.h5ad"
    assert prov.recorded_path("data/x.h5ad") == "data/x.h5ad"
    assert prov.recorded_path(tmp_path / "elsewhere.h5ad") == str(tmp_path / "elsewhere.h5ad")


def test_record_is_h5ad_safe_and_reads_back(tmp_path):
    config = {"batch_size": 64, "missing": None, "nested": {"steps": [1, 2]}}
    record = provenance(
        "embed", config, checkpoints={"se": CKPT, "other": None}, vocab=GENES, inputs={"cells": FIXTURE}
    )
    assert record["checkpoints"] == {
        "se": {"path": prov.recorded_path(CKPT), "sha256": file_sha256(CKPT)}
    }  # None left out
    assert record["inputs"]["cells"]["size_bytes"] == sum(f.stat().st_size for f in FIXTURE.rglob("*") if f.is_file())
    adata = ad.AnnData(np.zeros((2, 3), np.float32))
    adata.uns["cellfoundry"] = record
    adata.uns["qc"] = provenance("qc")  # no checkpoint, no vocabulary, no config: empty groups
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = read_provenance(tmp_path / "a.h5ad")
    assert back["config"] == config and back["version"] == __version__ and back["vocab"]["sha256"] == file_sha256(GENES)
    assert ad.read_h5ad(tmp_path / "a.h5ad").uns["qc"]["checkpoints"] == {}
    with pytest.raises(ValueError, match="free of '/'"):
        provenance("x", checkpoints={"a/b": CKPT})


def test_a_checkpoint_is_hashed_once_per_process(tmp_path):
    big = tmp_path / "model.ckpt"
    big.write_bytes(b"weights" * 1000)
    misses = prov._cached_sha256.cache_info().misses
    first = provenance("a", checkpoints={"m": big})["checkpoints"]["m"]["sha256"]
    provenance("b", checkpoints={"m": big}, vocab=big)
    assert prov._cached_sha256.cache_info().misses == misses + 1
    big.write_bytes(b"other weights")  # a changed file is hashed again
    assert provenance("c", checkpoints={"m": big})["checkpoints"]["m"]["sha256"] != first


def test_embed_outputs_carry_the_record(tmp_path, fixture_tokens):  # noqa: F811
    cells = FIXTURE / "cells.h5ad"
    run_embed(CKPT, GENES, fixture_tokens, cells, tmp_path / "se.h5ad", {"batch_size": 64}, device="cpu")
    record = read_provenance(tmp_path / "se.h5ad")
    assert record["stage"] == "embed" and record["config"] == {"batch_size": 64}
    assert record["checkpoints"]["se"]["sha256"] == file_sha256(CKPT)
    assert record["vocab"]["sha256"] == file_sha256(GENES)
    assert set(record["inputs"]) == {"cells", "tokens"}
    # the gathered output of shards records the same
    part = tmp_path / "part.npy"
    run_embed(CKPT, GENES, fixture_tokens, cells, part, {"batch_size": 64}, device="cpu", shards=1, shard=0)
    gather_shards(
        [part],
        read_obs(cells),
        tmp_path / "gathered.h5ad",
        uns=embed_provenance(CKPT, GENES, cells, fixture_tokens, {"batch_size": 64}),
    )
    assert read_provenance(tmp_path / "gathered.h5ad") == record


def test_xpressor_embedding_carries_the_record(inputs, tmp_path):  # noqa: F811
    from cellfoundry.xpressor import run_xpressor_encode

    _train(inputs, tmp_path, train={"baselines": False, "max_epochs": 1})
    settings = {"encode": {"knn_k": 5, "batch_size": 16}}
    run_xpressor_encode(
        se_checkpoint=inputs["se"],
        vocab=inputs["vocab"],
        tokens=inputs["tokens"],
        h5ad=inputs["h5ad"],
        xpressor_checkpoint=str(tmp_path / "model.ckpt"),
        train_metrics=str(tmp_path / "reconstruction.tsv"),
        latents=str(tmp_path / "latents.npy"),
        embedding=str(tmp_path / "embedding.h5ad"),
        summary=str(tmp_path / "summary.json"),
        plot=str(tmp_path / "summary.png"),
        settings=settings,
        knn_k=5,
        seed=0,
        device="cpu",
    )
    record = read_provenance(tmp_path / "embedding.h5ad")
    assert record["stage"] == "xpressor_encode" and record["config"] == settings
    assert record["checkpoints"]["se"]["sha256"] == file_sha256(inputs["se"])
    assert record["checkpoints"]["xpressor"]["sha256"] == file_sha256(tmp_path / "model.ckpt")
    assert record["vocab"]["sha256"] == file_sha256(inputs["vocab"])


def test_diffusion_samples_carry_the_record(synthetic, tmp_path):  # noqa: F811
    from cellfoundry.diffusion.stage import run_diffusion_sample as run_sample
    from cellfoundry.diffusion.stage import run_diffusion_train as run_train

    h5ad = synthetic / "filtered.h5ad"
    run_train(
        h5ad,
        tmp_path / "model.ckpt",
        tmp_path / "train",
        {**SETTINGS, "token_space": "gene"},
        CONDITIONS,
        seed=0,
        device="cpu",
    )
    run_sample(
        tmp_path / "model.ckpt",
        h5ad,
        tmp_path / "samples.h5ad",
        tmp_path / "summary.json",
        {**SAMPLE, "guidance_check": False},
        seed=0,
        device="cpu",
        config={"sample": {"steps": 5}},
    )
    record = read_provenance(tmp_path / "samples.h5ad")
    assert record["stage"] == "diffusion_sample" and record["config"] == {"sample": {"steps": 5}}
    assert record["checkpoints"] == {
        "diffusion": {"path": str(tmp_path / "model.ckpt"), "sha256": file_sha256(tmp_path / "model.ckpt")}
    }
    assert "vocab" not in record  # the gene token space uses no vocabulary
    assert record["inputs"]["cells"]["size_bytes"] == h5ad.stat().st_size


@pytest.mark.workflow
def test_qc_output_of_the_workflow_carries_the_record(demo_workdir):
    run_snakemake(demo_workdir, "results/pbmc68k/qc/filtered.h5ad")
    record = read_provenance(demo_workdir / "results" / "pbmc68k" / "qc" / "filtered.h5ad")
    assert record["stage"] == "qc" and record["checkpoints"] == {}
    assert set(record["config"]) == {"dataset", "qc", "seed"} and "min_genes" in record["config"]["qc"]
    counts = record["inputs"]["counts"]
    assert counts["path"].endswith(".h5ad") and counts["size_bytes"] > 0
