"""Rule random_se: an untrained SE model of the pretrained model's architecture (baseline)."""

from cellfoundry.se.stage import run_random_se
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_random_se(
    se_checkpoint=snakemake.input.ckpt,
    vocab=snakemake.input.vocab,
    checkpoint=snakemake.output.ckpt,
    seed=snakemake.params.seed,
    allow_unsafe_pickle=snakemake.params.allow_unsafe_pickle,
)
