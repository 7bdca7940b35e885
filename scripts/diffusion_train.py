"""Rule diffusion_train: the conditional DiT on the train split -> diffusion/model.ckpt."""

from cellfoundry.diffusion_stage import run_train
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_train(
    filtered_h5ad=snakemake.input.h5ad,
    model_ckpt=snakemake.output.ckpt,
    train_dir=snakemake.params.train_dir,
    settings=snakemake.params.settings,
    conditions=snakemake.params.conditions,
    seed=snakemake.params.seed,
    device=snakemake.params.device,
    threads=snakemake.threads,
    latents_npy=snakemake.input.get("latents"),
    xpressor_ckpt=snakemake.input.get("xpressor"),
)
