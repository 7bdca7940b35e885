"""Rule evaluate_prediction: each held-out combination's generated cells vs its real held-out
cells, beside the no-change, linear-shift and split-half references."""

import logging

import numpy as np

from cellfoundry.evaluate import prediction as pred
from cellfoundry.evaluate.inputs import read_h5ad, write_json, write_table
from cellfoundry.plots import plot_prediction
from cellfoundry.utils import UserError, seed_everything, setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("cellfoundry")
inp, out, params = snakemake.input, snakemake.output, snakemake.params
cfg, seed = params.evaluate, params.seed
seed_everything(seed)

real = read_h5ad(inp.qc, "qc")
samples = read_h5ad(inp.samples, "diffusion_sample")
if "holdout" not in real.obs:
    raise UserError(f"{inp.qc} marks no held-out cells (obs['holdout']); re-run qc (snakemake --forcerun qc).")
if list(samples.var_names) != list(real.var_names):
    raise UserError(f"{inp.samples} holds other genes than {inp.qc}; re-run diffusion_sample (snakemake --forcerun diffusion_sample).")
# the none_value of a multi_component condition marks its columns' control (absent stimulus) label
none_values = {col: c["none_value"] for c in params.conditions if c.get("none_value") for col in c["columns"]}
heldout = real.obs["holdout"].astype(bool).to_numpy()
rows, means = [], {}
for combo in params.holdout:
    r, m = pred.evaluate_combination(
        real.X, real.obs, heldout, samples.X, samples.obs, combo, none_values,
        n_de_genes=cfg["prediction"]["n_de_genes"], n_hvg=cfg["generation"]["n_hvg"], n_pcs=cfg["generation"]["n_pcs"],
        k_auc=cfg["generation"]["knn_auc_k"], max_cells=cfg["generation"]["max_cells"], seed=seed,
    )  # fmt: skip
    rows += r
    means[pred.combination_label(combo)] = m
table = write_table(rows, out.table)
summary = {
    "dataset": snakemake.wildcards.dataset,
    "holdout": params.holdout,
    "n_de_genes": cfg["prediction"]["n_de_genes"],
    "metrics": {
        label: {method: dict(zip(sub["metric"], sub["value"])) for method, sub in part.groupby("method", sort=False)}
        for label, part in table.groupby("combination", sort=False)
    },
}
write_json(summary, out.json)
plot_prediction(out.scatter, means, list(real.var_names), pred.METHODS, title=f"{snakemake.wildcards.dataset}: predicted vs real mean expression of held-out cells")
log.info("wrote %s", out.table)
