"""Rule pretrain_se: train an SE-architecture model on the datasets' train splits."""

import logging

from cellfoundry.se.stage import run_pretrain_se
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
inp, out, params = snakemake.input, snakemake.output, snakemake.params
logging.getLogger("cellfoundry").info("pretraining on datasets %s", params.datasets)
run_pretrain_se(
    tokens=list(inp.tokens),
    h5ad=list(inp.h5ads),
    vocab=inp.vocab,
    checkpoint=out.ckpt,
    losses=out.losses,
    work_dir=params.work_dir,
    settings=dict(params.se),
    seed=params.seed,
    device=params.device,
    threads=snakemake.threads,
    datasets=list(params.datasets),
    datasets_record=out.datasets,
    log_path=snakemake.log[0],
)
