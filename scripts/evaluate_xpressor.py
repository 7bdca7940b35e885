"""Rule evaluate_xpressor: the Xpressor stage's held-out reconstruction, per-gene agreement and a
decoded-vs-observed scatter from the saved latents."""

from cellfoundry.evaluate.stage import run_evaluate_xpressor
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_evaluate_xpressor(
    h5ad=snakemake.input.qc,
    xpressor_summary=snakemake.input.summary,
    xpressor_metrics=snakemake.input.table,
    xpressor_checkpoint=snakemake.input.model,
    latents=snakemake.input.latents,
    vocab=snakemake.input.vocab,
    table=snakemake.output.table,
    summary=snakemake.output.json,
    bars=snakemake.output.bars,
    scatter=snakemake.output.scatter,
    settings=snakemake.params.evaluate,
    dataset=snakemake.wildcards.dataset,
    seed=snakemake.params.seed,
    device=snakemake.params.device,
)
