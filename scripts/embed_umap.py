"""Rule embed_umap: UMAP of one embedding coloured by the configured labels."""

from cellfoundry.se.stage import run_embed_umap
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
params = snakemake.params
run_embed_umap(snakemake.input.embedding, snakemake.output[0], params.labels, params.max_cells, params.seed)
