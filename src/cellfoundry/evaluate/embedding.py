"""Embedding metrics: kNN label transfer (cellfoundry's) and the scIB metrics through scib-metrics.

Every function takes an embedding `X` [N, D] (float) and per-cell labels [N] (any hashable);
scores are floats where higher is better. The scIB metrics (Luecken et al. 2022) are computed by
the scib-metrics package, so they can be set beside published scIB / scib-metrics tables:

- bio conservation: `isolated_labels` (label ASW of the labels in the fewest batches), `nmi` /
  `ari` (Leiden clusters vs labels at the NMI-best resolution), `asw_label` (silhouette of the
  labels, rescaled to [0, 1]), `clisi` (scaled cell-type LISI);
- batch correction: `asw_batch` (per label, 1 - |silhouette of batch|), `ilisi` (scaled
  integration LISI), `kbet_acceptance` (scib-metrics' kbet_per_label), `graph_connectivity`,
  `pcr_comparison` (batch variance explained in the pre-integration embedding vs this one).

Neighbour graphs are exact (scikit-learn), self included, as scib-metrics' Benchmarker builds them
with pynndescent: 15 neighbours for Leiden and graph connectivity, 50 for kBET, 90 for the LISIs.
The aggregates follow Benchmarker.get_results (no min-max scaling): `bio_conservation` and
`batch_correction` are the means of their class's computed metrics, `scib_total` = 0.6 bio +
0.4 batch. Benchmarker's default batch set uses BRAS in place of the batch silhouette; here the
batch silhouette of the scIB paper is kept, so the aggregates read as in its tables.

Unlabelled cells (label None, NaN, empty, or pandas' "nan" rendering of NaN) take no part in the
label metrics nor in the label-stratified batch metrics; without any labels those batch metrics
treat all cells as one group. A metric that cannot be computed (no labels, fewer than two labels,
no or one batch, no pre-integration embedding) is listed with its reason in `compare_embeddings`'
summary["skipped"] and as a row with value NaN, never silently dropped.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
from sklearn.neighbors import NearestNeighbors

from cellfoundry.evaluate.knn import knn_label_transfer
from cellfoundry.utils import unlabelled

log = logging.getLogger(__name__)

#: scib-metrics' Leiden resolution grid (nmi_ari_cluster_labels_leiden, optimize_resolution).
DEFAULT_RESOLUTIONS = tuple(np.round(np.arange(1, 11) * 0.2, 2))
#: Neighbour counts of scib-metrics' Benchmarker (self included): Leiden and graph
#: connectivity, kBET, LISI.
N_GRAPH, N_KBET, N_LISI = 15, 50, 90

BIO_METRICS = ("isolated_labels", "nmi", "ari", "asw_label", "clisi")
BATCH_METRICS = ("asw_batch", "ilisi", "kbet_acceptance", "graph_connectivity", "pcr_comparison")
AGGREGATES = ("bio_conservation", "batch_correction", "scib_total")
#: Reported per embedding but not a score (no "higher is better").
INFO_METRICS = ("leiden_resolution",)
#: Metrics that need cell-type labels (with the aggregates built on them).
LABEL_METRICS = ("knn_accuracy", "knn_macro_f1", *BIO_METRICS, "bio_conservation", "scib_total")
#: Where each number comes from (the TSV's "source" column).
SOURCE = {m: "scib-metrics" for m in (*BIO_METRICS, *BATCH_METRICS)} | {
    "knn_accuracy": "cellfoundry",
    "knn_macro_f1": "cellfoundry",
    "leiden_resolution": "scib-metrics",
    **dict.fromkeys(AGGREGATES, "as scib-metrics Benchmarker"),
}


def _labels(labels: Sequence) -> np.ndarray:
    return np.asarray([str(v) for v in labels])


def label_skip_reason(labels: Sequence | None) -> str | None:
    """Why label metrics cannot be computed on `labels` (None = they can)."""
    if labels is None:
        return "no cell-type labels: datasets.<name>.cell_type is null"
    missing = unlabelled(labels)
    if len(np.unique(_labels(np.asarray(labels, dtype=object)[~missing]))) < 2:
        return (
            f"fewer than two distinct labels among the {int((~missing).sum())} labelled cells "
            f"({int(missing.sum())} unlabelled)"
        )
    return None


def neighbors(X: np.ndarray, n_neighbors: int = N_LISI):
    """Exact Euclidean kNN of `X` [N, D] as scib-metrics' NeighborsResults ([N, k], self first),
    k = min(n_neighbors, N). Exact, unlike Benchmarker's pynndescent: deterministic, and no numba
    compilation per job."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    X = np.asarray(X, dtype=np.float32)
    dist, idx = NearestNeighbors(n_neighbors=min(n_neighbors, len(X))).fit(X).kneighbors(X)
    return NeighborsResults(indices=idx, distances=dist)


