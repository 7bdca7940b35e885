"""Rule demo_data: write the demo's raw-count h5ad from scanpy's bundled pbmc68k_reduced."""

import logging

from cellfoundry.demo import pbmc68k_counts
from cellfoundry.utils import atomic_output, setup_logging

setup_logging(snakemake.log[0])
adata = pbmc68k_counts()
logging.getLogger("cellfoundry").info(
    "demo: %d cells x %d genes, %d counts", adata.n_obs, adata.n_vars, int(adata.X.sum())
)
with atomic_output(snakemake.output[0]) as tmp:
    adata.write_h5ad(tmp)
