"""Rule build_vocab: the gene vocabulary and gene embeddings (SE protein_embeddings.pt format)
from the QC'd training cells of the datasets of vocab.datasets (null = all)."""

import json
import logging

from cellfoundry.utils import atomic_output, setup_logging
from cellfoundry.vocab import build_vocab_from_h5ads

setup_logging(snakemake.log[0])
log = logging.getLogger("cellfoundry")
cfg = snakemake.params.vocab

log.info("building the vocabulary from datasets %s", snakemake.params.datasets)
vocab = build_vocab_from_h5ads(list(snakemake.input), cfg["source"], cfg["dim"], snakemake.params.seed, cfg["max_cells"])
vocab.save(snakemake.output.vocab)
log.info("vocabulary: %d genes x %d dims (source %s, hash %s) -> %s",
         len(vocab), vocab.dim, cfg["source"], vocab.hash[:12], snakemake.output.vocab)
# with vocab.datasets null, later runs keep training on this list (workflow/rules/common.smk)
with atomic_output(snakemake.output.datasets) as tmp:
    tmp.write_text(json.dumps(list(snakemake.params.datasets)))