@contextmanager
def _exact_diffusion_neighbors():
    """Inside, scib-metrics' kbet_per_label finds its diffusion-map neighbours with `neighbors`
    (exact) instead of pynndescent, whose numba compilation costs 60-90 s in every process on a
    2-core machine; pynndescent approximates the same exact neighbours."""
    import scib_metrics.nearest_neighbors as module

    original = module.pynndescent
    module.pynndescent = lambda X, n_neighbors, random_state=0, n_jobs=1: neighbors(X, n_neighbors)
    try:
        yield
    finally:
        module.pynndescent = original


def _subset(nn, n: int):
    return nn.subset_neighbors(min(n, nn.n_neighbors))


def leiden_nmi_ari(
    nn, labels: Sequence, resolutions: Sequence[float] = DEFAULT_RESOLUTIONS, seed: int = 0
) -> dict[str, float]:
    """scib-metrics' Leiden NMI/ARI on the 15-neighbour graph of `nn` (from `neighbors`): the
    resolution with the best NMI (first on ties) among `resolutions`, as its optimize_resolution
    does over DEFAULT_RESOLUTIONS. Returns {"nmi", "ari", "leiden_resolution"}."""
    import scib_metrics

    graph, y = _subset(nn, N_GRAPH), _labels(labels)
    best = None
    for res in resolutions:
        got = scib_metrics.nmi_ari_cluster_labels_leiden(
            graph, y, optimize_resolution=False, resolution=float(res), seed=seed
        )
        if best is None or got["nmi"] > best[0]:
            best = (float(got["nmi"]), float(got["ari"]), float(res))
    return dict(zip(("nmi", "ari", "leiden_resolution"), best))


