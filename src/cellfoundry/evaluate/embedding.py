"""Embedding metrics: label transfer, bio conservation, batch mixing.

Every function takes an embedding `X` [N, D] (float) and per-cell labels [N] (any hashable);
scores are floats where higher is better unless said otherwise. Definitions follow scIB
(Luecken et al. 2022) / scib-metrics so that numbers read the same way:
- `asw_label`: (silhouette + 1) / 2 of the labels, Euclidean; 1 = compact separated labels.
- `nmi` / `ari`: Leiden clusters of the kNN graph vs labels, resolution chosen by NMI.
- `asw_batch`: per label, mean of 1 - |silhouette of batch|; averaged over labels; 1 = mixed.
- `ilisi`: graph iLISI (perplexity 30), scaled (median - 1) / (n_batches - 1); 1 = mixed.
- `kbet_acceptance`: kBET-style fraction of neighbourhoods whose batch composition passes a
  chi-square test against the global composition (alpha 0.05); 1 = mixed.

Unlabelled cells (label None, NaN, empty, or pandas' "nan" rendering of NaN) take no part in the
label metrics; a metric that cannot be computed (no labels, fewer than two distinct labels, one
batch) is listed with its reason in `compare_embeddings`' summary["skipped"] and as a row with
value NaN, never silently dropped.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    f1_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

log = logging.getLogger(__name__)

DEFAULT_RESOLUTIONS = tuple(np.round(np.arange(0.1, 2.01, 0.1), 2))


def _labels(labels: Sequence) -> np.ndarray:
    return np.asarray([str(v) for v in labels])


def unlabelled(labels: Sequence) -> np.ndarray:
    """[N] bool, True where a label is missing: None, NaN, empty, or "nan" (pandas' rendering
    of NaN after astype(str))."""
    values = pd.Series(np.asarray(labels, dtype=object))
    text = values.astype(str).str.strip().str.lower()
    return (values.isna() | text.isin(["", "nan"])).to_numpy()


def label_skip_reason(labels: Sequence | None) -> str | None:
    """Why label metrics cannot be computed on `labels` (None = they can)."""
    if labels is None:
        return "no cell-type labels: datasets.<name>.cell_type is null"
    missing = unlabelled(labels)
    if len(np.unique(_labels(np.asarray(labels, dtype=object)[~missing]))) < 2:
        return f"fewer than two distinct labels among the {int((~missing).sum())} labelled cells ({int(missing.sum())} unlabelled)"
    return None


def knn_label_transfer(X: np.ndarray, labels: Sequence, k: int = 15, n_folds: int = 5, seed: int = 0) -> dict[str, float]:
    """kNN (k neighbours, Euclidean) label prediction, stratified `n_folds`-fold cross-validation.

    X: [N, D]; labels: [N]. Returns {"knn_accuracy", "knn_macro_f1"} over all out-of-fold
    predictions. Labels with fewer members than `n_folds` still take part (scikit-learn warns).
    """
    X = np.asarray(X, dtype=np.float64)
    y = _labels(labels)
    if len(np.unique(y)) < 2:
        raise ValueError("label transfer needs at least two distinct labels")
    n_folds = max(2, min(n_folds, np.bincount(np.unique(y, return_inverse=True)[1]).max()))
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    pred = np.empty_like(y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for train, test in folds.split(X, y):
            clf = KNeighborsClassifier(n_neighbors=min(k, len(train)))
            clf.fit(X[train], y[train])
            pred[test] = clf.predict(X[test])
    return {
        "knn_accuracy": float(accuracy_score(y, pred)),
        "knn_macro_f1": float(f1_score(y, pred, average="macro")),
    }


def asw_label(X: np.ndarray, labels: Sequence, max_cells: int | None = None, seed: int = 0) -> float:
    """(silhouette(X, labels) + 1) / 2, the scIB-scaled label ASW in [0, 1].

    Silhouettes cost O(N^2): above `max_cells` cells a seeded random subsample is scored."""
    y = _labels(labels)
    if len(np.unique(y)) < 2:
        raise ValueError("silhouette needs at least two distinct labels")
    sample = max_cells if max_cells is not None and len(y) > max_cells else None
    return float((silhouette_score(np.asarray(X, dtype=np.float64), y, sample_size=sample, random_state=seed) + 1.0) / 2.0)


def knn_graph_adata(X: np.ndarray, n_neighbors: int = 15, seed: int = 0):
    """An AnnData holding `X` [N, D] in obsm["X_emb"] with scanpy's kNN graph computed on it.

    Exact neighbours (scikit-learn) with Gaussian-kernel connectivities: the same Leiden
    partitions as the UMAP-kernel graph in practice, without the ~15 s of numba compilation that
    pynndescent and UMAP's fuzzy set cost in every job."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.zeros((len(X), 0), dtype=np.float32))
    adata.obsm["X_emb"] = np.asarray(X, dtype=np.float32)
    sc.pp.neighbors(
        adata, n_neighbors=min(n_neighbors, len(X) - 1), use_rep="X_emb", method="gauss", transformer="sklearn", random_state=seed
    )
    return adata


