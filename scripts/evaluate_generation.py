"""Rule evaluate_generation: generated cells vs real test cells, beside the two references."""

from cellfoundry.evaluate.stage import run_evaluate_generation
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
inp = snakemake.input
run_evaluate_generation(
    h5ad=inp.qc,
    samples=inp.samples,
    table=snakemake.output.table,
    summary=snakemake.output.json,
    bars=snakemake.output.bars,
    umap=snakemake.output.umap,
    settings=snakemake.params.evaluate,
    cell_type=snakemake.params.cell_type,
    condition_columns=snakemake.params.condition_columns,
    dataset=snakemake.wildcards.dataset,
    seed=snakemake.params.seed,
    # latent token space only: the ceiling's inputs
    latents=inp.get("latents"),
    xpressor_checkpoint=inp.get("xpressor"),
    vocab=inp.get("vocab"),
)
