"""The evaluate_* rules under the real snakemake.

`test_eval_rules_on_stand_in_upstream` runs the three rules on the demo's real QC output with
stand-in upstream files (embeddings, a tiny Xpressor checkpoint, generated cells) so the stage is
checked on its own; `test_demo_evaluation_and_report` runs the real pipeline end to end and
builds the HTML report. Malformed upstream outputs must stop a rule with a message naming the
rule to re-run."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import copy_workflow, run_snakemake

DS = "pbmc68k"
EVAL_RULES = ["--allowed-rules", "evaluate_embeddings", "evaluate_xpressor", "evaluate_generation"]
TARGETS = [f"results/{DS}/eval/{name}" for name in ("embeddings.tsv", "reconstruction.tsv", "generation.tsv")]


def _write_stand_ins(work, rng):
    """Upstream outputs in their contract formats, made from the real QC'd cells."""
    import torch

    from cellfoundry.models.xpressor import Xpressor, XpressorConfig, save_xpressor
    from cellfoundry.vocab import GeneVocab

    res = work / "results" / DS
    qc = ad.read_h5ad(res / "qc" / "filtered.h5ad")
    counts = np.asarray(qc.X.todense() if hasattr(qc.X, "todense") else qc.X, dtype=np.float32)
    logn = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    obs = qc.obs.copy()
    for path, key, X in (
        ("embed/se.h5ad", "X_state", logn[:, :64] + rng.normal(scale=0.1, size=(qc.n_obs, 64))),
        ("embed/random.h5ad", "X_state", rng.normal(size=(qc.n_obs, 32))),
        ("xpressor/embedding.h5ad", "X_xpressor", logn[:, 64:80]),
    ):
        (res / path).parent.mkdir(parents=True, exist_ok=True)
        emb = ad.AnnData(obs=obs.copy())
        emb.obsm[key] = X.astype(np.float32)
        emb.write_h5ad(res / path)

    genes = list(qc.var_names)
    vocab = GeneVocab(genes, torch.randn(len(genes), 16))
    vocab.save(work / "results" / "shared" / "vocab" / "gene_embeddings.pt")
    torch.manual_seed(0)
    model = Xpressor(
        XpressorConfig.from_dict(dict(d_base=8, gene_dim=16, n_latent=2, d_model=16, n_heads=2, n_blocks=1))
    )
    save_xpressor(res / "xpressor" / "model.ckpt", model, "0" * 64, meta={"genes": genes})
    np.save(res / "xpressor" / "latents.npy", rng.normal(size=(qc.n_obs, 2, 16)).astype(np.float32))
    (res / "xpressor" / "summary.json").write_text(
        json.dumps(
            {
                "methods": {m: {"trainable_parameters": 1000} for m in ("xpressor", "cls", "mean")},
                "trainable_fraction": 0.01,
                "xpressor_beats_baselines": False,
            }
        )
    )
    pd.DataFrame(
        [
            dict(method=m, metric=k, value=v, split="test", n_cells=100)
            for m in ("xpressor", "cls", "mean")
            for k, v in (("pearson_mean", 0.5), ("spearman_mean", 0.4), ("mse", 1.0))
        ]
    ).to_csv(res / "xpressor" / "reconstruction.tsv", sep="\t", index=False)

    # "Generated" cells: real training cells with counts thinned, labelled like the test split.
    test = qc[qc.obs["split"] == "test"]
    pick = rng.choice(np.flatnonzero(qc.obs["split"] == "train"), size=test.n_obs, replace=False)
    gen_counts = rng.binomial(counts[pick].astype(np.int64), 0.8).astype(np.float32)
    samples = ad.AnnData(
        gen_counts,
        obs=pd.DataFrame(
            {"bulk_labels": qc.obs["bulk_labels"].to_numpy()[pick]}, index=[f"gen{i}" for i in range(len(pick))]
        ),
    )
    samples.obs["condition"] = "cell_type=" + samples.obs["bulk_labels"].astype(str)
    samples.var_names = genes
    samples.layers["mean"] = gen_counts
    (res / "diffusion").mkdir(parents=True, exist_ok=True)
    samples.write_h5ad(res / "diffusion" / "samples.h5ad")


@pytest.fixture(scope="module")
def stand_in_workdir(demo_workdir, tmp_path_factory):
    run_snakemake(demo_workdir, f"results/{DS}/qc/filtered.h5ad")
    work = copy_workflow(tmp_path_factory.mktemp("eval_standin"))
    shutil.copytree(demo_workdir / "results" / DS / "qc", work / "results" / DS / "qc")
    _write_stand_ins(work, np.random.default_rng(0))
    return work


