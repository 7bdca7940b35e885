"""Rule build_vocab: the gene vocabulary and gene embeddings (SE protein_embeddings.pt format)
from the QC'd training cells of all configured datasets."""

import logging

from cellfoundry.utils import setup_logging
from cellfoundry.vocab import build_vocab_from_h5ads

setup_logging(snakemake.log[0])
log = logging.getLogger("cellfoundry")
cfg = snakemake.params.vocab

vocab = build_vocab_from_h5ads(list(snakemake.input), cfg["source"], cfg["dim"], snakemake.params.seed, cfg["max_cells"])
vocab.save(snakemake.output[0])
log.info("vocabulary: %d genes x %d dims (source %s, hash %s) -> %s",
         len(vocab), vocab.dim, cfg["source"], vocab.hash[:12], snakemake.output[0])
