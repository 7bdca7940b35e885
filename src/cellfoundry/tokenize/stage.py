"""The rule entry points of the data stages before the SE model: run_build_vocab (the gene
vocabulary and embeddings) and run_tokenize (a dataset's QC'd cells -> a tokens folder)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cellfoundry.tokenize.engine import tokenize_h5ad
from cellfoundry.utils import atomic_output, file_sha256, start_stage
from cellfoundry.vocab import GeneVocab, build_vocab_from_h5ads

log = logging.getLogger(__name__)


def run_build_vocab(
    h5ads: Sequence[str | os.PathLike],
    vocab: str | os.PathLike,
    datasets_record: str | os.PathLike,
    settings: Mapping[str, Any],
    datasets: Sequence[str],
    seed: int,
) -> None:
    """Rule build_vocab: the gene vocabulary and gene embeddings (SE protein_embeddings.pt format)
    from the QC'd training cells of `h5ads` (the datasets `datasets`), written to `vocab`; the list
    of datasets goes to `datasets_record`. `settings`: the config's vocab section (source, dim,
    max_cells)."""
    start_stage(seed)  # every draw below has its own seeded generator; this is the contract
    log.info("building the vocabulary from datasets %s", datasets)
    built = build_vocab_from_h5ads(list(h5ads), settings["source"], settings["dim"], seed, settings["max_cells"])
    built.save(vocab)
    log.info(
        "vocabulary: %d genes x %d dims (source %s, hash %s) -> %s",
        len(built),
        built.dim,
        settings["source"],
        built.hash[:12],
        vocab,
    )
    # with vocab.datasets null, later runs keep training on this list (workflow/rules/common.smk)
    with atomic_output(datasets_record) as tmp:
        tmp.write_text(json.dumps(list(datasets)))


def run_tokenize(
    h5ad: str | os.PathLike,
    tokens: str | os.PathLike,
    vocab: str | os.PathLike,
    settings: Mapping[str, Any],
    seed: int,
    threads: int = 1,
    dataset: str = "dataset",
) -> dict[str, Any]:
    """Rule tokenize: the QC'd cells of `dataset` (`h5ad`) -> cell sentences in the folder `tokens`
    against the gene vocabulary `vocab`, in `threads` worker processes; returns the coverage row.
    `settings`: the config's tokenize section (length, method, min_coverage, target_sum,
    chunk_size; chunk_size and threads do not change the tokens)."""
    start_stage(seed)  # the tokens draw from named streams of `seed` alone; this is the contract
    return tokenize_h5ad(
        h5ad,
        tokens,
        GeneVocab.load(vocab),
        length=settings["length"],
        method=settings["method"],
        seed=seed,
        chunk_size=settings["chunk_size"],
        workers=threads,
        min_coverage=settings["min_coverage"],
        target_sum=settings["target_sum"],
        dataset=dataset,
        source_hash=file_sha256(h5ad),
    )
