"""Xpressor reconstruction: the stage's held-out per-cell metrics, and per-gene agreement of
decoded and observed expression computed from the saved latents through Xpressor's public
decoder."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cellfoundry.utils import UserError

log = logging.getLogger(__name__)


def per_gene_pearson(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Pearson r over cells for each gene; predicted/observed [n, G] -> [G] (NaN for genes
    constant in either)."""
    a = predicted - predicted.mean(0)
    b = observed - observed.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(0) / denom, np.nan)


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r over genes for each cell; a/b [n, G] -> [n] (NaN for cells constant in either)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(1) / denom, np.nan)


def reconstruction_metrics(predicted: np.ndarray, observed: np.ndarray) -> dict[str, float]:
    """Per-cell Pearson and Spearman (mean and median over cells) and MSE of predicted vs observed
    log1p-normalised expression, both [N, G] (the Xpressor stage's held-out table)."""
    scores = ReconstructionScores()
    scores.add(predicted, observed)
    return scores.summary()


class ReconstructionScores:
    """reconstruction_metrics accumulated batch by batch of cells, so that scoring many held-out
    cells never holds their [N, G] decoded expression at once."""

    def __init__(self):
        self.pearson, self.spearman, self.squared_error, self.n_values = [], [], 0.0, 0

    def add(self, predicted: np.ndarray, observed: np.ndarray) -> None:
        from scipy.stats import rankdata

        self.pearson.append(rowwise_pearson(predicted, observed))
        self.spearman.append(rowwise_pearson(rankdata(predicted, axis=1), rankdata(observed, axis=1)))
        self.squared_error += float(np.sum((predicted - observed) ** 2, dtype=np.float64))
        self.n_values += predicted.size

    def summary(self) -> dict[str, float]:
        pearson, spearman = np.concatenate(self.pearson), np.concatenate(self.spearman)
        return {
            "pearson_mean": float(np.nanmean(pearson)),
            "pearson_median": float(np.nanmedian(pearson)),
            "spearman_mean": float(np.nanmean(spearman)),
            "spearman_median": float(np.nanmedian(spearman)),
            "mse": self.squared_error / max(self.n_values, 1),
        }


def decode_log1p(model, latents: np.ndarray, gene_vectors, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Decoded log1p-normalised mean expression [n, G] of latent tokens [n, M, D] for the genes
    whose embedding rows are `gene_vectors` [G, E] (Xpressor.decode, batched, no autograd)."""
    import torch

    model = model.to(device).eval()
    gene_vectors = torch.as_tensor(gene_vectors, dtype=torch.float32, device=device)
    out = []
    with torch.inference_mode():
        for lo in range(0, len(latents), batch_size):
            z = torch.as_tensor(np.asarray(latents[lo : lo + batch_size], dtype=np.float32), device=device)
            out.append(model.decode(z, gene_vectors).log1p.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, gene_vectors.shape[0]), np.float32)


def reconstruction_rows(stage_table: pd.DataFrame, summary: dict, gene_r: np.ndarray | None) -> pd.DataFrame:
    """The long-format table of this stage: the Xpressor stage's held-out rows (method, metric,
    value), its trainable-parameter figures, and per-gene Pearson (mean, median) of Xpressor."""
    table = stage_table[["method", "metric", "value"]].copy()
    extra = []
    for method, info in summary.get("methods", {}).items():
        if "trainable_parameters" in info:
            extra.append(dict(method=method, metric="trainable_parameters", value=float(info["trainable_parameters"])))
    if "trainable_fraction" in summary:
        extra.append(dict(method="xpressor", metric="trainable_fraction", value=float(summary["trainable_fraction"])))
    if gene_r is not None and np.isfinite(gene_r).any():
        extra.append(dict(method="xpressor", metric="gene_pearson_mean", value=float(np.nanmean(gene_r))))
        extra.append(dict(method="xpressor", metric="gene_pearson_median", value=float(np.nanmedian(gene_r))))
    return pd.concat([table, pd.DataFrame(extra)], ignore_index=True)


def check_latents(latents: np.ndarray, n_cells: int, path) -> None:
    if latents.ndim != 3 or latents.shape[0] != n_cells:
        raise UserError(
            f"{path} has shape {latents.shape}, expected [{n_cells}, n_latent, d_x] for the cells of qc/filtered.h5ad; "
            "re-run the xpressor stage (snakemake --forcerun xpressor_train)."
        )


def genes_to_show(observed: np.ndarray, gene_r: np.ndarray, n: int) -> np.ndarray:
    """Indices of `n` genes for the scatter: the most variable observed genes (informative, not
    cherry-picked by how well they are reconstructed)."""
    var = observed.var(0)
    return np.argsort(-var)[: min(n, observed.shape[1])]
