"""The latent diffusion stage: the noise process (`process`), training data (`data`), the
denoiser's LightningModule and checkpoint (`module`), sampling and decoding (`sample`) and the
rule entry points (`stage`)."""

from cellfoundry.diffusion.stage import run_diffusion_sample, run_diffusion_train

__all__ = ["run_diffusion_sample", "run_diffusion_train"]
