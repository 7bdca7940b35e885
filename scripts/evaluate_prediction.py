"""Rule evaluate_prediction: each held-out combination's generated cells vs its real held-out
cells, beside the no-change, linear-shift and split-half references."""

from cellfoundry.evaluate.stage import run_evaluate_prediction
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_evaluate_prediction(
    h5ad=snakemake.input.qc,
    samples=snakemake.input.samples,
    table=snakemake.output.table,
    summary=snakemake.output.json,
    scatter=snakemake.output.scatter,
    settings=snakemake.params.evaluate,
    holdout=snakemake.params.holdout,
    conditions=snakemake.params.conditions,
    dataset=snakemake.wildcards.dataset,
    seed=snakemake.params.seed,
)
