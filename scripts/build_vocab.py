"""Rule build_vocab: the gene vocabulary and gene embeddings (SE protein_embeddings.pt format)
from the QC'd training cells of the datasets of vocab.datasets (null = all)."""

import logging

from cellfoundry.utils import setup_logging
from cellfoundry.vocab import build_vocab_from_h5ads

setup_logging(snakemake.log[0])
log = logging.getLogger("cellfoundry")
cfg = snakemake.params.vocab

# the list decides the vocabulary: pin vocab.datasets to it to keep a later dataset from rebuilding it
log.info("building the vocabulary from datasets %s", snakemake.params.datasets)
vocab = build_vocab_from_h5ads(list(snakemake.input), cfg["source"], cfg["dim"], snakemake.params.seed, cfg["max_cells"])
vocab.save(snakemake.output[0])
log.info("vocabulary: %d genes x %d dims (source %s, hash %s) -> %s",
         len(vocab), vocab.dim, cfg["source"], vocab.hash[:12], snakemake.output[0])
