"""Rule qc: read a dataset's raw counts, filter cells and genes, split, and write plots."""

from cellfoundry.qc import run_qc
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_qc(
    h5ad=snakemake.output.h5ad,
    summary=snakemake.output.summary,
    metrics=snakemake.output.metrics,
    distributions=snakemake.output.distributions,
    scatter=snakemake.output.scatter,
    dataset_settings=snakemake.params.dataset,
    settings=snakemake.params.qc,
    seed=snakemake.params.seed,
    gene_map=snakemake.input.gene_map or None,
    vocab=snakemake.input.vocab or None,
    dataset=snakemake.wildcards.dataset,
)
