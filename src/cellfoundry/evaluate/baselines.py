"""Baseline embedding computed in the evaluation stage: PCA of log1p-normalised HVGs."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def pca_baseline(adata, n_hvg: int = 2000, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """PCA-`n_pcs` of log1p(normalise_total 1e4) over the `n_hvg` most variable genes.

    adata: AnnData with raw counts in X [N, G] (not modified). HVGs by scanpy's "seurat"
    flavour on the log-normalised values (the standard scanpy recipe); genes are centred, not
    scaled. Returns float32 [N, min(n_pcs, N - 1, n_hvg - 1)].
    """
    import scanpy as sc

    work = adata.copy()
    work.X = work.X.astype(np.float32)
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    if n_hvg < work.n_vars:
        sc.pp.highly_variable_genes(work, flavor="seurat", n_top_genes=n_hvg)
        work = work[:, work.var["highly_variable"].to_numpy()].copy()
    n_comps = int(min(n_pcs, work.n_obs - 1, work.n_vars - 1))
    # covariance_eigh: exact, deterministic, and works on sparse X without densifying it.
    sc.pp.pca(work, n_comps=n_comps, svd_solver="covariance_eigh", random_state=seed)
    log.info("PCA baseline: %d components of %d HVGs over %d cells", n_comps, work.n_vars, work.n_obs)
    return np.asarray(work.obsm["X_pca"], dtype=np.float32)
