"""Rule evaluate_xpressor: held-out reconstruction table of the Xpressor stage, per-gene
agreement and a decoded-vs-observed scatter computed from the saved latents."""

import logging

import numpy as np

from cellfoundry.evaluate import reconstruction as rec
from cellfoundry.evaluate.inputs import read_h5ad, read_json, read_table, require, write_json, write_table
from cellfoundry.models.xpressor import load_xpressor
from cellfoundry.plots import decoded_vs_observed, metric_bars
from cellfoundry.utils import UserError, resolve_device, seed_everything, setup_logging
from cellfoundry.vocab import GeneVocab

setup_logging(snakemake.log[0])
log = logging.getLogger("cellfoundry")
inp, out, params = snakemake.input, snakemake.output, snakemake.params
cfg, seed = params.evaluate["reconstruction"], params.seed
seed_everything(seed)
device = resolve_device(params.device)

adata = read_h5ad(inp.qc, "qc")
summary = read_json(inp.summary, "xpressor_train")
stage_table = read_table(inp.table, ["method", "metric", "value"], "xpressor_train")

ckpt = load_xpressor(require(inp.model, "xpressor_train"))
genes = list(ckpt.meta.get("genes", []))
if not genes:
    raise UserError(f"{inp.model} does not list its decoded genes (meta['genes']); re-run rule xpressor_train.")
absent = [g for g in genes if g not in set(adata.var_names)]
if absent:
    raise UserError(f"{inp.model} decodes {len(absent)} gene(s) absent from {inp.qc} (e.g. {absent[:3]}); it is stale: re-run rule xpressor_train.")
vocab = GeneVocab.load(inp.vocab)
ids = vocab.lookup(genes)
if (ids < 0).any():
    raise UserError(f"{inp.vocab} lacks {int((ids < 0).sum())} gene(s) the Xpressor model decodes; the vocabulary changed: re-run rule xpressor_train.")

latents = np.load(require(inp.latents, "xpressor_train"), mmap_mode="r")
rec.check_latents(latents, adata.n_obs, inp.latents)
test = np.flatnonzero(adata.obs["split"].astype(str).to_numpy() == "test")
if len(test) > cfg["max_cells"]:
    test = np.sort(np.random.default_rng(seed).choice(test, cfg["max_cells"], replace=False))
log.info("decoding %d held-out cells over %d genes on %s", len(test), len(genes), device)
predicted = rec.decode_log1p(ckpt.model, latents[test], vocab.table[ids], device=device)
observed = rec.observed_log1p(adata[test, genes].X, target_sum=ckpt.config.target_sum)
gene_r = rec.per_gene_pearson(predicted, observed)

table = write_table(rec.reconstruction_rows(stage_table, summary, gene_r), out.table)
write_json(
    {
        "dataset": snakemake.wildcards.dataset,
        "n_test_cells_decoded": int(len(test)),
        "n_genes": len(genes),
        "trainable_fraction": summary.get("trainable_fraction"),
        "xpressor_beats_baselines": summary.get("xpressor_beats_baselines"),
        "metrics": {m: dict(zip(sub["metric"], sub["value"])) for m, sub in table.groupby("method", sort=False)},
        "gene_pearson": dict(zip(genes, np.round(gene_r, 4).tolist())),
    },
    out.json,
)
metric_bars(
    out.bars,
    table,
    ["pearson_mean", "spearman_mean", "mse", "gene_pearson_mean"],
    title=f"{snakemake.wildcards.dataset}: held-out reconstruction",
    lower_is_better=("mse",),
)
show = rec.genes_to_show(observed, gene_r, cfg["scatter_genes"])
decoded_vs_observed(out.scatter, predicted, observed, genes, show, gene_r,
                    title=f"{snakemake.wildcards.dataset}: Xpressor decoded vs observed ({len(test)} held-out cells)")  # fmt: skip
log.info("wrote %s", out.table)
