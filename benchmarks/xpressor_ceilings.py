"""What a perfect linear read-out could reconstruct from each input of the Xpressor comparison.

Issue 5 asks Xpressor to reconstruct held-out cells better than decoders trained on one pooled
vector (CLS, mean of gene tokens). This prints, on a finished demo run, the held-out per-cell
Pearson and MSE (log1p-normalised, all decoded genes) of ridge regressions fitted on the train
split from:

- the pooled vectors the baselines see (CLS, mean of the SE gene-token outputs);
- smooth set features of the gene tokens (mean of random ReLU features), a proxy for what soft
  attention pooling extracts without gene-sharp attention;
- which genes the cell expresses (binary, all genes), the information the gene tokens carry;
- the identity of the tokens alone: the mean of the tokens' frozen gene vectors, and soft
  attention of 8 random queries over those gene vectors (temperature 2), the most a gene-identity
  channel into the latents could add;
- and, for scale, the per-cell-type mean profile and PCA-k reconstructions.

    python benchmarks/xpressor_ceilings.py --results results

The trained models' own figures are in results/<dataset>/xpressor/summary.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge

from cellfoundry.evaluate.reconstruction import reconstruction_metrics
from cellfoundry.models.se_checkpoint import load_se
from cellfoundry.xpressor.data import compute_base_cache, load_cell_data


def ridge_scores(features: np.ndarray, target: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    """Best held-out metrics of a ridge read-out over a few penalties, on features standardised
    with the train split's statistics (a feature that varies little between cells still counts)."""
    features = (features - features[train].mean(0)) / (features[train].std(0) + 1e-6)
    best = None
    for alpha in (1.0, 10.0, 100.0, 1e3, 1e4):
        pred = Ridge(alpha=alpha).fit(features[train], target[train]).predict(features[test])
        scores = reconstruction_metrics(pred, target[test])
        if best is None or scores["pearson_mean"] > best["pearson_mean"]:
            best = scores
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results folder of a finished demo run")
    parser.add_argument("--dataset", default="pbmc68k")
    parser.add_argument("--label", default="bulk_labels", help="obs column for the per-type mean profile")
    args = parser.parse_args()
    torch.manual_seed(0)
    res = Path(args.results)
    base, _, vocab = load_se(res / "shared/se/pretrained.ckpt", gene_embeddings=res / "shared/vocab/gene_embeddings.pt")
    data = load_cell_data(
        str(res / args.dataset / "qc/filtered.h5ad"), str(res / args.dataset / "tokens"), vocab, [args.label]
    )
    # the input tokens (layer 0: gene vector + count encoding) and the last layer's outputs
    cache = compute_base_cache(base, vocab.table, data, 64, "cpu", layers=[0, -1])

    counts = data.counts.toarray().astype(np.float64)
    target = np.log1p(counts / counts.sum(1, keepdims=True).clip(min=1) * 1e4)
    train, test = data.split == "train", data.split != "train"
    standardise = lambda t: (t - t.mean((0, 1))) / t.std((0, 1))  # noqa: E731
    inputs, tokens = standardise(cache.tokens[:, 0].numpy()), standardise(cache.tokens[:, -1].numpy())
    rng = np.random.default_rng(0)
    projection, shift = (
        rng.standard_normal((tokens.shape[-1], 1024)) / np.sqrt(tokens.shape[-1]),
        rng.standard_normal(1024),
    )

    labels = data.labels[args.label]  # integer codes
    type_mean = {t: target[train & (labels == t)].mean(0) for t in np.unique(labels[train])}
    rows = {
        "per-cell-type mean profile": reconstruction_metrics(
            np.stack([type_mean[t] for t in labels[test]]), target[test]
        )
    }
    for k in (10, 50):
        pca = PCA(k, random_state=0).fit(target[train])
        rows[f"PCA-{k} of the target itself"] = reconstruction_metrics(
            pca.inverse_transform(pca.transform(target[test])), target[test]
        )
    rows["ridge on CLS (cls baseline input)"] = ridge_scores(cache.cls.numpy(), target, train, test)
    rows["ridge on mean gene token (mean baseline input)"] = ridge_scores(tokens.mean(1), target, train, test)
    rows["ridge on mean input token (layer 0, the mean baseline's extra input)"] = ridge_scores(
        inputs.mean(1), target, train, test
    )
    rows["ridge on mean of 1024 random ReLU token features"] = ridge_scores(
        np.maximum(tokens @ projection + shift, 0).mean(1), target, train, test
    )
    present = ~cache.mask.numpy()[..., None]  # [N, T, 1] real tokens
    gene_vectors = torch.nn.functional.normalize(
        vocab.table[torch.as_tensor(np.asarray(data.gene_ids[:, 1:], dtype=np.int64))], dim=-1
    ).numpy()
    rows["ridge on mean gene vector of the tokens"] = ridge_scores(
        (gene_vectors * present).sum(1) / present.sum(1), target, train, test
    )
    queries = rng.standard_normal((8, gene_vectors.shape[-1]))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    weights = np.where(present, np.exp(2.0 * gene_vectors @ queries.T), 0.0)  # [N, T, 8]
    weights /= weights.sum(1, keepdims=True)
    rows["ridge on 8 soft-attention pools of the gene vectors"] = ridge_scores(
        np.einsum("ntk,nte->nke", weights, gene_vectors).reshape(len(weights), -1), target, train, test
    )
    rows["ridge on which genes are expressed"] = ridge_scores((counts > 0).astype(np.float64), target, train, test)
    print(f"{'input':52s} {'pearson':>8s} {'mse':>7s}   ({int(test.sum())} held-out cells)")
    for name, m in rows.items():
        print(f"{name:52s} {m['pearson_mean']:8.3f} {m['mse']:7.3f}")


if __name__ == "__main__":
    main()
