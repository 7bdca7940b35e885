"""Rule qc: read a dataset's raw counts, filter cells and genes, split, and write plots."""

import json
import logging
import os

from cellfoundry.genes import AUTO, prepare_genes
from cellfoundry.io import load_counts
from cellfoundry.plots import plot_counts_vs_genes, plot_distributions
from cellfoundry.provenance import KEY, provenance
from cellfoundry.qc import run_qc
from cellfoundry.samples import load_samples
from cellfoundry.utils import atomic_output, setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("cellfoundry")
ds = snakemake.params.dataset
out = snakemake.output

# Load the raw counts: one input (`path`) or a sheet of samples (`samples`, which adds obs["sample"]).
# gene_symbols: auto is chosen after loading, from var_names and the var columns
symbols, source = None if ds["gene_symbols"] == AUTO else ds["gene_symbols"], ds.get("samples") or ds["path"]
if ds.get("samples"):
    adata, samples = load_samples(
        source, ds["format"], ds["counts"], symbols, ds["gene_join"], tmp_dir=os.path.dirname(out.h5ad)
    )
else:
    adata, samples = load_counts(source, ds["format"], ds["counts"], symbols), None
log.info("read %d cells x %d genes from %s", adata.n_obs, adata.n_vars, source)
# gene names and the gene map, before QC so that every later stage sees the same genes
adata, genes = prepare_genes(adata, ds["gene_symbols"], snakemake.input.gene_map or None, snakemake.input.vocab or None)
result = run_qc(
    adata,
    snakemake.params.qc,
    cell_type=ds["cell_type"],
    batch=ds["batch"] or ("sample" if samples else None),
    seed=snakemake.params.seed,
    sample_qc=ds.get("sample_qc"),
    holdout=ds["split"]["holdout"],
)
result.summary["dataset"] = snakemake.wildcards.dataset
if samples:
    result.summary["samples"] = samples
result.summary["genes"] = genes
title = f"{snakemake.wildcards.dataset}: {result.summary['cells_before']} -> {result.summary['cells_after']} cells"

with atomic_output(out.metrics) as tmp:
    result.metrics.to_csv(tmp, sep="\t", index_label="cell")
plot_distributions(result.metrics, result.thresholds, out.distributions, title)
plot_counts_vs_genes(result.metrics, out.scatter, title)
result.filtered.uns[KEY] = provenance(
    "qc", {"dataset": ds, "qc": snakemake.params.qc, "seed": snakemake.params.seed}, inputs={"counts": source}
)
with atomic_output(out.h5ad) as tmp:
    result.filtered.write_h5ad(tmp)
with atomic_output(out.summary) as tmp:
    tmp.write_text(json.dumps(result.summary, indent=2))
log.info("kept %d cells x %d genes", result.filtered.n_obs, result.filtered.n_vars)
