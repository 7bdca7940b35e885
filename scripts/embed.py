"""Rule embed: SE cell embeddings of a dataset's tokens, the whole dataset or one shard of it."""

from cellfoundry.embed import run_embedding
from cellfoundry.utils import resolve_device, set_torch_threads, setup_logging

setup_logging(snakemake.log[0])
set_torch_threads(snakemake.threads)
inp, params = snakemake.input, snakemake.params

run_embedding(
    ckpt=inp.ckpt,
    vocab_path=inp.vocab,
    tokens_dir=inp.tokens,
    cells_h5ad=inp.cells,
    out_path=snakemake.output[0],
    batch_size=snakemake.config["embed"]["batch_size"],  # not a param: no re-run trigger
    device=resolve_device(params.device),
    shards=params.shards,
    shard=params.shard,
    allow_unsafe_pickle=params.allow_unsafe_pickle,
    config=snakemake.config["embed"],  # recorded in the output's provenance
)
