"""The bundled demo: scanpy's pbmc68k_reduced turned back into raw integer counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

DEMO_OBS = ["bulk_labels", "phase", "louvain"]


def pbmc68k_counts() -> ad.AnnData:
    """700 PBMCs x 765 genes of raw counts with their 10 `bulk_labels` cell types.

    scanpy ships `raw.X` as log1p of counts normalised to 1e4 per cell, and `obs.n_counts` as each
    cell's original total, so round(expm1(raw.X) * n_counts / 1e4) gives the integer counts back
    (the rounding error is below 0.1).
    """
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    logged = source.raw.X
    logged = logged.toarray() if sp.issparse(logged) else np.asarray(logged)
    totals = source.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    counts = np.rint(np.expm1(logged.astype(np.float64)) * totals / 1e4).astype(np.float32)
    out = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=source.obs[DEMO_OBS].copy(),
        var={"gene_symbol": source.raw.var_names.to_numpy()},
    )
    out.obs_names = source.obs_names
    out.var_names = source.raw.var_names
    return out
