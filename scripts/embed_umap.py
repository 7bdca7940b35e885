"""Rule embed_umap: UMAP of one embedding coloured by the configured labels."""

from cellfoundry.embed import umap_plot
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
params = snakemake.params
umap_plot(snakemake.input.embedding, snakemake.output[0], params.labels, params.max_cells, params.seed)
