"""Rule diffusion_train: the conditional DiT on the train split -> diffusion/model.ckpt.

With diffusion.trainer devices x num_nodes > 1 inside a SLURM job, run_stage starts one process
per GPU (srun) that each run run_train; otherwise it runs here."""

from cellfoundry.diffusion_stage import run_train
from cellfoundry.train import run_stage
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
latents, xpressor = snakemake.input.get("latents"), snakemake.input.get("xpressor")
run_stage(
    run_train,
    dict(
        filtered_h5ad=str(snakemake.input.h5ad),
        model_ckpt=str(snakemake.output.ckpt),
        train_dir=str(snakemake.params.train_dir),
        settings=dict(snakemake.params.settings),
        conditions=list(snakemake.params.conditions),
        seed=snakemake.params.seed,
        device=snakemake.params.device,
        latents_npy=str(latents) if latents else None,
        xpressor_ckpt=str(xpressor) if xpressor else None,
    ),
    trainer=snakemake.params.settings.get("trainer", {}),
    log_path=snakemake.log[0],
    threads=snakemake.threads,
    trainer_key="diffusion.trainer",
    resources_key="resources.diffusion",
)
