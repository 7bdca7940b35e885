"""Rule pretrain_se: train an SE-architecture model on the datasets' train splits."""

import logging

import torch

from cellfoundry.pretrain import run_pretraining
from cellfoundry.utils import resolve_device, setup_logging

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
log = logging.getLogger("cellfoundry")
inp, out, params = snakemake.input, snakemake.output, snakemake.params

run_pretraining(
    tokens_dirs=list(inp.tokens),
    h5ads=list(inp.h5ads),
    vocab_path=inp.vocab,
    out_ckpt=out.ckpt,
    out_losses=out.losses,
    work_dir=params.work_dir,
    se=params.se,
    seed=params.seed,
    device=resolve_device(params.device),
)
