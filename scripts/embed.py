"""Rule embed: SE cell embeddings of a dataset's tokens, the whole dataset or one shard of it."""

from cellfoundry.se.stage import run_embed
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
run_embed(
    se_checkpoint=inp.ckpt,
    vocab=inp.vocab,
    tokens=inp.tokens,
    h5ad=inp.cells,
    embedding=snakemake.output[0],
    # the whole section, not params: embed.batch_size is no re-run trigger; recorded in provenance
    settings=snakemake.config["embed"],
    device=params.device,
    threads=snakemake.threads,
    shards=params.shards,
    shard=params.shard,
    allow_unsafe_pickle=params.allow_unsafe_pickle,
)
