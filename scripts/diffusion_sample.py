"""Rule diffusion_sample: generated cells -> diffusion/samples.h5ad and summary.json."""

from cellfoundry.diffusion.stage import run_diffusion_sample
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_diffusion_sample(
    checkpoint=snakemake.input.ckpt,
    h5ad=snakemake.input.h5ad,
    samples=snakemake.output.samples,
    summary=snakemake.output.summary,
    # batch_size is not a param (no re-run trigger)
    settings={**snakemake.params.sample, "batch_size": snakemake.config["diffusion"]["sample"]["batch_size"]},
    seed=snakemake.params.seed,
    device=snakemake.params.device,
    threads=snakemake.threads,
    xpressor_checkpoint=snakemake.input.get("xpressor"),
    vocab=snakemake.input.get("vocab"),
    latents=snakemake.input.get("latents"),
    config=snakemake.config["diffusion"],  # recorded in samples.h5ad's provenance
)