def leiden_nmi_ari(
    X: np.ndarray,
    labels: Sequence,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    n_neighbors: int = 15,
    seed: int = 0,
    graph=None,
) -> dict[str, float]:
    """NMI and ARI of Leiden clusters vs labels at the resolution with the best NMI (as scIB).

    X: [N, D]. `graph`: an AnnData from `knn_graph_adata` to reuse. Returns {"nmi", "ari",
    "leiden_resolution", "leiden_n_clusters"}.
    """
    import scanpy as sc

    y = _labels(labels)
    adata = graph if graph is not None else knn_graph_adata(X, n_neighbors=n_neighbors, seed=seed)
    best = None
    for res in resolutions:
        sc.tl.leiden(adata, resolution=float(res), key_added="_leiden", random_state=seed, flavor="igraph", n_iterations=2, directed=False)
        clusters = adata.obs["_leiden"].to_numpy()
        nmi = normalized_mutual_info_score(y, clusters)
        if best is None or nmi > best[0]:
            best = (nmi, adjusted_rand_score(y, clusters), float(res), len(np.unique(clusters)))
    nmi, ari, res, n_clusters = best
    return {"nmi": float(nmi), "ari": float(ari), "leiden_resolution": res, "leiden_n_clusters": float(n_clusters)}


def asw_batch(X: np.ndarray, batches: Sequence, labels: Sequence, max_cells: int | None = None, seed: int = 0) -> float:
    """scIB batch ASW: for each label, mean over its cells of 1 - |silhouette by batch|; then the
    mean over labels. Labels with one cell or one batch are skipped. 1 = batches well mixed.
    Above `max_cells` cells a seeded random subsample is scored (silhouettes are O(N^2))."""
    X = np.asarray(X, dtype=np.float64)
    b, y = _labels(batches), _labels(labels)
    if max_cells is not None and len(X) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(len(X), max_cells, replace=False))
        X, b, y = X[keep], b[keep], y[keep]
    scores = []
    for label in np.unique(y):
        mask = y == label
        n_batches = len(np.unique(b[mask]))
        if mask.sum() < 3 or n_batches < 2 or n_batches >= mask.sum():
            continue
        sil = silhouette_samples(X[mask], b[mask])
        scores.append(np.mean(1.0 - np.abs(sil)))
    if not scores:
        return float("nan")
    return float(np.mean(scores))


def _simpson_from_distances(dist: np.ndarray, codes: np.ndarray, n_cats: int, perplexity: float, n_iter: int = 50) -> np.ndarray:
    """Inverse Simpson index per row of kNN distances [N, k] with neighbour categories [N, k],
    Gaussian weights calibrated to `perplexity` by bisection on the precision (as Harmony's LISI),
    all rows at once."""
    n = len(dist)
    target = np.log(perplexity)
    d = dist - dist.min(1, keepdims=True)
    beta = np.ones(n)
    lo, hi = np.zeros(n), np.full(n, np.inf)
    for _ in range(n_iter):
        p = np.exp(-d * beta[:, None])
        p /= p.sum(1, keepdims=True)
        entropy = -np.sum(p * np.log(np.clip(p, 1e-300, None)), axis=1)
        too_flat = entropy > target  # sharpen: larger precision
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2, (lo + hi) / 2)
    p = np.exp(-d * beta[:, None])
    p /= p.sum(1, keepdims=True)
    probs = np.zeros((n, n_cats))
    np.add.at(probs, (np.repeat(np.arange(n), codes.shape[1]), codes.ravel()), p.ravel())
    return 1.0 / np.sum(probs**2, axis=1)


