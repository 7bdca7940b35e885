"""Rule link_se_checkpoint: point results/shared/se/pretrained.ckpt at the user's SE checkpoint.

A symbolic link, not a copy (SE-600M is several GB). The checkpoint is opened (safely) first so
that a wrong folder fails here, with a message, rather than in every later rule."""

import logging

from cellfoundry.models.se_checkpoint import link_checkpoint
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
link_checkpoint(snakemake.input.folder, snakemake.output[0], snakemake.params.allow_unsafe_pickle)
logging.getLogger("cellfoundry").info("linked %s", snakemake.output[0])
