"""Rule evaluate_embeddings: SE and Xpressor embeddings beside the PCA and random-SE baselines
(kNN label transfer, and the scIB metrics through scib-metrics with the PCA baseline as the
pre-integration embedding of its PCR comparison)."""

import logging

import numpy as np

from cellfoundry.evaluate.baselines import pca_baseline
from cellfoundry.evaluate.embedding import AGGREGATES, BATCH_METRICS, BIO_METRICS, compare_embeddings, unlabelled
from cellfoundry.evaluate.inputs import read_embedding, read_h5ad, write_json, write_table
from cellfoundry.plots import metric_bars, umap_coordinates, umap_grid
from cellfoundry.utils import UserError, seed_everything, setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("cellfoundry")
inp, out, params = snakemake.input, snakemake.output, snakemake.params
cfg, seed = params.evaluate, params.seed
seed_everything(seed)

adata = read_h5ad(inp.qc, "qc")
label_col, batch_col = params.cell_type, params.batch
for role, col in (("cell_type", label_col), ("batch", batch_col)):
    if col is not None and col not in adata.obs:
        raise UserError(f"datasets.{snakemake.wildcards.dataset}.{role} is {col!r}, not an obs column of {inp.qc}; fix the config.")
# Without cell_type (or with NaN labels) the label metrics are skipped, with the reason, in the outputs.
labels = adata.obs[label_col].to_numpy(dtype=object) if label_col else None
batches = adata.obs[batch_col].astype(str).to_numpy() if batch_col else None

embeddings = {
    "se": read_embedding(inp.se, "X_state", adata.obs_names, "embed"),
    "xpressor": read_embedding(inp.xpressor, "X_xpressor", adata.obs_names, "xpressor_train"),
    "pca_hvg": pca_baseline(adata, n_hvg=cfg["pca"]["n_hvg"], n_pcs=cfg["pca"]["n_pcs"], seed=seed),
    "random_se": read_embedding(inp.random, "X_state", adata.obs_names, "embed"),
}
rows, summary = compare_embeddings(
    embeddings,
    labels,
    batches,
    model_methods=("se", "xpressor"),
    pre_integration="pca_hvg",
    k=cfg["knn_k"],
    n_folds=cfg["n_folds"],
    resolutions=cfg["leiden_resolutions"],
    silhouette_max_cells=cfg["silhouette_max_cells"],
    seed=seed,
)
summary.update(dataset=snakemake.wildcards.dataset, label=label_col, batch=batch_col, dims={k: int(v.shape[1]) for k, v in embeddings.items()})
table = write_table(rows, out.table)
write_json(summary, out.json)

metric_bars(
    out.bars,
    table[table["skipped"] == ""],  # a skipped metric gets no (empty) panel
    ["knn_accuracy", "knn_macro_f1", *BIO_METRICS, *BATCH_METRICS, *AGGREGATES],
    title=f"{snakemake.wildcards.dataset}: embedding metrics (higher is better)",
)
colors = {label_col: np.where(unlabelled(labels), "unlabelled", labels.astype(str))} if label_col else {}
if batches is not None:
    colors[batch_col] = batches
if not colors:
    colors["no labels"] = np.full(adata.n_obs, "cell")
for metric, reason in summary["skipped"].items():
    log.warning("%s skipped: %s", metric, reason)
coords = {}
for name, X in embeddings.items():
    coords[name] = umap_coordinates(X, seed=seed, n_neighbors=cfg["knn_k"])
    log.info("UMAP of %s done", name)
umap_grid(out.umap, coords, colors, title=f"{snakemake.wildcards.dataset}: UMAP of each embedding")
log.info("wrote %s", out.table)
