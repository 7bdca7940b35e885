"""Rule embed_gather: concatenate the embedding shards, in order, into one .h5ad."""

from cellfoundry.se.stage import run_embed_gather
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
params = snakemake.params
run_embed_gather(
    shards=list(snakemake.input.shards),
    h5ad=snakemake.input.cells,
    embedding=snakemake.output[0],
    se_checkpoint=params.ckpt,
    vocab=params.vocab,
    tokens=params.tokens,
    settings=snakemake.config["embed"],
)
