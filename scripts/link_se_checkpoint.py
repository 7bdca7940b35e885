"""Rule link_se_checkpoint: point results/shared/se/pretrained.ckpt at the user's SE checkpoint."""

from cellfoundry.se.stage import run_link_se_checkpoint
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_link_se_checkpoint(snakemake.input.folder, snakemake.output[0], snakemake.params.allow_unsafe_pickle)
