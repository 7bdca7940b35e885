"""Data sets of many samples: the sample sheet, its validation, gene reconciliation, per-sample QC,
and the qc rule on a sheet of three Cell Ranger (10x Matrix Market) folders."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import yaml
from conftest import copy_workflow, run_snakemake
from test_qc import cfg

from cellfoundry.qc import quality_control
from cellfoundry.samples import load_samples, read_sheet, sheet_inputs
from cellfoundry.utils import UserError


def write_10x(folder, X, genes, barcodes):
    """A Cell Ranger v3 filtered_feature_bc_matrix folder (gzipped; genes x cells matrix)."""
    folder.mkdir(parents=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(X.T.astype(np.int64)))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"ENSG_{g}\t{g}\tGene Expression\n" for g in genes)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"{b}\n" for b in barcodes)


def three_samples(root, n_cells=(60, 50, 40), drop_gene_of_third=True, seed=0, n_genes=30):
    """Three 10x folders sharing barcodes (as separate Cell Ranger runs do) and a sheet with a
    `donor` metadata column; the third sample lacks gene G0 when drop_gene_of_third."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)] + ["MT-CO1"]
    counts = {}
    for k, n in enumerate(n_cells):
        name = f"s{k + 1}"
        X = rng.poisson(4, size=(n, len(genes)))
        g = genes[1:] if (k == 2 and drop_gene_of_third) else genes
        X = X[:, 1:] if (k == 2 and drop_gene_of_third) else X
        write_10x(root / "runs" / name / "filtered_feature_bc_matrix", X, g, [f"AAAC{i:04d}-1" for i in range(n)])
        counts[name] = pd.DataFrame(X, columns=g, index=[f"AAAC{i:04d}-1" for i in range(n)])
    sheet = root / "samples.tsv"
    sheet.write_text(
        "sample\tpath\tdonor\n"
        + "".join(f"s{k + 1}\truns/s{k + 1}/filtered_feature_bc_matrix\td{min(k, 1)}\n" for k in range(len(n_cells)))
    )
    return sheet, counts


@pytest.mark.parametrize("join", ["intersection", "union"])
def test_three_10x_samples_keep_each_samples_counts(tmp_path, join):
    sheet, counts = three_samples(tmp_path)
    adata, summary = load_samples(sheet, gene_join=join, tmp_dir=tmp_path)
    assert adata.n_obs == 150 and adata.obs_names.is_unique
    assert adata.obs["sample"].tolist() == ["s1"] * 60 + ["s2"] * 50 + ["s3"] * 40
    assert adata.obs["donor"].tolist() == ["d0"] * 60 + ["d1"] * 90
    assert ("G0" in adata.var_names) == (join == "union")
    assert adata.var.loc["G5", "gene_ids"] == "ENSG_G5"  # var columns kept (gene_symbols: auto may choose them)
    for name, table in counts.items():
        part = adata[adata.obs["sample"] == name]
        assert part.obs_names[0] == f"{name}_AAAC0000-1"
        shared = [g for g in table.columns if g in adata.var_names]
        np.testing.assert_array_equal(part[:, shared].X.toarray(), table[shared].to_numpy())
        assert part.X.sum() == table[shared].to_numpy().sum()
    if join == "union":  # the third sample's absent gene is zero, the others' counts kept
        assert adata[adata.obs["sample"] == "s3", "G0"].X.sum() == 0
        assert adata[adata.obs["sample"] == "s1", "G0"].X.sum() == counts["s1"]["G0"].sum()
    key = "genes_dropped" if join == "intersection" else "genes_absent"
    assert [p[key] for p in summary["per_sample"]] == ([1, 1, 0] if join == "intersection" else [0, 0, 1])


def test_sheet_validation_errors(tmp_path):
    sheet, _ = three_samples(tmp_path)
    rows = sheet.read_text().splitlines()
    cases = {
        "lacks column(s) ['path']": "sample\tfolder\nA\tx\n",
        "occur more than once": "\n".join([rows[0], rows[1], rows[1]]) + "\n",
        "do not exist": rows[0] + "\ns9\truns/nowhere\tx\n",
        "unknown format": "sample\tpath\tformat\ns1\truns/s1/filtered_feature_bc_matrix\tloom\n",
    }
    for message, text in cases.items():
        sheet.write_text(text)
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            read_sheet(sheet)
    with pytest.raises(UserError, match="sample sheet not found"):
        read_sheet(tmp_path / "none.tsv")


