"""Rule tokenize: a dataset's QC'd cells -> cell sentences (tokens/ folder) for the SE model."""

from cellfoundry.tokenize import tokenize_h5ad
from cellfoundry.utils import file_sha256, setup_logging
from cellfoundry.vocab import GeneVocab

setup_logging(snakemake.log[0])
# chunk_size is no rule param (it does not change the tokens, so it must not trigger re-runs)
cfg = {**snakemake.params.tokenize, "chunk_size": snakemake.config["tokenize"]["chunk_size"]}

tokenize_h5ad(
    snakemake.input.cells,
    snakemake.output[0],
    GeneVocab.load(snakemake.input.vocab),
    length=cfg["length"],
    method=cfg["method"],
    seed=snakemake.params.seed,
    chunk_size=cfg["chunk_size"],
    workers=snakemake.threads,
    min_coverage=cfg["min_coverage"],
    target_sum=cfg["target_sum"],
    dataset=snakemake.wildcards.dataset,
    source_hash=file_sha256(snakemake.input.cells),
)
