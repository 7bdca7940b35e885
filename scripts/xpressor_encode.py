"""Rule xpressor_encode: latent tokens and X_xpressor of every cell, kNN accuracy, summary."""

from cellfoundry.utils import set_torch_threads, setup_logging
from cellfoundry.xpressor import encode_stage

setup_logging(snakemake.log[0])
set_torch_threads(snakemake.threads)
encode_stage(
    se_checkpoint=snakemake.input.se,
    vocab_path=snakemake.input.vocab,
    tokens=snakemake.input.tokens,
    h5ad=snakemake.input.h5ad,
    xpressor_ckpt=snakemake.input.ckpt,
    metrics_tsv=snakemake.input.metrics,
    out_latents=snakemake.output.latents,
    out_h5ad=snakemake.output.h5ad,
    out_summary=snakemake.output.summary,
    out_plot=snakemake.output.plot,
    batch_size=snakemake.config["xpressor"]["inference_batch_size"],  # not a param: no re-run trigger
    knn_k=snakemake.params.knn_k,
    device=snakemake.params.device,
    config=snakemake.config["xpressor"],  # recorded in embedding.h5ad's provenance
)