def embedding_metrics(
    X: np.ndarray,
    labels: Sequence | None,
    batches: Sequence | None = None,
    X_pre: np.ndarray | None = None,
    k: int = 15,
    n_folds: int = 5,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    silhouette_max_cells: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """All embedding metrics of `X` [N, D] that the given labels/batches allow, as name -> value.

    `X_pre` [N, D']: the pre-integration embedding of the same cells for `pcr_comparison` (the
    PCA baseline in the workflow). Label metrics use the labelled cells only (see `unlabelled`);
    so do the label-stratified batch metrics when there are labels (without labels they treat all
    cells as one group). Silhouettes (O(N^2)) score a seeded subsample above
    `silhouette_max_cells` cells."""
    import scib_metrics

    out: dict[str, float] = {}
    X = np.asarray(X, dtype=np.float32)
    has_labels = label_skip_reason(labels) is None
    has_batches = batches is not None and len(np.unique(_labels(batches))) > 1
    keep = ~unlabelled(labels) if has_labels else np.ones(len(X), bool)
    Xl = X[keep]
    y = _labels(np.asarray(labels, dtype=object)[keep]) if has_labels else np.full(len(Xl), "all cells")
    b = _labels(batches) if has_batches else None
    nn = neighbors(Xl)
    sub = np.arange(len(Xl))  # cells scored by the silhouettes
    if silhouette_max_cells is not None and len(Xl) > silhouette_max_cells:
        sub = np.sort(np.random.default_rng(seed).choice(len(Xl), silhouette_max_cells, replace=False))
    if has_labels:
        out.update(knn_label_transfer(Xl, y, k=k, n_folds=n_folds, seed=seed))
        out.update(leiden_nmi_ari(nn, y, resolutions=resolutions, seed=seed))
        out["asw_label"] = scib_metrics.silhouette_label(Xl[sub], y[sub])
        out["clisi"] = scib_metrics.clisi_knn(_subset(nn, N_LISI), y)
        if has_batches:
            out["isolated_labels"] = scib_metrics.isolated_labels(Xl[sub], y[sub], b[keep][sub])
    if has_batches:
        bl = b[keep]
        try:
            out["asw_batch"] = scib_metrics.silhouette_batch(Xl[sub], y[sub], bl[sub])
        except ValueError:  # no label spans two batches with more cells than batches
            out["asw_batch"] = np.nan
        with warnings.catch_warnings(), _exact_diffusion_neighbors():
            warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
            out["kbet_acceptance"] = scib_metrics.kbet_per_label(_subset(nn, N_KBET), bl, y)
        out["graph_connectivity"] = scib_metrics.graph_connectivity(_subset(nn, N_GRAPH), y)
        out["ilisi"] = scib_metrics.ilisi_knn(_subset(nn if keep.all() else neighbors(X), N_LISI), b)
        if X_pre is not None:
            with warnings.catch_warnings():  # a negative score is set to 0 by scib-metrics; the warning says so
                warnings.filterwarnings("ignore", message="PCR comparison score is negative")
                out["pcr_comparison"] = scib_metrics.pcr_comparison(
                    np.asarray(X_pre, dtype=np.float32), X, b, categorical=True
                )
    return {key: float(value) for key, value in out.items()}


def aggregates(values: dict[str, float]) -> dict[str, float]:
    """bio_conservation / batch_correction = mean of the finite metrics of each class,
    scib_total = 0.6 bio + 0.4 batch, as scib-metrics' Benchmarker.get_results (unscaled)."""
    out = {}
    for name, members in (("bio_conservation", BIO_METRICS), ("batch_correction", BATCH_METRICS)):
        finite = [values[m] for m in members if np.isfinite(values.get(m, np.nan))]
        if finite:
            out[name] = float(np.mean(finite))
    if len(out) == 2:
        out["scib_total"] = 0.6 * out["bio_conservation"] + 0.4 * out["batch_correction"]
    return out


def skipped_metrics(labels: Sequence | None, batches: Sequence | None, has_pre: bool = True) -> dict[str, str]:
    """metric -> why it is not computed, for the label and batch metrics that cannot be."""
    skipped = {}
    if batches is None or len(np.unique(_labels(batches))) < 2:
        why = "no batch labels: datasets.<name>.batch is null" if batches is None else "a single batch"
        skipped.update(dict.fromkeys((*BATCH_METRICS, "isolated_labels", "batch_correction", "scib_total"), why))
    elif not has_pre:
        skipped["pcr_comparison"] = "no pre-integration embedding to compare with"
    reason = label_skip_reason(labels)
    if reason:
        skipped.update(dict.fromkeys(LABEL_METRICS, reason))
    return skipped


def compare_embeddings(
    embeddings: dict[str, np.ndarray],
    labels: Sequence | None,
    batches: Sequence | None = None,
    model_methods: Sequence[str] = (),
    pre_integration: str | None = None,
    **kwargs,
) -> tuple[list[dict], dict]:
    """Score each embedding (name -> [N, D], same cells in the same order) with
    `embedding_metrics`, `pre_integration` (a key of `embeddings`) being the X_pre of
    pcr_comparison. Returns (rows, summary): rows = long-format dicts (method, metric, value, dim,
    source, skipped); summary = per metric the best method and, for each of `model_methods`, the
    baselines (the other methods) that beat it, so a loss is stated rather than hidden; the
    labelled / unlabelled cell counts; "aggregated": the metrics averaged into each aggregate;
    "skipped": metric -> reason for every metric not computed (each also a row per method with
    value NaN and the reason in "skipped")."""
    rows: list[dict] = []
    scores: dict[str, dict[str, float]] = {}
    X_pre = embeddings.get(pre_integration) if pre_integration else None
    skipped = skipped_metrics(labels, batches, has_pre=X_pre is not None)
    for method, X in embeddings.items():
        values = embedding_metrics(X, labels, batches, X_pre=X_pre, **kwargs)
        for metric in [m for m in BATCH_METRICS if m in values and not np.isfinite(values[m])]:
            # kBET / batch ASW are undefined when no label has enough cells in two batches
            skipped.setdefault(metric, "undefined here: no label has enough cells in two or more batches")
            del values[metric]
        values.update(aggregates(values))
        scores[method] = values
        rows += [
            dict(method=method, metric=m, value=v, dim=X.shape[1], source=SOURCE[m], skipped="")
            for m, v in values.items()
        ]
        log.info("%s (%d dims): %s", method, X.shape[1], ", ".join(f"{m}={v:.3f}" for m, v in values.items()))
    for method, X in embeddings.items():
        rows += [
            dict(method=method, metric=m, value=np.nan, dim=X.shape[1], source=SOURCE[m], skipped=r)
            for m, r in skipped.items()
            if m not in scores[method]
        ]
    n_cells = int(len(next(iter(embeddings.values()))))
    n_unlabelled = int(unlabelled(labels).sum()) if labels is not None else n_cells
    first = next(iter(scores.values()))
    summary: dict = {
        "n_cells": n_cells,
        "n_labelled": n_cells - n_unlabelled,
        "n_unlabelled": n_unlabelled,
        "aggregated": {
            "bio_conservation": [m for m in BIO_METRICS if m in first],
            "batch_correction": [m for m in BATCH_METRICS if m in first],
        },
        "skipped": skipped,
        "best": {},
        "model_loses_to": {},
    }
    for metric in [m for m in first if m not in INFO_METRICS]:
        ranked = sorted(scores, key=lambda m: -np.nan_to_num(scores[m].get(metric, np.nan), nan=-np.inf))
        summary["best"][metric] = ranked[0]
        for model in model_methods:
            if model not in scores:
                continue
            beaten_by = [
                m
                for m in scores
                if m not in model_methods and scores[m].get(metric, -np.inf) > scores[model].get(metric, np.inf)
            ]
            if beaten_by:
                summary["model_loses_to"].setdefault(model, {})[metric] = beaten_by
    summary["scores"] = scores
    return rows, summary