def ilisi(X: np.ndarray, batches: Sequence, perplexity: float = 30.0) -> float:
    """Graph iLISI scaled to [0, 1]: (median inverse Simpson of batches in each cell's
    perplexity-weighted neighbourhood - 1) / (n_batches - 1). 1 = every neighbourhood mixed."""
    X = np.asarray(X, dtype=np.float64)
    _, codes = np.unique(_labels(batches), return_inverse=True)
    n_cats = codes.max() + 1
    if n_cats < 2:
        return float("nan")
    k = int(min(3 * perplexity, len(X) - 1))
    perplexity = min(perplexity, k / 3)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    dist, idx = dist[:, 1:] ** 2, idx[:, 1:]  # drop self; Harmony weights squared distances
    simpson = _simpson_from_distances(dist, codes[idx], n_cats, perplexity)
    return float((np.median(simpson) - 1.0) / (n_cats - 1))


def kbet_acceptance(X: np.ndarray, batches: Sequence, k: int = 25, alpha: float = 0.05) -> float:
    """kBET-style acceptance rate: fraction of cells whose k-neighbourhood batch counts pass a
    chi-square goodness-of-fit test against the global batch frequencies at level `alpha`."""
    X = np.asarray(X, dtype=np.float64)
    _, codes = np.unique(_labels(batches), return_inverse=True)
    n_cats = codes.max() + 1
    if n_cats < 2:
        return float("nan")
    k = min(k, len(X) - 1)
    idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X, return_distance=False)
    observed = np.stack([np.bincount(codes[row], minlength=n_cats) for row in idx])
    expected = np.bincount(codes, minlength=n_cats) / len(codes) * k
    pvalues = stats.chisquare(observed, f_exp=np.broadcast_to(expected, observed.shape), axis=1).pvalue
    return float(np.mean(pvalues >= alpha))


