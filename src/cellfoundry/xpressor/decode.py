"""Decoding latent tokens to genes with the Xpressor decoder: the diffusion stage's samples in
the latent token space and the evaluation's decoded-real ceiling go through here."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cellfoundry.models.xpressor import expected_counts, load_xpressor, sample_counts
from cellfoundry.utils import UserError
from cellfoundry.vocab import GeneVocab

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    mean: np.ndarray  # [n, G] expected counts
    counts: np.ndarray  # [n, G] sampled counts


def xpressor_decoder(xpressor_checkpoint: str | os.PathLike, vocab: str | os.PathLike, var_names: Sequence[str]):
    """A function (latents [n, M, D], library [n], seed) -> Decoded over `var_names`, using the
    Xpressor decoder. Genes absent from the vocabulary cannot be decoded and stay zero."""
    xp = load_xpressor(xpressor_checkpoint)
    gene_vocab = GeneVocab.load(vocab)
    index = gene_vocab.index
    cols = np.array([i for i, g in enumerate(var_names) if g in index], dtype=np.int64)
    if len(cols) == 0:
        raise UserError(f"none of the dataset's genes is in the vocabulary {vocab}; check the gene symbols.")
    if len(cols) < len(var_names):
        log.warning(
            "%d of %d genes are not in the vocabulary and are left at zero", len(var_names) - len(cols), len(var_names)
        )
    gene_vectors = torch.as_tensor(gene_vocab.table)[torch.as_tensor([index[var_names[i]] for i in cols])].float()
    model, loss = xp.model, xp.config.loss

    def decode(latents: np.ndarray, library: np.ndarray, seed: int, batch_size: int = 256) -> Decoded:
        n = len(latents)
        mean = np.zeros((n, len(var_names)), dtype=np.float32)
        counts = np.zeros_like(mean)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for s in range(0, n, batch_size):
                lat = torch.from_numpy(latents[s : s + batch_size]).float()
                lib = torch.from_numpy(library[s : s + batch_size]).float()
                out = model.decode(lat, gene_vectors)
                mean[s : s + len(lat), cols] = expected_counts(out, lib, loss).numpy()
                counts[s : s + len(lat), cols] = sample_counts(out, lib, loss, generator).numpy()
        return Decoded(mean, counts)

    return decode
