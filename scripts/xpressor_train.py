"""Rule xpressor_train: train Xpressor (and the pooled baselines) on a frozen SE base.

With xpressor.trainer devices x num_nodes > 1 inside a SLURM job, run_stage starts one process
per GPU (srun) that each run run_xpressor_train; otherwise it runs here."""

from cellfoundry.launch import run_stage
from cellfoundry.utils import setup_logging
from cellfoundry.xpressor.data import resolve_label_columns
from cellfoundry.xpressor.stage import run_xpressor_train

setup_logging(snakemake.log[0])
run_stage(
    run_xpressor_train,
    dict(
        se_checkpoint=str(snakemake.input.se),
        vocab=str(snakemake.input.vocab),
        tokens=str(snakemake.input.tokens),
        h5ad=str(snakemake.input.h5ad),
        checkpoint=str(snakemake.output.ckpt),
        metrics=str(snakemake.output.metrics),
        work_dir=str(snakemake.params.work_dir),
        # xpressor.encode is no rule param: it must not trigger re-runs
        settings={**snakemake.params.xpressor, "encode": snakemake.config["xpressor"]["encode"]},
        label_columns=resolve_label_columns(snakemake.params.labels, snakemake.params.dataset),
        seed=snakemake.params.seed,
        device=snakemake.params.device,
        threads=snakemake.threads,
    ),
    trainer=snakemake.params.xpressor["trainer"],
    log_path=snakemake.log[0],
    threads=snakemake.threads,
    trainer_key="xpressor.trainer",
    resources_key="resources.xpressor",
)
