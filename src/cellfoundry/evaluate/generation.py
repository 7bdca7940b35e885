"""Generated-cell metrics, CFGen protocol, and the guidance check of diffusion sampling.

Distances compare two point clouds `x` [n, D] and `y` [m, D] (rows = cells, usually 30 PCs of
log1p-normalised HVGs); lower is better except where said. Estimators are the biased
(V-statistic) forms, so two identical sets score exactly 0.

A cell with a missing (NaN / empty) value in a condition column belongs to no condition group
(`UNLABELLED`): it counts in the "all" scope only, never in a per-condition score nor in the
"mean over conditions"; a cell without a label takes no part in `label_accuracy`.

The guidance check (`guidance_check`) asks whether classifier-free guidance matters: classifiers
fitted on real training cells label the generated cells, scored by `requested_label_accuracy`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from cellfoundry.evaluate.knn import knn_split_accuracy
from cellfoundry.utils import log1p_normalise, unlabelled
from cellfoundry.xpressor.decode import Decoder, predict_means

if TYPE_CHECKING:
    from cellfoundry.models.conditions import ConditionCodec, ConditionSpec

log = logging.getLogger(__name__)

#: The group of cells with a missing condition value (never scored as a condition).
UNLABELLED = "<unlabelled>"

GUIDANCE_CHECK_MAX_CELLS = 5_000  # real train / test cells the guidance check reads (each)
MMD_SIGMAS = (0.01, 0.1, 1.0, 10.0, 100.0)


def wasserstein(x: np.ndarray, y: np.ndarray, p: int = 2, num_itermax: int = 1_000_000) -> float:
    """Exact Wasserstein-p between the empirical measures of `x` [n, D] and `y` [m, D] with
    Euclidean ground cost (POT's network simplex, uniform weights)."""
    import ot

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cost = ot.dist(x, y, metric="euclidean") ** p
    a, b = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    value = float(ot.emd2(a, b, cost, numItermax=num_itermax))
    return max(value, 0.0) ** (1.0 / p)


def mmd_rbf(x: np.ndarray, y: np.ndarray, sigmas: Sequence[float] = MMD_SIGMAS) -> float:
    """Squared MMD with the kernel sum_sigma exp(-gamma ||a-b||^2), gamma = 1/(2 sigma^2)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dxx, dyy, dxy = cdist(x, x, "sqeuclidean"), cdist(y, y, "sqeuclidean"), cdist(x, y, "sqeuclidean")
    total = 0.0
    for sigma in sigmas:
        gamma = 1.0 / (2.0 * sigma**2)
        total += np.exp(-gamma * dxx).mean() + np.exp(-gamma * dyy).mean() - 2.0 * np.exp(-gamma * dxy).mean()
    return float(max(total, 0.0))


def mmd_linear(x: np.ndarray, y: np.ndarray) -> float:
    """Linear-kernel MMD: ||mean(x) - mean(y)||^2."""
    delta = np.asarray(x, dtype=np.float64).mean(0) - np.asarray(y, dtype=np.float64).mean(0)
    return float(delta @ delta)


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean, V-statistic)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    value = 2.0 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    return float(max(value, 0.0))


def moment_agreement(real: np.ndarray, generated: np.ndarray) -> dict[str, float]:
    """R^2 and Pearson r of per-gene means and variances; real/generated: [n, G] / [m, G] on the
    same genes (log1p-normalised). Higher is better (1 = identical moments)."""
    real = _dense(real)
    generated = _dense(generated)
    out = {}
    for name, f in (("mean", np.mean), ("var", np.var)):
        a, b = f(real, axis=0), f(generated, axis=0)
        out[f"r2_{name}"] = float(r2_score(a, b))
        out[f"pearson_{name}"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return out


def knn_real_vs_generated_auc(real: np.ndarray, generated: np.ndarray, k: int = 5, seed: int = 0) -> float:
    """ROC-AUC of a kNN classifier (k) telling generated from real cells, on held-out pairs.

    Both sets are subsampled to the same size n; cell i of each forms pair i; the pairs are
    split in half, a classifier is fit on one half and scored on the other, and the two halves
    swap (2-fold). 0.5 = indistinguishable, 1 = fully separable.
    """
    rng = np.random.default_rng(seed)
    n = min(len(real), len(generated))
    if n < 4:
        return float("nan")
    # Subsampling keeps row order, so that two identical sets stay paired twin-to-twin and a
    # held-out cell never finds its own copy among the fitted cells.
    real = np.asarray(real, dtype=np.float64)[_subsample(len(real), n, rng)]
    generated = np.asarray(generated, dtype=np.float64)[_subsample(len(generated), n, rng)]
    halves = np.array_split(rng.permutation(n), 2)
    y_true, y_score = [], []
    for fit_pairs, test_pairs in ((halves[0], halves[1]), (halves[1], halves[0])):
        X_fit = np.concatenate([real[fit_pairs], generated[fit_pairs]])
        y_fit = np.r_[np.zeros(len(fit_pairs)), np.ones(len(fit_pairs))]
        clf = KNeighborsClassifier(n_neighbors=min(k, len(X_fit))).fit(X_fit, y_fit)
        X_test = np.concatenate([real[test_pairs], generated[test_pairs]])
        y_true.append(np.r_[np.zeros(len(test_pairs)), np.ones(len(test_pairs))])
        y_score.append(clf.predict_proba(X_test)[:, 1])
    return float(roc_auc_score(np.concatenate(y_true), np.concatenate(y_score)))


def distribution_metrics(x: np.ndarray, y: np.ndarray, k: int = 5, seed: int = 0) -> dict[str, float]:
    """The point-cloud metrics of the protocol between generated/reference `x` and real `y`."""
    return {
        "w1": wasserstein(x, y, p=1),
        "w2": wasserstein(x, y, p=2),
        "mmd_rbf": mmd_rbf(x, y),
        "mmd_linear": mmd_linear(x, y),
        "energy": energy_distance(x, y),
        "knn_auc": knn_real_vs_generated_auc(y, x, k=k, seed=seed),
    }


def _dense(a) -> np.ndarray:
    return np.asarray(a.toarray() if sp.issparse(a) else a, dtype=np.float64)


@dataclass
class CFGenSpace:
    """The preprocessing of the protocol, fitted once and applied to any count matrix.

    genes: indices of the HVGs among the input genes; mean [n_pcs... ] centring and
    components [n_pcs, n_hvg] of the PCA fitted on the real test cells.
    """

    genes: np.ndarray
    center: np.ndarray
    components: np.ndarray
    target_sum: float = 1e4

    def lognorm(self, counts) -> np.ndarray:
        """Counts [n, G_all] -> log1p(normalise_total) over the HVGs [n, n_hvg] (dense float64).

        Library sizes are taken over all genes, as scanpy's normalize_total on the full matrix."""
        counts = counts.tocsr() if sp.issparse(counts) else np.asarray(counts)
        lib = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
        return log1p_normalise(_dense(counts[:, self.genes]), library=lib, target_sum=self.target_sum)

    def project(self, counts) -> np.ndarray:
        """Counts [n, G_all] -> PCA coordinates [n, n_pcs]."""
        return (self.lognorm(counts) - self.center) @ self.components.T


def fit_cfgen_space(train_counts, test_counts, n_hvg: int = 2000, n_pcs: int = 30, seed: int = 0) -> CFGenSpace:
    """HVGs by seurat_v3 on the real training cells' raw counts [n_train, G]; PCA (n_pcs) fitted
    on the real test cells [n_test, G] after normalise_total 1e4 + log1p."""
    import anndata as ad
    import scanpy as sc
    from sklearn.decomposition import PCA

    train = ad.AnnData(sp.csr_matrix(train_counts, dtype=np.float32))
    n_genes = train.n_vars
    if n_hvg >= n_genes:
        genes = np.arange(n_genes)
    else:
        sc.pp.highly_variable_genes(train, flavor="seurat_v3", n_top_genes=n_hvg)
        genes = np.flatnonzero(train.var["highly_variable"].to_numpy())
    space = CFGenSpace(genes=genes, center=np.zeros(len(genes)), components=np.eye(len(genes)))
    test = space.lognorm(test_counts)
    n_pcs = int(min(n_pcs, len(genes), len(test) - 1))
    pca = PCA(n_components=n_pcs, svd_solver="full", random_state=seed).fit(test)
    space.center, space.components = pca.mean_, pca.components_
    return space


def independent_genes_sample(
    train_counts, train_groups: Sequence, wanted_groups: Sequence, seed: int = 0, max_pool: int = 5000
) -> sp.csr_matrix:
    """The weak reference generator: for each wanted cell (its group in `wanted_groups` [m]),
    each gene's count is drawn independently from that gene's values in the real training
    cells of the same group (`train_counts` [n, G], `train_groups` [n]). Returns [m, G] float32
    CSR. Groups absent from the training cells, and `UNLABELLED` (sampled unconditionally), fall
    back to all training cells. A group's pool is a seeded subsample of at most `max_pool` cells,
    held dense while its cells are drawn (memory: max_pool x G, not n x G)."""
    rng = np.random.default_rng(seed)
    train_counts = train_counts.tocsr() if sp.issparse(train_counts) else np.asarray(train_counts)
    n_genes = train_counts.shape[1]
    train_groups = np.asarray([str(g) for g in train_groups])
    wanted = np.asarray([str(g) for g in wanted_groups])
    gene_index = np.arange(n_genes)
    blocks, order = [], []
    for group in np.unique(wanted):
        rows = np.flatnonzero(wanted == group)
        members = np.flatnonzero(train_groups == group) if group != UNLABELLED else np.arange(len(train_groups))
        if len(members) == 0:
            members = np.arange(len(train_groups))
        pool = _dense(train_counts[subsample(members, max_pool, rng)]).astype(np.float32)
        for chunk in np.array_split(rows, max(1, len(rows) // 512)):
            # An independent source cell per gene breaks every gene-gene dependency.
            pick = rng.integers(0, len(pool), size=(len(chunk), n_genes))
            blocks.append(sp.csr_matrix(pool[pick, gene_index]))
            order.append(chunk)
    return sp.vstack(blocks, format="csr")[np.argsort(np.concatenate(order))]


def label_accuracy(train_x: np.ndarray, train_labels: Sequence, x: np.ndarray, labels: Sequence, k: int = 15) -> float:
    """Accuracy on (`x` [m, D], `labels` [m]) of a kNN label classifier fit on real cells
    (`train_x`, `train_labels`); unlabelled cells are left out on both sides (NaN when none is left)."""
    both = np.concatenate([np.asarray(train_labels, dtype=object), np.asarray(labels, dtype=object)])
    missing = unlabelled(both)
    codes = np.full(len(both), -1)
    codes[~missing] = np.unique(both[~missing].astype(str), return_inverse=True)[1]
    n = len(train_x)
    return knn_split_accuracy(np.concatenate([train_x, x]), codes, np.arange(n), np.arange(n, len(both)), k)


def groups_of(obs, columns: Sequence[str]) -> np.ndarray:
    """One readable group label per row of a DataFrame: the values of `columns` joined by ' | ';
    `UNLABELLED` for a row with a missing value in any of them."""
    if not columns:
        return np.full(len(obs), "all", dtype=object)
    parts = [obs[c].astype(str).to_numpy() for c in columns]
    groups = np.asarray([" | ".join(v) for v in zip(*parts)], dtype=object)
    missing = np.any([unlabelled(obs[c].to_numpy(dtype=object)) for c in columns], axis=0)
    groups[missing] = UNLABELLED
    return groups


REFERENCE_REAL = "real_train (floor)"
REFERENCE_WEAK = "independent_genes (weak)"
#: The real test cells' own latents decoded exactly as samples are: what a perfect diffusion
#: model could reach through this autoencoder.
CEILING = "decoded_real (ceiling)"
MODEL = "diffusion"


def _subsample(n: int, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=max_cells, replace=False)) if n > max_cells else np.arange(n)


def compare_sets(
    real_train_counts,
    real_train_obs,
    real_test_counts,
    real_test_obs,
    generated_counts,
    generated_obs,
    group_columns: Sequence[str],
    label_column: str | None,
    n_hvg: int = 2000,
    n_pcs: int = 30,
    k_auc: int = 5,
    k_label: int = 15,
    min_cells_per_group: int = 10,
    max_cells: int = 2000,
    seed: int = 0,
    ceiling_counts=None,
):
    """Score the generated cells and the two reference generators against the real test cells,
    and with `ceiling_counts` [n_test, G] (the real test cells' latents decoded as samples are)
    the ceiling row `CEILING`.

    Counts are [n, G] on the same genes (raw or sampled counts); obs are DataFrames with the
    `group_columns` (condition source columns) and `label_column`. Returns (rows, embedding):
    rows = list of dicts (method, condition, metric, value, n_cells), condition = a group label,
    "all" (global) or "mean over conditions"; embedding = dict with the PCA coordinates of the
    real test and generated cells and their groups/labels, for the UMAP.
    """
    rng = np.random.default_rng(seed)
    space = fit_cfgen_space(real_train_counts, real_test_counts, n_hvg=n_hvg, n_pcs=n_pcs, seed=seed)
    log.info(
        "CFGen space: %d HVGs, %d PCs fitted on %d real test cells",
        len(space.genes),
        space.components.shape[0],
        real_test_counts.shape[0],
    )

    test_groups = groups_of(real_test_obs, group_columns)
    gen_groups = groups_of(generated_obs, group_columns)
    train_groups = groups_of(real_train_obs, group_columns)
    weak_counts = independent_genes_sample(real_train_counts, train_groups, gen_groups, seed=seed)

    methods = {
        MODEL: (generated_counts, generated_obs, gen_groups),
        REFERENCE_REAL: (real_train_counts, real_train_obs, train_groups),
        REFERENCE_WEAK: (weak_counts, generated_obs, gen_groups),
    }
    if ceiling_counts is not None:
        methods[CEILING] = (ceiling_counts, real_test_obs, test_groups)
    test_log = space.lognorm(real_test_counts)
    test_pc = (test_log - space.center) @ space.components.T
    train_pc = space.project(real_train_counts)
    train_labels = real_train_obs[label_column].to_numpy(dtype=object) if label_column else None

    rows = []
    coords = {"real_test": test_pc}
    for method, (counts, obs, groups) in methods.items():
        lognorm = space.lognorm(counts)
        pc = (lognorm - space.center) @ space.components.T
        if method == MODEL:
            coords["generated"] = pc
        labels = obs[label_column].to_numpy(dtype=object) if label_column and label_column in obs else None
        per_group: dict[str, dict[str, float]] = {}
        scopes = [("all", np.ones(len(pc), bool), np.ones(len(test_pc), bool))]
        scopes += [
            (g, groups == g, test_groups == g) for g in np.unique(test_groups) if len(group_columns) and g != UNLABELLED
        ]
        for scope, mask, test_mask in scopes:
            n_x, n_y = int(mask.sum()), int(test_mask.sum())
            if scope != "all" and (n_x < min_cells_per_group or n_y < min_cells_per_group):
                log.info(
                    "%s: condition %r skipped (%d generated, %d real test cells < %d)",
                    method,
                    scope,
                    n_x,
                    n_y,
                    min_cells_per_group,
                )
                continue
            ix = np.flatnonzero(mask)[_subsample(n_x, max_cells, rng)]
            iy = np.flatnonzero(test_mask)[_subsample(n_y, max_cells, rng)]
            values = distribution_metrics(pc[ix], test_pc[iy], k=k_auc, seed=seed)
            values.update(moment_agreement(test_log[test_mask], lognorm[mask]))
            if labels is not None:
                if method == REFERENCE_REAL:
                    # The floor for label accuracy: the real held-out cells themselves.
                    test_labels = real_test_obs[label_column].to_numpy(dtype=object)
                    values["label_accuracy"] = label_accuracy(
                        train_pc, train_labels, test_pc[test_mask], test_labels[test_mask], k=k_label
                    )
                else:
                    values["label_accuracy"] = label_accuracy(train_pc, train_labels, pc[mask], labels[mask], k=k_label)
            for metric, value in values.items():
                rows.append(dict(method=method, condition=scope, metric=metric, value=value, n_cells=n_x))
            if scope != "all":
                per_group[scope] = values
        if per_group:
            for metric in next(iter(per_group.values())):
                vals = [v[metric] for v in per_group.values()]
                rows.append(
                    dict(
                        method=method,
                        condition="mean over conditions",
                        metric=metric,
                        value=float(np.nanmean(vals)),
                        n_cells=len(per_group),
                    )
                )
        log.info("%s scored (%d conditions)", method, len(per_group))
    embedding = dict(
        coords=np.concatenate([coords["real_test"], coords["generated"]]),
        source=np.r_[np.full(len(test_pc), "real (test)"), np.full(len(coords["generated"]), "generated")],
        group=np.r_[test_groups, gen_groups],
    )
    return rows, embedding


# -- guidance check of diffusion sampling (cellfoundry.diffusion.stage writes it to summary.json)


def fit_label_classifier(real_counts, labels: np.ndarray, seed: int, n_pcs: int = 50):
    """Logistic regression on PCA of log1p(CP10k) of real cells; returns predict(counts) -> labels.
    Counts are float32 (CSR or dense; a dense input is taken as float32)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(counts):
        return log1p_normalise(counts if sp.issparse(counts) else np.asarray(counts, dtype=np.float32))

    x = features(real_counts)
    n_pcs = int(min(n_pcs, x.shape[0] - 1, x.shape[1]))
    clf = make_pipeline(StandardScaler(), PCA(n_pcs, random_state=seed), LogisticRegression(max_iter=2000))
    clf.fit(x, labels)
    return lambda counts: clf.predict(features(counts))


def subsample(rows: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """`rows`, or a seeded sorted subset of `max_cells` of them."""
    return rows if len(rows) <= max_cells else np.sort(rng.choice(rows, max_cells, replace=False))


def guidance_check_condition(codec: ConditionCodec) -> ConditionSpec | None:
    """The first categorical condition (the label the guidance check classifies)."""
    return next((s for s in codec.specs if s.kind == "categorical"), None)


def requested_label_accuracy(predicted: np.ndarray, requested: pd.Series) -> float | None:
    """Fraction of generated cells whose predicted label equals the label they were generated
    for (rows with a requested label; None when none has one). Not `label_accuracy`, the kNN
    score of real-cell labels above."""
    mask = ~unlabelled(requested.to_numpy(dtype=object))
    if not mask.any():
        return None
    return float(np.mean(predicted[mask] == requested.astype(str).to_numpy()[mask]))


@dataclass
class GuidanceClassifier:
    """The guidance check's expression classifier: logistic regression on PCA of log1p(CP10k),
    fitted on real train cells; with the real test cells it is scored on. Both are seeded
    subsamples of at most GUIDANCE_CHECK_MAX_CELLS labelled cells."""

    condition: str  # the condition's name
    column: str  # its obs column
    labels: np.ndarray  # [N] str, every QC'd cell
    train: np.ndarray  # rows
    test: np.ndarray
    test_counts: sp.csr_matrix
    predict: Callable[[Any], np.ndarray]  # counts [n, G] -> labels [n]

    @classmethod
    def fit(cls, cells, spec: ConditionSpec, seed: int) -> GuidanceClassifier:
        """Fit on `cells` (the QC'd AnnData with obs["split"] and raw counts in X; may be backed:
        only the rows used are read), labelled by the first column of `spec`."""
        column = spec.columns[0]
        obs = cells.obs
        split = obs["split"].astype(str).to_numpy()
        known = ~unlabelled(obs[column].to_numpy(dtype=object))  # the codec's "missing" (NaN, empty)
        rng = np.random.default_rng(seed)
        train, test = (
            subsample(np.flatnonzero((split == part) & known), GUIDANCE_CHECK_MAX_CELLS, rng)
            for part in ("train", "test")
        )
        labels = obs[column].astype(str).to_numpy()
        predict = fit_label_classifier(sp.csr_matrix(cells.X[train], dtype=np.float32), labels[train], seed)
        test_counts = sp.csr_matrix(cells.X[test] if len(test) else (0, cells.n_vars), dtype=np.float32)
        return cls(spec.name, column, labels, train, test, test_counts, predict)


def guidance_check(
    classifier: GuidanceClassifier,
    request_obs: pd.DataFrame,
    runs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    seed: int,
    real_latents: np.ndarray | None = None,
    decoder: Decoder | None = None,
) -> dict:
    """Does guidance matter? The real-cell classifiers label the generated cells; reported is
    the fraction assigned the label they were generated for, per run (name -> (expression
    classifier's labels of the decoded mean counts, tokens) of the cells `request_obs`: guided
    scale, scale 1 = plain conditional, scale 0 = unconditional with the same requested labels).

    expression: `classifier`; with `decoded_real_test_accuracy` (real test cells' latents
    through the same `decoder`) as the ceiling the decoder allows. latent (latent space only):
    logistic regression on the flattened latent tokens, which measures the diffusion model
    without the decoder in between.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    column, labels, train, test = classifier.column, classifier.labels, classifier.train, classifier.test
    requested = request_obs[column]
    expression = {
        "classifier": (
            "logistic regression on 50 PCs of standardised log1p(CP10k) of real train cells; "
            "samples: decoded mean counts"
        ),
        "real_test_accuracy": (
            float(np.mean(classifier.predict(classifier.test_counts) == labels[test])) if len(test) else None
        ),
        "accuracy": {name: requested_label_accuracy(predicted, requested) for name, (predicted, _) in runs.items()},
    }
    result: dict[str, Any] = {
        "condition": classifier.condition,
        "column": column,
        "n_cells": {"generated": len(request_obs), "real_train": len(train), "real_test": len(test)},
        "expression": expression,
    }
    if real_latents is not None and len(test):
        lib = np.asarray(classifier.test_counts.sum(1)).ravel().astype(np.float32)
        decoded_real = decoder(np.asarray(real_latents[test], dtype=np.float32), lib, seed, with_counts=False)
        predicted = predict_means(decoded_real, classifier.predict)
        expression["decoded_real_test_accuracy"] = float(np.mean(predicted == labels[test]))

        def flat(rows: np.ndarray) -> np.ndarray:
            return np.asarray(real_latents[rows], dtype=np.float32).reshape(len(rows), -1)

        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(flat(train), labels[train])
        result["latent"] = {
            "classifier": "logistic regression on the standardised, flattened latent tokens of real train cells",
            "real_test_accuracy": float(np.mean(clf.predict(flat(test)) == labels[test])),
            "accuracy": {
                name: requested_label_accuracy(clf.predict(t.reshape(len(t), -1)), requested)
                for name, (_, t) in runs.items()
            },
        }
    for space in ("expression", "latent"):
        for name, acc in result.get(space, {}).get("accuracy", {}).items():
            log.info(
                "guidance check (%s classifier): %s -> %.3f of samples classified as their requested %s",
                space,
                name,
                acc if acc is not None else float("nan"),
                column,
            )
    return result
