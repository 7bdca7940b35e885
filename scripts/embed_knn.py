"""Rule embed_knn: kNN label accuracy of each embedding beside PCA of the counts."""

from cellfoundry.se.stage import run_embed_knn
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
run_embed_knn(
    embeddings=dict(zip(params.models, inp.embeddings)),
    h5ad=inp.cells,
    metrics=snakemake.output[0],
    label=params.label,
    k=params.knn_k,
    pca_components=params.pca_components,
    max_cells=params.max_cells,
    seed=params.seed,
)
