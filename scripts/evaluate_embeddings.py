"""Rule evaluate_embeddings: SE and Xpressor embeddings beside the PCA and random-SE baselines."""

from cellfoundry.evaluate.stage import run_evaluate_embeddings
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_evaluate_embeddings(
    h5ad=snakemake.input.qc,
    se=snakemake.input.se,
    random=snakemake.input.random,
    xpressor=snakemake.input.xpressor,
    table=snakemake.output.table,
    summary=snakemake.output.json,
    bars=snakemake.output.bars,
    umap=snakemake.output.umap,
    settings=snakemake.params.evaluate,
    cell_type=snakemake.params.cell_type,
    batch=snakemake.params.batch,
    dataset=snakemake.wildcards.dataset,
    seed=snakemake.params.seed,
)