def embedding_metrics(
    X: np.ndarray,
    labels: Sequence | None,
    batches: Sequence | None = None,
    k: int = 15,
    n_folds: int = 5,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    silhouette_max_cells: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """All embedding metrics of `X` [N, D] that the given labels/batches allow, as name -> value.

    Label metrics use the labelled cells only (see `unlabelled`); so does the label-stratified
    batch ASW when there are labels (without labels it treats all cells as one group)."""
    out: dict[str, float] = {}
    X = np.asarray(X)
    if label_skip_reason(labels) is None:
        keep = ~unlabelled(labels)
        Xl, yl = X[keep], np.asarray(labels, dtype=object)[keep]
        out.update(knn_label_transfer(Xl, yl, k=k, n_folds=n_folds, seed=seed))
        out["asw_label"] = asw_label(Xl, yl, max_cells=silhouette_max_cells, seed=seed)
        out.update(leiden_nmi_ari(Xl, yl, resolutions=resolutions, n_neighbors=k, seed=seed))
    else:
        keep, yl = np.ones(len(X), bool), np.zeros(len(X))
    if batches is not None and len(np.unique(_labels(batches))) > 1:
        out["asw_batch"] = asw_batch(X[keep], np.asarray(batches, dtype=object)[keep], yl, max_cells=silhouette_max_cells, seed=seed)
        out["ilisi"] = ilisi(X, batches)
        out["kbet_acceptance"] = kbet_acceptance(X, batches)
    return out


BIO_METRICS = ("asw_label", "nmi", "ari")
BATCH_METRICS = ("asw_batch", "ilisi", "kbet_acceptance")
#: Reported per embedding but not a score (no "higher is better").
INFO_METRICS = ("leiden_resolution", "leiden_n_clusters")
#: Metrics that need cell-type labels (with the aggregates built on them).
LABEL_METRICS = ("knn_accuracy", "knn_macro_f1", *BIO_METRICS, "bio_conservation", "overall_scib_style")


def skipped_metrics(labels: Sequence | None, batches: Sequence | None) -> dict[str, str]:
    """metric -> why it is not computed, for the label and batch metrics that cannot be."""
    skipped = {}
    reason = label_skip_reason(labels)
    if reason:
        skipped.update(dict.fromkeys(LABEL_METRICS, reason))
    if batches is None:
        skipped.update(dict.fromkeys((*BATCH_METRICS, "batch_correction", "overall_scib_style"), "no batch labels: datasets.<name>.batch is null"))
    elif len(np.unique(_labels(batches))) < 2:
        skipped.update(dict.fromkeys((*BATCH_METRICS, "batch_correction", "overall_scib_style"), "a single batch"))
    return skipped


def compare_embeddings(
    embeddings: dict[str, np.ndarray],
    labels: Sequence | None,
    batches: Sequence | None = None,
    model_methods: Sequence[str] = (),
    **kwargs,
) -> tuple[list[dict], dict]:
    """Score each embedding (name -> [N, D], same cells in the same order) with
    `embedding_metrics`. Returns (rows, summary): rows = long-format dicts (method, metric,
    value, skipped); summary = per metric the best method and, for each of `model_methods`, the
    baselines (the other methods) that beat it, so a loss is stated rather than hidden; the
    labelled / unlabelled cell counts; "skipped": metric -> reason for every metric not computed
    (each also a row per method with value NaN and the reason in "skipped").

    Aggregates as scIB weights them (mean of the bio metrics; mean of the batch metrics;
    overall = 0.6 bio + 0.4 batch) are added as "bio_conservation", "batch_correction" and
    "overall_scib_style"; they average cellfoundry's own implementations, not scib-metrics'.
    """
    rows: list[dict] = []
    scores: dict[str, dict[str, float]] = {}
    skipped = skipped_metrics(labels, batches)
    n_unlabelled = int(unlabelled(labels).sum()) if labels is not None else int(len(next(iter(embeddings.values()))))
    for method, X in embeddings.items():
        values = embedding_metrics(X, labels, batches, **kwargs)
        bio = [values[m] for m in BIO_METRICS if m in values]
        batch = [values[m] for m in BATCH_METRICS if m in values and np.isfinite(values[m])]
        if bio:
            values["bio_conservation"] = float(np.mean(bio))
        if batch:
            values["batch_correction"] = float(np.mean(batch))
            if bio:
                values["overall_scib_style"] = 0.6 * values["bio_conservation"] + 0.4 * values["batch_correction"]
        scores[method] = values
        rows += [dict(method=method, metric=k, value=v, dim=X.shape[1], skipped="") for k, v in values.items()]
        rows += [dict(method=method, metric=k, value=np.nan, dim=X.shape[1], skipped=r) for k, r in skipped.items() if k not in values]
        log.info("%s (%d dims): %s", method, X.shape[1], ", ".join(f"{k}={v:.3f}" for k, v in values.items()))
    n_cells = int(len(next(iter(embeddings.values()))))
    summary: dict = {"n_cells": n_cells, "n_labelled": n_cells - n_unlabelled, "n_unlabelled": n_unlabelled, "skipped": skipped, "best": {}, "model_loses_to": {}}
    metrics = [m for m in next(iter(scores.values())) if m not in INFO_METRICS]
    for metric in metrics:
        ranked = sorted(scores, key=lambda m: -np.nan_to_num(scores[m].get(metric, np.nan), nan=-np.inf))
        summary["best"][metric] = ranked[0]
        for model in model_methods:
            if model not in scores:
                continue
            beaten_by = [m for m in scores if m not in model_methods and scores[m].get(metric, -np.inf) > scores[model].get(metric, np.inf)]
            if beaten_by:
                summary["model_loses_to"].setdefault(model, {})[metric] = beaten_by
    summary["scores"] = scores
    return rows, summary
