"""Rule random_se: an untrained SE model of the pretrained model's architecture (baseline)."""

from cellfoundry.pretrain import write_random_model
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
write_random_model(
    snakemake.input.ckpt,
    snakemake.input.vocab,
    snakemake.output.ckpt,
    seed=snakemake.params.seed,
    allow_unsafe_pickle=snakemake.params.allow_unsafe_pickle,
)