def test_sheet_inputs_list_each_mtx_file(tmp_path):
    sheet, _ = three_samples(tmp_path)
    inputs = sheet_inputs(sheet)
    assert inputs[0] == str(sheet) and len(inputs) == 1 + 3 * 3
    assert str(tmp_path / "runs/s2/filtered_feature_bc_matrix/barcodes.tsv.gz") in inputs


def test_per_sample_overrides_of_thresholds_mad_and_doublets(tmp_path):
    sheet, _ = three_samples(tmp_path, drop_gene_of_third=False)
    adata, _ = load_samples(sheet, tmp_dir=tmp_path)
    # s2 alone gets a min_counts its cells (about 120 counts each) cannot meet
    res = quality_control(adata, cfg(), batch="sample", sample_qc={"s2": {"min_counts": 10_000}}, seed=0)
    assert set(res.filtered.obs["sample"]) == {"s1", "s3"}
    assert res.summary["steps"][0] == {"filter": "counts", "cells_failing": 50, "cells_remaining": 100}
    # a third of the data set goes, so only the sample's own warning fires
    assert "large_removal" not in res.summary and list(res.summary["large_removal_samples"]) == ["s2"]
    assert res.summary["large_removal_samples"]["s2"]["message"].startswith("sample s2: QC removes 50 of 50 cells")
    # MAD windows per sample: a narrow window for s1 alone; doublets off for s3 alone
    big, _ = load_samples(three_samples(tmp_path / "big", (300, 250, 200), False, n_genes=300)[0], tmp_dir=tmp_path)
    # (structureless Poisson cells: scrublet's automatic threshold means nothing here, so a fixed one)
    mad = quality_control(
        big,
        cfg(filter="mad", doublets={"enabled": True, "expected_rate": 0.06, "threshold": 0.99}),
        batch="sample",
        seed=0,
        sample_qc={"s1": {"mad": {"n_mads": 0.5}}, "s3": {"doublets": {"enabled": False}}},
    )
    lost = 1 - mad.metrics["passed_qc"].groupby(big.obs["sample"], observed=True).mean()
    assert lost["s1"] > 0.5 and lost["s2"] < 0.2
    scored = mad.metrics["doublet_score"].notna().groupby(big.obs["sample"], observed=True).mean()
    assert scored["s3"] == 0 and scored["s2"] > 0.8  # scored: the cells passing the MAD windows
    with pytest.raises(UserError, match=r"names samples \['s7'\]"):
        quality_control(adata, cfg(), batch="sample", sample_qc={"s7": {"min_counts": 1}})
    with pytest.raises(UserError, match="unset `batch`"):
        quality_control(adata, cfg(), batch="donor", sample_qc={"s1": {"doublets": {"threshold": 0.5}}})
    with pytest.raises(UserError, match="dataset-wide"):
        quality_control(adata, cfg(), batch="sample", sample_qc={"s1": {"min_cells": 1}})


def test_qc_rule_reads_a_sample_sheet(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    sheet, counts = three_samples(work / "data" / "study", n_cells=(80, 70, 60))
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    config["datasets"] = {"study": {"samples": "data/study/samples.tsv", "gene_join": "union"}}
    config["qc"] = {
        "min_genes": 5,
        "min_counts": 20,
        "min_cells": 1,
        "doublets": {"enabled": False},
        "max_pct_mt": None,
    }
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(work, "results/study/qc/summary.json")
    summary = json.loads((work / "results/study/qc/summary.json").read_text())
    assert summary["cells_before"] == 210 and summary["samples"]["gene_join"] == "union"
    assert [p["cells"] for p in summary["samples"]["per_sample"]] == [80, 70, 60]
    import anndata as ad

    out = ad.read_h5ad(work / "results/study/qc/filtered.h5ad")
    assert out.obs["sample"].value_counts().sort_index().tolist() == [80, 70, 60]
    s3 = out[out.obs["sample"] == "s3"]
    np.testing.assert_array_equal(s3[:, counts["s3"].columns].X.toarray(), counts["s3"].to_numpy())
    # a changed sample input reruns qc (Snakemake compares small inputs' content, so change it)
    with gzip.open(sheet.parent / "runs/s3/filtered_feature_bc_matrix/barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"TTTG{i:04d}-1\n" for i in range(60))
    dry = run_snakemake(work, "-n", "results/study/qc/summary.json")
    assert "qc" in dry.stdout and "Nothing to be done" not in dry.stdout
