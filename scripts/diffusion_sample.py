"""Rule diffusion_sample: generated cells -> diffusion/samples.h5ad and summary.json."""

from cellfoundry.diffusion_stage import run_sample
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_sample(
    model_ckpt=snakemake.input.ckpt,
    filtered_h5ad=snakemake.input.h5ad,
    samples_h5ad=snakemake.output.samples,
    summary_json=snakemake.output.summary,
    # batch_size is not a param (no re-run trigger)
    sample_cfg={**snakemake.params.sample, "batch_size": snakemake.config["diffusion"]["sample"]["batch_size"]},
    seed=snakemake.params.seed,
    device=snakemake.params.device,
    threads=snakemake.threads,
    xpressor_ckpt=snakemake.input.get("xpressor"),
    vocab_path=snakemake.input.get("vocab"),
    latents_npy=snakemake.input.get("latents"),
    config=snakemake.config["diffusion"],  # recorded in samples.h5ad's provenance
)
