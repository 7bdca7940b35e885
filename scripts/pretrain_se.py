"""Rule pretrain_se: train an SE-architecture model on the datasets' train splits.

With se.trainer devices x num_nodes > 1 inside a SLURM job, run_stage starts one process per GPU
(srun) that each run run_pretraining; otherwise it runs here."""

import json
import logging

from cellfoundry.pretrain import run_pretraining
from cellfoundry.train import run_stage
from cellfoundry.utils import atomic_output, resolve_device, setup_logging

setup_logging(snakemake.log[0])
inp, out, params = snakemake.input, snakemake.output, snakemake.params
logging.getLogger("cellfoundry").info("pretraining on datasets %s", params.datasets)

run_stage(
    run_pretraining,
    dict(
        tokens_dirs=[str(p) for p in inp.tokens],
        h5ads=[str(p) for p in inp.h5ads],
        vocab_path=str(inp.vocab),
        out_ckpt=str(out.ckpt),
        out_losses=str(out.losses),
        work_dir=str(params.work_dir),
        se=dict(params.se),
        seed=params.seed,
        device=resolve_device(params.device),
    ),
    trainer=params.se["trainer"],
    log_path=snakemake.log[0],
    threads=snakemake.threads,
    trainer_key="se.trainer",
    resources_key="resources.pretrain_se",
)
# with se.pretrain.datasets null, later runs keep training on this list (workflow/rules/common.smk)
with atomic_output(out.datasets) as tmp:
    tmp.write_text(json.dumps(list(params.datasets)))
