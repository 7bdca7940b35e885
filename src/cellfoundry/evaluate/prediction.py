"""Prediction of held-out condition combinations (scGen / CPA protocol).

A held-out combination (QC's `split.holdout`, e.g. cell_type=CD4T + condition=stimulated) is
never trained on; the diffusion model composes it from its parts. Its prediction is scored on
the real held-out cells, beside three baselines on the same cells:

- no change: the combination's control cells (same labels, stimulus columns at their condition's
  none_value, e.g. CD4T + control) stand in for the stimulated cells;
- linear shift: those control cells plus the mean (stimulated - control) shift of the other
  groups (e.g. cell types) in log1p(CP10k) space, clipped at 0;
- split-half ceiling: half of the real held-out cells predicting the other half.

All expression is log1p(CP10k) over all genes of qc/filtered.h5ad. Metrics (higher is better
unless said): `r2_*` = coefficient of determination of the real per-gene means by the predicted
ones (sklearn r2_score, the identity line, as CPA) and `pearson_*` their Pearson r, over all genes
(`_all`) and over the top DE genes (`_de`: scanpy Wilcoxon of held-out vs control cells, the first
n by score, as scGen); `delta_pearson_*` = Pearson r of the predicted change (predicted - control
mean) with the real change (NaN for no change, which predicts none); energy, mmd_rbf (lower
better) and knn_auc (0.5 best) on PCs of the real held-out cells' HVGs, as evaluate_generation.
Cells used by the control and the shift: every non-held-out cell (train and test split).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import r2_score

from cellfoundry.evaluate import generation as gen
from cellfoundry.split import combination_label, combination_mask, control_labels
from cellfoundry.utils import UserError, log1p_normalise

log = logging.getLogger(__name__)

MODEL = "diffusion"
NO_CHANGE = "no change (control cells)"
LINEAR = "linear shift"
CEILING = "split-half (ceiling)"
METHODS = (MODEL, NO_CHANGE, LINEAR, CEILING)


def de_genes(heldout: np.ndarray, control: np.ndarray, n: int) -> np.ndarray:
    """Indices of the top `n` genes of held-out vs control cells (log1p [*, G]): scanpy's Wilcoxon
    rank_genes_groups for the held-out group, in its score order (scGen's choice)."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.vstack([heldout, control]).astype(np.float32))
    adata.var_names = [str(i) for i in range(adata.n_vars)]
    adata.obs["group"] = pd.Categorical(["heldout"] * len(heldout) + ["control"] * len(control))
    sc.tl.rank_genes_groups(adata, "group", groups=["heldout"], reference="control", method="wilcoxon", n_genes=n)
    return np.array([int(g) for g in adata.uns["rank_genes_groups"]["names"]["heldout"][:n]])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def mean_metrics(predicted: np.ndarray, real: np.ndarray, control_mean: np.ndarray, de: np.ndarray) -> dict[str, float]:
    """R2 / Pearson of per-gene means and Pearson of the change vs control (see module doc)."""
    p, r = predicted.mean(0), real.mean(0)
    out = {}
    for scope, genes in (("all", slice(None)), ("de", de)):
        out[f"r2_{scope}"] = float(r2_score(r[genes], p[genes]))
        out[f"pearson_{scope}"] = _pearson(r[genes], p[genes])
        out[f"delta_pearson_{scope}"] = _pearson(r[genes] - control_mean[genes], p[genes] - control_mean[genes])
    return out


def stimulus_shift(
    values: np.ndarray, obs: pd.DataFrame, combo: Mapping, control: Mapping, usable: np.ndarray
) -> np.ndarray | None:
    """The combination's stimulus as seen elsewhere: the mean over the other groups (the values of
    the non-stimulus columns), each with both kinds of `usable` cells, of mean(values | stimulated)
    - mean(values | control); None when no other group has both."""
    stimulus = [c for c in combo if str(control[c]) != str(combo[c])]
    group_cols = [c for c in combo if c not in stimulus]
    if group_cols:
        groups = obs[group_cols].astype(str).agg("|".join, axis=1).to_numpy()
        own = "|".join(str(combo[c]) for c in group_cols)
    else:
        groups, own = np.full(len(obs), ""), None
    stim = combination_mask(obs, {c: combo[c] for c in stimulus}) & usable
    ctrl = combination_mask(obs, {c: control[c] for c in stimulus}) & usable
    shifts = [
        values[stim & (groups == g)].mean(0) - values[ctrl & (groups == g)].mean(0)
        for g in np.unique(groups)
        if g != own and (stim & (groups == g)).any() and (ctrl & (groups == g)).any()
    ]
    return np.mean(shifts, axis=0) if shifts else None


def linear_shift(
    logx: np.ndarray, obs: pd.DataFrame, combo: Mapping, control: Mapping, usable: np.ndarray
) -> np.ndarray:
    """Control cells of the combination plus the stimulus's mean shift in the other groups."""
    shift = stimulus_shift(logx, obs, combo, control, usable)
    if shift is None:
        raise UserError(
            f"held-out combination {{{combination_label(combo)}}}: no other group has both stimulated and control "
            "cells, so the linear-shift baseline cannot be formed; the stimulus must be seen in another group."
        )
    return np.clip(logx[combination_mask(obs, control) & usable] + shift, 0.0, None)


def evaluate_combination(
    real_counts,
    real_obs: pd.DataFrame,
    heldout: np.ndarray,
    generated_counts,
    generated_obs: pd.DataFrame,
    combo: Mapping,
    none_values: Mapping[str, str],
    *,
    n_de_genes: int = 100,
    n_hvg: int = 2000,
    n_pcs: int = 30,
    k_auc: int = 5,
    max_cells: int = 2000,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """Rows (combination, method, metric, value, n_cells) for the model and the three baselines,
    and the per-gene means for the plot (real, control and each method's prediction, DE genes)."""
    label = combination_label(combo)
    real_cells = heldout & combination_mask(real_obs, combo)
    generated = combination_mask(generated_obs, combo)
    if real_cells.sum() < 4 or generated.sum() < 4:
        raise UserError(
            f"held-out combination {{{label}}}: "
            f"{int(real_cells.sum())} real and {int(generated.sum())} generated cells; "
            "4 of each are needed. Re-run diffusion_sample with default requests (held-out cell counts)."
        )
    control = control_labels(real_obs, combo, none_values)
    usable = ~heldout
    control_cells = combination_mask(real_obs, control) & usable
    if control_cells.sum() < 2:
        raise UserError(f"held-out combination {{{label}}}: fewer than 2 control cells ({combination_label(control)}).")
    logx = log1p_normalise(gen._dense(real_counts))  # float64, as the module doc says
    real = logx[real_cells]
    ctrl = logx[control_cells]
    de = de_genes(real, ctrl, n_de_genes)
    rng = np.random.default_rng(seed)
    half_a, half_b = np.array_split(rng.permutation(len(real)), 2)
    predictions = {
        MODEL: (log1p_normalise(gen._dense(generated_counts[np.flatnonzero(generated)])), real),
        NO_CHANGE: (ctrl, real),
        LINEAR: (linear_shift(logx, real_obs, combo, control, usable), real),
        CEILING: (real[half_a], real[half_b]),
    }
    space = gen.fit_cfgen_space(
        real_counts[np.flatnonzero(usable)], real_counts[np.flatnonzero(real_cells)], n_hvg, n_pcs, seed
    )

    def project(x):
        x = x[gen._subsample(len(x), max_cells, np.random.default_rng(seed))]
        return (x[:, space.genes] - space.center) @ space.components.T

    rows, means = [], {"real": real.mean(0), "control": ctrl.mean(0), "de": de}
    control_mean = ctrl.mean(0)
    for method, (pred, target) in predictions.items():
        values = mean_metrics(pred, target, control_mean, de)
        px, tx = project(pred), project(target)
        values.update(
            energy=gen.energy_distance(px, tx),
            mmd_rbf=gen.mmd_rbf(px, tx),
            knn_auc=gen.knn_real_vs_generated_auc(tx, px, k=k_auc, seed=seed),
        )
        rows += [
            {"combination": label, "method": method, "metric": m, "value": v, "n_cells": len(pred)}
            for m, v in values.items()
        ]
        means[method] = pred.mean(0)
        means[f"{method} r2"] = (values["r2_all"], values["r2_de"])  # the plot's titles: the table's figures
        log.info(
            "%s / %s: r2_de %.3f, r2_all %.3f, delta_pearson_de %.3f",
            label,
            method,
            values["r2_de"],
            values["r2_all"],
            values["delta_pearson_de"],
        )
    return rows, means
