"""Rule embed_knn: kNN label accuracy of each embedding beside PCA of the counts."""

from cellfoundry.embed import knn_report
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
inp, params = snakemake.input, snakemake.params
knn_report(
    embeddings=dict(zip(params.models, inp.embeddings)),
    cells_h5ad=inp.cells,
    out_json=snakemake.output[0],
    label=params.label,
    knn_neighbors=params.knn_neighbors,
    pca_components=params.pca_components,
    max_cells=params.max_cells,
    seed=params.seed,
)
