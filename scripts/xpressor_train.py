"""Rule xpressor_train: train Xpressor (and the pooled baselines) on a frozen SE base."""

from cellfoundry.utils import setup_logging
from cellfoundry.xpressor import set_torch_threads, resolve_label_columns, train_stage

setup_logging(snakemake.log[0])
set_torch_threads(snakemake.threads)
train_stage(
    se_checkpoint=snakemake.input.se,
    vocab_path=snakemake.input.vocab,
    tokens=snakemake.input.tokens,
    h5ad=snakemake.input.h5ad,
    out_ckpt=snakemake.output.ckpt,
    out_metrics=snakemake.output.metrics,
    work_dir=snakemake.params.work_dir,
    cfg=snakemake.params.xpressor,
    label_columns=resolve_label_columns(snakemake.params.labels, snakemake.params.dataset),
    seed=snakemake.params.seed,
    device=snakemake.params.device,
)
