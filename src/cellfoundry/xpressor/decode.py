"""Decoding tokens to genes, batch by batch: the diffusion stage's samples and the evaluation's
decoded-real ceiling go through here, so [cells x genes] is never held dense at once.

A decoder is a function (tokens [n, ...], library [n], seed, with_counts=True) -> iterator of
DecodedBatch: the mean counts of the decoded distribution for each cell's library size and,
with `with_counts`, counts sampled from it (one seeded stream over all batches).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from cellfoundry.models.xpressor import expected_counts, load_xpressor, sample_counts
from cellfoundry.progress import Progress
from cellfoundry.utils import UserError
from cellfoundry.vocab import GeneVocab

log = logging.getLogger(__name__)

BATCH_CELLS = 256


@dataclass
class DecodedBatch:
    lo: int  # rows lo:hi of the decoded cells
    hi: int
    mean: np.ndarray  # [hi - lo, G] float32 expected counts
    counts: np.ndarray | None  # [hi - lo, G] float32 sampled counts (None: not drawn)


Decoder = Callable[..., Iterator[DecodedBatch]]


def xpressor_decoder(
    xpressor_checkpoint: str | os.PathLike, vocab: str | os.PathLike, var_names: Sequence[str]
) -> Decoder:
    """The Xpressor decoder over `var_names` as a Decoder of latent tokens [n, M, D]. Genes
    absent from the vocabulary cannot be decoded and stay zero."""
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
    n_genes = len(var_names)

    def widen(x: torch.Tensor) -> np.ndarray:
        if len(cols) == n_genes:
            return x.numpy()
        out = np.zeros((x.shape[0], n_genes), dtype=np.float32)
        out[:, cols] = x.numpy()
        return out

    def decode(latents: np.ndarray, library: np.ndarray, seed: int, with_counts: bool = True) -> Iterator[DecodedBatch]:
        generator = torch.Generator().manual_seed(seed)
        progress = Progress(len(latents), verb="decoded", unit="cells")
        for lo in range(0, len(latents), BATCH_CELLS):
            hi = min(len(latents), lo + BATCH_CELLS)
            lat = torch.from_numpy(np.asarray(latents[lo:hi], dtype=np.float32))
            lib = torch.from_numpy(np.asarray(library[lo:hi], dtype=np.float32))
            with torch.no_grad():
                out = model.decode(lat, gene_vectors)
                mean = widen(expected_counts(out, lib, loss))
                counts = widen(sample_counts(out, lib, loss, generator)) if with_counts else None
            yield DecodedBatch(lo, hi, mean, counts)
            progress.update(hi - lo)

    return decode


def sampled_counts(batches: Iterable[DecodedBatch]) -> sp.csr_matrix:
    """The sampled counts of all batches as one CSR matrix [n, G] (float32)."""
    return sp.vstack([sp.csr_matrix(b.counts) for b in batches], format="csr", dtype=np.float32)


def predict_means(batches: Iterable[DecodedBatch], predict: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`predict` (e.g. a label classifier) applied to the mean counts of each batch, concatenated."""
    return np.concatenate([predict(b.mean) for b in batches])
