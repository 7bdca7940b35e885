"""Rule build_vocab: the gene vocabulary and gene embeddings (SE protein_embeddings.pt format)
from the QC'd training cells of the datasets of vocab.datasets (null = all)."""

from cellfoundry.tokenize.stage import run_build_vocab
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_build_vocab(
    h5ads=list(snakemake.input),
    vocab=snakemake.output.vocab,
    datasets_record=snakemake.output.datasets,
    settings=snakemake.params.vocab,
    datasets=snakemake.params.datasets,
    seed=snakemake.params.seed,
)
