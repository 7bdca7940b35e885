"""Rule xpressor_encode: latent tokens and X_xpressor of every cell, kNN accuracy, summary."""

from cellfoundry.utils import setup_logging
from cellfoundry.xpressor.stage import run_xpressor_encode

setup_logging(snakemake.log[0])
run_xpressor_encode(
    se_checkpoint=snakemake.input.se,
    vocab=snakemake.input.vocab,
    tokens=snakemake.input.tokens,
    h5ad=snakemake.input.h5ad,
    xpressor_checkpoint=snakemake.input.ckpt,
    train_metrics=snakemake.input.metrics,
    latents=snakemake.output.latents,
    embedding=snakemake.output.h5ad,
    summary=snakemake.output.summary,
    plot=snakemake.output.plot,
    # the whole section, read from the config (encode.batch_size is no param: no re-run
    # trigger); recorded in embedding.h5ad's provenance
    settings=snakemake.config["xpressor"],
    knn_k=snakemake.params.knn_k,
    seed=snakemake.config["seed"],  # inference only: the seed changes no number, so no param
    device=snakemake.params.device,
    threads=snakemake.threads,
)