@pytest.mark.workflow
def test_eval_rules_on_stand_in_upstream(stand_in_workdir):
    work = stand_in_workdir
    run_snakemake(work, *TARGETS, *EVAL_RULES)
    ev = work / "results" / DS / "eval"
    for name in (
        "embeddings_umap.png",
        "embeddings_metrics.png",
        "reconstruction_scatter.png",
        "generation_umap.png",
        "generation_metrics.png",
    ):
        assert (ev / name).stat().st_size > 10_000, name

    emb = pd.read_csv(ev / "embeddings.tsv", sep="\t")
    assert set(emb["method"]) == {"se", "xpressor", "pca_hvg", "random_se"}
    acc = emb[emb["metric"] == "knn_accuracy"].set_index("method")["value"]
    assert acc["pca_hvg"] > acc["random_se"] + 0.2  # PCA separates PBMC types; noise does not
    summary = json.loads((ev / "embeddings.json").read_text())
    assert summary["best"]["knn_accuracy"] in acc.index and "model_loses_to" in summary

    rec = pd.read_csv(ev / "reconstruction.tsv", sep="\t")
    assert {"pearson_mean", "mse", "gene_pearson_mean", "trainable_fraction"} <= set(rec["metric"])

    gen = pd.read_csv(ev / "generation.tsv", sep="\t")
    # latent space: the ceiling row decodes the stand-in latents through the stand-in Xpressor
    assert set(gen["method"]) == {
        "diffusion",
        "real_train (floor)",
        "independent_genes (weak)",
        "decoded_real (ceiling)",
    }
    assert {"all", "mean over conditions"} <= set(gen["condition"])
    assert {"w1", "w2", "mmd_rbf", "mmd_linear", "energy", "knn_auc", "r2_mean", "r2_var", "label_accuracy"} <= set(
        gen["metric"]
    )
    overall = gen[gen["condition"] == "all"].pivot(index="method", columns="metric", values="value")
    # The floor is closer to the real test cells than the weak generator.
    assert overall.loc["real_train (floor)", "w2"] < overall.loc["independent_genes (weak)", "w2"]
    assert overall.loc["real_train (floor)", "label_accuracy"] > 0.5

    # The report builds over these rules and carries the evaluation's files with captions.
    run_snakemake(work, "--report", "report.html", *TARGETS, *EVAL_RULES)
    html = (work / "report.html").read_text(errors="replace")
    assert "embeddings_umap.png" in html and "independent genes" in html


@pytest.mark.workflow
def test_eval_rules_fail_clearly_on_malformed_upstream(stand_in_workdir, tmp_path):
    work = copy_workflow(tmp_path / "wf")
    shutil.copytree(stand_in_workdir / "results", work / "results")
    res = work / "results" / DS
    bad = ad.read_h5ad(res / "embed" / "se.h5ad")
    del bad.obsm["X_state"]
    bad.write_h5ad(res / "embed" / "se.h5ad")
    (res / "diffusion" / "samples.h5ad").write_bytes(b"not an h5ad")
    for target, message in ((TARGETS[0], "has no obsm['X_state']"), (TARGETS[2], "cannot read")):
        proc = run_snakemake(
            work, target, *EVAL_RULES, "--forcerun", "evaluate_embeddings", "evaluate_generation", check=False
        )
        assert proc.returncode != 0
        log = (
            work / "logs" / DS / ("evaluate_embeddings.log" if "embeddings" in target else "evaluate_generation.log")
        ).read_text()
        assert message in log and "re-run rule" in log
        assert not (work / target).exists()  # nothing that looks complete


@pytest.mark.workflow
def test_demo_evaluation_and_report(demo_all):
    """The real pipeline's evaluation outputs, and `snakemake --report` over the whole demo."""
    ev = demo_all / "results" / DS / "eval"
    emb = pd.read_csv(ev / "embeddings.tsv", sep="\t")
    assert set(emb["method"]) == {"se", "xpressor", "pca_hvg", "random_se"}
    computed = emb["skipped"].isna()  # the demo has no batch column: batch metrics are skipped rows
    assert emb.loc[computed, "value"].notna().all() and computed.any()
    assert emb.loc[~computed, "skipped"].str.contains("no batch labels").all()
    rec = pd.read_csv(ev / "reconstruction.tsv", sep="\t")
    assert {"xpressor", "cls", "mean"} <= set(rec["method"])
    gen = pd.read_csv(ev / "generation.tsv", sep="\t")
    assert {"diffusion", "real_train (floor)", "independent_genes (weak)", "decoded_real (ceiling)"} == set(
        gen["method"]
    )
    # Calibrated decoding (issue 16): counts sampled from the real test cells' own latents match
    # the real cells' per-gene means and variances in the evaluation's space.
    ceiling = gen[(gen["method"] == "decoded_real (ceiling)") & (gen["condition"] == "all")].set_index("metric")[
        "value"
    ]
    assert ceiling["r2_mean"] >= 0.9 and ceiling["r2_var"] >= 0.8, ceiling.to_dict()

    run_snakemake(demo_all, "--report", "report.html")
    html = (demo_all / "report.html").read_text(errors="replace")
    assert (demo_all / "report.html").stat().st_size > 100_000
    for name in ("embeddings_umap.png", "generation.tsv", "reconstruction_scatter.png", "qc_distributions.png"):
        assert name in html, name
