"""Rule embed_gather: concatenate the embedding shards, in order, into one .h5ad."""

from cellfoundry.embed import embed_provenance, gather_shards, read_obs
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
params = snakemake.params
uns = embed_provenance(params.ckpt, params.vocab, snakemake.input.cells, params.tokens, snakemake.config["embed"])
gather_shards(list(snakemake.input.shards), read_obs(snakemake.input.cells), snakemake.output[0], uns=uns)
