"""Rule evaluate_generation: generated cells vs real test cells, beside the two references."""

import logging

import numpy as np
import pandas as pd

from cellfoundry.evaluate import generation as gen
from cellfoundry.evaluate.inputs import read_h5ad, write_json, write_table
from cellfoundry.plots import metric_bars, umap_coordinates, umap_grid
from cellfoundry.utils import UserError, seed_everything, setup_logging

setup_logging(snakemake.log[0])
log = logging.getLogger("cellfoundry")
inp, out, params = snakemake.input, snakemake.output, snakemake.params
cfg, seed = params.evaluate, params.seed
seed_everything(seed)

real = read_h5ad(inp.qc, "qc")
# Library sizes over all QC'd genes, as the diffusion stage draws them for its samples.
library = np.asarray(real.X.sum(axis=1)).ravel().astype(np.float32)
samples = read_h5ad(inp.samples, "diffusion_sample")
generated_genes = set(samples.var_names)
shared = [g for g in real.var_names if g in generated_genes]
if len(shared) < 0.5 * real.n_vars:
    raise UserError(
        f"{inp.samples} covers only {len(shared)} of the {real.n_vars} genes of qc/filtered.h5ad; generated cells must be "
        "decoded over the QC'd genes: re-run the diffusion sampling (snakemake --forcerun diffusion_sample)."
    )
if len(shared) < real.n_vars:
    # E.g. genes absent from the model's gene vocabulary cannot be decoded: compare on the rest.
    log.warning("comparing on the %d of %d genes present in %s", len(shared), real.n_vars, inp.samples)
    real = real[:, shared].copy()
samples = samples[:, shared]
group_columns = [c for c in params.condition_columns if c in samples.obs and c in real.obs]
absent = [c for c in params.condition_columns if c not in samples.obs]
if absent:
    raise UserError(f"{inp.samples} obs lacks condition column(s) {absent}; re-run diffusion sampling (snakemake --forcerun diffusion_sample).")
if samples.n_obs == 0 or not np.isfinite(samples.X.toarray() if hasattr(samples.X, "toarray") else samples.X).all():
    raise UserError(f"{inp.samples} holds no cells or non-finite values; re-run diffusion sampling.")
label_col = params.cell_type if params.cell_type in samples.obs else None
# Label-based scores that cannot be computed are listed with the reason (json "skipped", tsv rows).
skipped = {}
if label_col is None:
    skipped["label_accuracy"] = (
        "no cell-type labels: datasets.<name>.cell_type is null" if params.cell_type is None
        else f"the generated cells carry no {params.cell_type!r} labels (it is no diffusion condition column)"
    )
if not group_columns:
    skipped["per-condition scores"] = "no diffusion conditions: the model is unconditional"

split = real.obs["split"].astype(str).to_numpy()
train, test = real[split == "train"], real[split == "test"]
ceiling = None
if "latents" in inp.keys():
    from cellfoundry.diffusion_stage import xpressor_decoder

    # The ceiling: the real test cells' own Xpressor latents, decoded to sampled counts with
    # each cell's library size, exactly as the diffusion samples are decoded.
    latents = np.load(inp.latents, mmap_mode="r")
    if latents.shape[0] != real.n_obs:
        raise UserError(f"{inp.latents} holds {latents.shape[0]} cells but {inp.qc} has {real.n_obs}; re-run xpressor_encode.")
    decode = xpressor_decoder(inp.xpressor, inp.vocab, list(real.var_names))
    ceiling = decode(np.asarray(latents[split == "test"]), library[split == "test"], seed).counts
else:
    skipped[gen.CEILING] = "gene token space: no Xpressor latents to decode (diffusion.token_space: gene)"
log.info("real train %d, real test %d, generated %d cells; conditions by %s", train.n_obs, test.n_obs, samples.n_obs, group_columns or "none")
g = cfg["generation"]
rows, embedding = gen.compare_sets(
    train.X, train.obs, test.X, test.obs, samples.X, samples.obs,
    group_columns=group_columns,
    label_column=label_col,
    n_hvg=g["n_hvg"], n_pcs=g["n_pcs"], k_auc=g["knn_auc_k"], k_label=cfg["knn_k"],
    min_cells_per_group=g["min_cells_per_group"], max_cells=g["max_cells"], seed=seed, ceiling_counts=ceiling,
)  # fmt: skip
scored = (gen.MODEL, gen.REFERENCE_REAL, gen.REFERENCE_WEAK) + ((gen.CEILING,) if ceiling is not None else ())
skipped_rows = [dict(method=gen.CEILING if metric == gen.CEILING else m, condition="all", metric=metric, value=np.nan, n_cells=0, skipped=reason)
                for metric, reason in skipped.items() for m in ((gen.CEILING,) if metric == gen.CEILING else scored)]
write_table(rows + skipped_rows, out.table)
table = pd.DataFrame(rows)

overall = table[table["condition"].isin(["all", "mean over conditions"])]
summary = {
    "dataset": snakemake.wildcards.dataset,
    "n_generated": int(samples.n_obs),
    "n_real_test": int(test.n_obs),
    "n_real_train": int(train.n_obs),
    "condition_columns": group_columns,
    # cells with a missing condition value / label: in "all" only, never in a condition's score
    "n_unlabelled": {
        "real_test_conditions": int((gen.groups_of(test.obs, group_columns) == gen.UNLABELLED).sum()),
        "generated_conditions": int((gen.groups_of(samples.obs, group_columns) == gen.UNLABELLED).sum()),
        "real_test_labels": int(gen.unlabelled(test.obs[label_col].to_numpy(dtype=object)).sum()) if label_col else int(test.n_obs),
    },
    "skipped": skipped,
    "metrics": {
        scope: {m: dict(zip(sub["metric"], sub["value"])) for m, sub in overall[overall["condition"] == scope].groupby("method")}
        for scope in ("all", "mean over conditions")
    },
}
write_json(summary, out.json)
metric_bars(
    out.bars,
    overall[overall["condition"] == "all"],
    ["w1", "w2", "mmd_rbf", "mmd_linear", "energy", "knn_auc", "r2_mean", "r2_var", "label_accuracy"],
    title=f"{snakemake.wildcards.dataset}: generated vs real test cells (all cells)",
    lower_is_better=("w1", "w2", "mmd_rbf", "mmd_linear", "energy", "knn_auc"),
)
xy = umap_coordinates(embedding["coords"], seed=seed)
umap_grid(out.umap, {"real test + generated": xy}, {"source": embedding["source"], "condition": embedding["group"]},
          title=f"{snakemake.wildcards.dataset}: real and generated cells (UMAP of the 30 PCs)")  # fmt: skip
log.info("wrote %s", out.table)
