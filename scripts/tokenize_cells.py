"""Rule tokenize: a dataset's QC'd cells -> cell sentences (tokens/ folder) for the SE model."""

from cellfoundry.tokenize.stage import run_tokenize
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_tokenize(
    h5ad=snakemake.input.cells,
    tokens=snakemake.output[0],
    vocab=snakemake.input.vocab,
    # chunk_size is no rule param (it does not change the tokens, so it must not trigger re-runs)
    settings={**snakemake.params.tokenize, "chunk_size": snakemake.config["tokenize"]["chunk_size"]},
    seed=snakemake.params.seed,
    threads=snakemake.threads,
    dataset=snakemake.wildcards.dataset,
)
