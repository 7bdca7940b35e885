"""Rule diffusion_train: the conditional DiT on the train split -> diffusion/model.ckpt.

With diffusion.trainer devices x num_nodes > 1 inside a SLURM job, run_stage starts one process
per GPU (srun) that each run run_diffusion_train; otherwise it runs here."""

from cellfoundry.diffusion.stage import run_diffusion_train
from cellfoundry.launch import run_stage
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
latents, xpressor = snakemake.input.get("latents"), snakemake.input.get("xpressor")
run_stage(
    run_diffusion_train,
    dict(
        h5ad=str(snakemake.input.h5ad),
        checkpoint=str(snakemake.output.ckpt),
        work_dir=str(snakemake.params.work_dir),
        settings=dict(snakemake.params.settings),
        conditions=list(snakemake.params.conditions),
        seed=snakemake.params.seed,
        device=snakemake.params.device,
        threads=snakemake.threads,
        latents=str(latents) if latents else None,
        xpressor_checkpoint=str(xpressor) if xpressor else None,
    ),
    trainer=snakemake.params.settings["trainer"],
    log_path=snakemake.log[0],
    threads=snakemake.threads,
    trainer_key="diffusion.trainer",
    resources_key="resources.diffusion",
)
