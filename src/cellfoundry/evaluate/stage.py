"""The evaluate stage's rule entry points: read the upstream outputs, score them with the metrics
of this package beside their baselines, and write each rule's table, JSON summary and figures.

`run_<rule>` for the rules evaluate_embeddings, evaluate_xpressor, evaluate_generation,
evaluate_prediction and stage_costs; the rule scripts call them with the rule's inputs,
outputs and params."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfoundry.evaluate import generation as gen
from cellfoundry.evaluate import prediction as pred
from cellfoundry.evaluate import reconstruction as rec
from cellfoundry.evaluate.baselines import pca_baseline
from cellfoundry.evaluate.embedding import AGGREGATES, BATCH_METRICS, BIO_METRICS, compare_embeddings
from cellfoundry.evaluate.inputs import (
    read_embedding,
    read_h5ad,
    read_json,
    read_table,
    require,
    write_json,
    write_table,
)
from cellfoundry.plots import decoded_vs_observed, metric_bars, plot_prediction, umap_coordinates, umap_grid
from cellfoundry.utils import (
    UserError,
    atomic_output,
    log1p_normalise,
    start_stage,
    unlabelled,
)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def run_evaluate_embeddings(
    *,
    h5ad: PathLike,
    se: PathLike,
    random: PathLike,
    xpressor: PathLike,
    table: PathLike,
    summary: PathLike,
    bars: PathLike,
    umap: PathLike,
    settings: dict,
    cell_type: str | None,
    batch: str | None,
    dataset: str,
    seed: int,
) -> None:
    """SE and Xpressor embeddings beside the PCA and random-SE baselines: kNN label transfer, and
    the scIB metrics through scib-metrics with the PCA baseline as the pre-integration embedding
    of its PCR comparison. Without cell_type (or with NaN labels) the label metrics are skipped,
    with the reason, in the outputs."""
    start_stage(seed)
    adata = read_h5ad(h5ad, "qc")
    for role, col in (("cell_type", cell_type), ("batch", batch)):
        if col is not None and col not in adata.obs:
            raise UserError(f"datasets.{dataset}.{role} is {col!r}, not an obs column of {h5ad}; fix the config.")
    labels = adata.obs[cell_type].to_numpy(dtype=object) if cell_type else None
    batches = adata.obs[batch].astype(str).to_numpy() if batch else None

    embeddings = {
        "se": read_embedding(se, "X_state", adata.obs_names, "embed"),
        "xpressor": read_embedding(xpressor, "X_xpressor", adata.obs_names, "xpressor_encode"),
        "pca_hvg": pca_baseline(adata, n_hvg=settings["pca"]["n_hvg"], n_pcs=settings["pca"]["n_pcs"], seed=seed),
        "random_se": read_embedding(random, "X_state", adata.obs_names, "embed"),
    }
    rows, result = compare_embeddings(
        embeddings,
        labels,
        batches,
        model_methods=("se", "xpressor"),
        pre_integration="pca_hvg",
        k=settings["knn_k"],
        n_folds=settings["n_folds"],
        resolutions=settings["leiden_resolutions"],
        silhouette_max_cells=settings["silhouette_max_cells"],
        seed=seed,
    )
    result.update(
        dataset=dataset, label=cell_type, batch=batch, dims={k: int(v.shape[1]) for k, v in embeddings.items()}
    )
    written = write_table(rows, table)
    write_json(result, summary)

    metric_bars(
        bars,
        written[written["skipped"] == ""],  # a skipped metric gets no (empty) panel
        ["knn_accuracy", "knn_macro_f1", *BIO_METRICS, *BATCH_METRICS, *AGGREGATES],
        title=f"{dataset}: embedding metrics (higher is better)",
    )
    colors = {cell_type: np.where(unlabelled(labels), "unlabelled", labels.astype(str))} if cell_type else {}
    if batches is not None:
        colors[batch] = batches
    if not colors:
        colors["no labels"] = np.full(adata.n_obs, "cell")
    for metric, reason in result["skipped"].items():
        log.warning("%s skipped: %s", metric, reason)
    coords = {}
    for name, X in embeddings.items():
        coords[name] = umap_coordinates(X, seed=seed, n_neighbors=settings["knn_k"])
        log.info("UMAP of %s done", name)
    umap_grid(umap, coords, colors, title=f"{dataset}: UMAP of each embedding")
    log.info("wrote %s", table)


def run_evaluate_xpressor(
    *,
    h5ad: PathLike,
    xpressor_summary: PathLike,
    xpressor_metrics: PathLike,
    xpressor_checkpoint: PathLike,
    latents: PathLike,
    vocab: PathLike,
    table: PathLike,
    summary: PathLike,
    bars: PathLike,
    scatter: PathLike,
    settings: dict,
    dataset: str,
    seed: int,
    device: str = "auto",
) -> None:
    """Held-out reconstruction table of the Xpressor stage, per-gene agreement and a
    decoded-vs-observed scatter computed from the saved latents (`settings`: the evaluate
    section; its reconstruction part is used)."""
    from cellfoundry.models.xpressor import load_xpressor
    from cellfoundry.vocab import GeneVocab

    device = start_stage(seed, device)
    cfg = settings["reconstruction"]
    adata = read_h5ad(h5ad, "qc")
    stage_summary = read_json(xpressor_summary, "xpressor_encode")
    stage_table = read_table(xpressor_metrics, ["method", "metric", "value"], "xpressor_train")

    ckpt = load_xpressor(require(xpressor_checkpoint, "xpressor_train"))
    genes = list(ckpt.meta.get("genes", []))
    if not genes:
        raise UserError(
            f"{xpressor_checkpoint} does not list its decoded genes (meta['genes']); re-run rule xpressor_train."
        )
    absent = [g for g in genes if g not in set(adata.var_names)]
    if absent:
        raise UserError(
            f"{xpressor_checkpoint} decodes {len(absent)} gene(s) absent from {h5ad} (e.g. {absent[:3]}); "
            "it is stale: re-run rule xpressor_train."
        )
    gene_vocab = GeneVocab.load(vocab)
    ids = gene_vocab.lookup(genes)
    if (ids < 0).any():
        raise UserError(
            f"{vocab} lacks {int((ids < 0).sum())} gene(s) the Xpressor model decodes; the vocabulary changed: "
            "re-run rule xpressor_train."
        )

    cell_latents = np.load(require(latents, "xpressor_encode"), mmap_mode="r")
    rec.check_latents(cell_latents, adata.n_obs, latents)
    test = np.flatnonzero(adata.obs["split"].astype(str).to_numpy() == "test")
    if len(test) > cfg["max_cells"]:
        test = np.sort(np.random.default_rng(seed).choice(test, cfg["max_cells"], replace=False))
    log.info("decoding %d held-out cells over %d genes on %s", len(test), len(genes), device)
    predicted = rec.decode_log1p(ckpt.model, cell_latents[test], gene_vocab.table[ids], device=device)
    observed = log1p_normalise(adata[test, genes].X.astype(np.float64), target_sum=ckpt.config.target_sum)
    gene_r = rec.per_gene_pearson(predicted, observed)

    written = write_table(rec.reconstruction_rows(stage_table, stage_summary, gene_r), table)
    write_json(
        {
            "dataset": dataset,
            "n_test_cells_decoded": int(len(test)),
            "n_genes": len(genes),
            "trainable_fraction": stage_summary.get("trainable_fraction"),
            "xpressor_beats_baselines": stage_summary.get("xpressor_beats_baselines"),
            "metrics": {m: dict(zip(sub["metric"], sub["value"])) for m, sub in written.groupby("method", sort=False)},
            "gene_pearson": dict(zip(genes, np.round(gene_r, 4).tolist())),
        },
        summary,
    )
    metric_bars(
        bars,
        written,
        ["pearson_mean", "spearman_mean", "mse", "gene_pearson_mean"],
        title=f"{dataset}: held-out reconstruction",
        lower_is_better=("mse",),
    )
    show = rec.genes_to_show(observed, gene_r, cfg["scatter_genes"])
    title = f"{dataset}: Xpressor decoded vs observed ({len(test)} held-out cells)"
    decoded_vs_observed(scatter, predicted, observed, genes, show, gene_r, title=title)
    log.info("wrote %s", table)


def run_evaluate_generation(
    *,
    h5ad: PathLike,
    samples: PathLike,
    table: PathLike,
    summary: PathLike,
    bars: PathLike,
    umap: PathLike,
    settings: dict,
    cell_type: str | None,
    condition_columns: Sequence[str],
    dataset: str,
    seed: int,
    latents: PathLike | None = None,
    xpressor_checkpoint: PathLike | None = None,
    vocab: PathLike | None = None,
) -> None:
    """Generated cells vs real test cells, beside the two references, and (latent token space:
    `latents`, `xpressor_checkpoint` and `vocab` given) the ceiling of the real test cells' own
    latents decoded as the samples are."""
    start_stage(seed)
    real = read_h5ad(h5ad, "qc")
    # Library sizes over all QC'd genes, as the diffusion stage draws them for its samples.
    library = np.asarray(real.X.sum(axis=1)).ravel().astype(np.float32)
    generated = read_h5ad(samples, "diffusion_sample", layers=False)
    generated_genes = set(generated.var_names)
    shared = [g for g in real.var_names if g in generated_genes]
    if len(shared) < 0.5 * real.n_vars:
        raise UserError(
            f"{samples} covers only {len(shared)} of the {real.n_vars} genes of qc/filtered.h5ad; "
            "generated cells must be "
            "decoded over the QC'd genes: re-run the diffusion sampling (snakemake --forcerun diffusion_sample)."
        )
    if len(shared) < real.n_vars:
        # E.g. genes absent from the model's gene vocabulary cannot be decoded: compare on the rest.
        log.warning("comparing on the %d of %d genes present in %s", len(shared), real.n_vars, samples)
        real = real[:, shared].copy()
    generated = generated[:, shared]
    group_columns = [c for c in condition_columns if c in generated.obs and c in real.obs]
    absent = [c for c in condition_columns if c not in generated.obs]
    if absent:
        raise UserError(
            f"{samples} obs lacks condition column(s) {absent}; re-run diffusion sampling "
            "(snakemake --forcerun diffusion_sample)."
        )
    values = generated.X.data if sp.issparse(generated.X) else generated.X
    if generated.n_obs == 0 or not np.isfinite(values).all():
        raise UserError(f"{samples} holds no cells or non-finite values; re-run diffusion sampling.")
    label_col = cell_type if cell_type in generated.obs else None
    # Label-based scores that cannot be computed are listed with the reason (json "skipped", tsv rows).
    skipped = {}
    if label_col is None:
        skipped["label_accuracy"] = (
            "no cell-type labels: datasets.<name>.cell_type is null"
            if cell_type is None
            else f"the generated cells carry no {cell_type!r} labels (it is no diffusion condition column)"
        )
    if not group_columns:
        skipped["per-condition scores"] = "no diffusion conditions: the model is unconditional"

    split = real.obs["split"].astype(str).to_numpy()
    train, test = real[split == "train"], real[split == "test"]
    ceiling = None
    if latents is not None:
        from cellfoundry.xpressor.decode import sampled_counts, xpressor_decoder

        # The ceiling: the real test cells' own Xpressor latents, decoded to sampled counts with
        # each cell's library size, exactly as the diffusion samples are decoded.
        cell_latents = np.load(latents, mmap_mode="r")
        if cell_latents.shape[0] != real.n_obs:
            raise UserError(
                f"{latents} holds {cell_latents.shape[0]} cells but {h5ad} has {real.n_obs}; re-run xpressor_encode."
            )
        decode = xpressor_decoder(xpressor_checkpoint, vocab, list(real.var_names))
        ceiling = sampled_counts(decode(cell_latents[split == "test"], library[split == "test"], seed))
    else:
        skipped[gen.CEILING] = "gene token space: no Xpressor latents to decode (diffusion.token_space: gene)"
    log.info(
        "real train %d, real test %d, generated %d cells; conditions by %s",
        train.n_obs,
        test.n_obs,
        generated.n_obs,
        group_columns or "none",
    )
    g = settings["generation"]
    rows, embedding = gen.compare_sets(
        train.X,
        train.obs,
        test.X,
        test.obs,
        generated.X,
        generated.obs,
        group_columns=group_columns,
        label_column=label_col,
        n_hvg=g["n_hvg"],
        n_pcs=g["n_pcs"],
        k_auc=g["knn_auc_k"],
        k_label=settings["knn_k"],
        min_cells_per_group=g["min_cells_per_group"],
        max_cells=g["max_cells"],
        seed=seed,
        ceiling_counts=ceiling,
    )
    scored = (gen.MODEL, gen.REFERENCE_REAL, gen.REFERENCE_WEAK) + ((gen.CEILING,) if ceiling is not None else ())
    skipped_rows = [
        dict(method=method, condition="all", metric=metric, value=np.nan, n_cells=0, skipped=reason)
        for metric, reason in skipped.items()
        for method in ((gen.CEILING,) if metric == gen.CEILING else scored)
    ]
    write_table(rows + skipped_rows, table)
    scores = pd.DataFrame(rows)

    overall = scores[scores["condition"].isin(["all", "mean over conditions"])]
    result = {
        "dataset": dataset,
        "n_generated": int(generated.n_obs),
        "n_real_test": int(test.n_obs),
        "n_real_train": int(train.n_obs),
        "condition_columns": group_columns,
        # cells with a missing condition value / label: in "all" only, never in a condition's score
        "n_unlabelled": {
            "real_test_conditions": int((gen.groups_of(test.obs, group_columns) == gen.UNLABELLED).sum()),
            "generated_conditions": int((gen.groups_of(generated.obs, group_columns) == gen.UNLABELLED).sum()),
            "real_test_labels": (
                int(unlabelled(test.obs[label_col].to_numpy(dtype=object)).sum()) if label_col else int(test.n_obs)
            ),
        },
        "skipped": skipped,
        "metrics": {
            scope: {
                m: dict(zip(sub["metric"], sub["value"]))
                for m, sub in overall[overall["condition"] == scope].groupby("method")
            }
            for scope in ("all", "mean over conditions")
        },
    }
    write_json(result, summary)
    metric_bars(
        bars,
        overall[overall["condition"] == "all"],
        ["w1", "w2", "mmd_rbf", "mmd_linear", "energy", "knn_auc", "r2_mean", "r2_var", "label_accuracy"],
        title=f"{dataset}: generated vs real test cells (all cells)",
        lower_is_better=("w1", "w2", "mmd_rbf", "mmd_linear", "energy", "knn_auc"),
    )
    xy = umap_coordinates(embedding["coords"], seed=seed)
    umap_grid(
        umap,
        {"real test + generated": xy},
        {"source": embedding["source"], "condition": embedding["group"]},
        title=f"{dataset}: real and generated cells (UMAP of the 30 PCs)",
    )
    log.info("wrote %s", table)


def run_evaluate_prediction(
    *,
    h5ad: PathLike,
    samples: PathLike,
    table: PathLike,
    summary: PathLike,
    scatter: PathLike,
    settings: dict,
    holdout: list,
    conditions: list[dict],
    dataset: str,
    seed: int,
) -> None:
    """Each held-out combination's generated cells vs its real held-out cells, beside the
    no-change, linear-shift and split-half references."""
    start_stage(seed)
    real = read_h5ad(h5ad, "qc")
    generated = read_h5ad(samples, "diffusion_sample", layers=False)
    if "holdout" not in real.obs:
        raise UserError(f"{h5ad} marks no held-out cells (obs['holdout']); re-run qc (snakemake --forcerun qc).")
    if list(generated.var_names) != list(real.var_names):
        raise UserError(
            f"{samples} holds other genes than {h5ad}; re-run diffusion_sample (snakemake --forcerun diffusion_sample)."
        )
    # the none_value of a multi_component condition marks its columns' control (absent stimulus) label
    none_values = {col: c["none_value"] for c in conditions if c.get("none_value") for col in c["columns"]}
    heldout = real.obs["holdout"].astype(bool).to_numpy()
    g = settings["generation"]
    rows, means = [], {}
    for combo in holdout:
        r, m = pred.evaluate_combination(
            real.X,
            real.obs,
            heldout,
            generated.X,
            generated.obs,
            combo,
            none_values,
            n_de_genes=settings["prediction"]["n_de_genes"],
            n_hvg=g["n_hvg"],
            n_pcs=g["n_pcs"],
            k_auc=g["knn_auc_k"],
            max_cells=g["max_cells"],
            seed=seed,
        )
        rows += r
        means[pred.combination_label(combo)] = m
    written = write_table(rows, table)
    result = {
        "dataset": dataset,
        "holdout": holdout,
        "n_de_genes": settings["prediction"]["n_de_genes"],
        "metrics": {
            label: {
                method: dict(zip(sub["metric"], sub["value"])) for method, sub in part.groupby("method", sort=False)
            }
            for label, part in written.groupby("combination", sort=False)
        },
    }
    write_json(result, summary)
    title = f"{dataset}: predicted vs real mean expression of held-out cells"
    plot_prediction(scatter, means, list(real.var_names), pred.METHODS, title=title)
    log.info("wrote %s", table)


def run_stage_costs(*, benchmarks: Sequence[PathLike], rules: Sequence[str], table: PathLike) -> None:
    """One row per job (wall time, CPU time, peak memory) from its Snakemake benchmark file
    (`benchmarks`, the files of the jobs of `rules` in the same order)."""
    rows = []
    for rule, path in zip(rules, benchmarks):
        # one line per repeat; "NA" where the job ended before the first sample (0.5 s)
        bench = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
        rows.append(
            dict(
                rule=rule,
                job=Path(path).stem,
                scope="shared" if Path(path).parts[1] == "shared" else "dataset",
                wall_s=round(bench["s"].mean(), 2),
                cpu_s=round(bench["cpu_time"].mean(), 2),
                max_rss_mb=round(bench["max_rss"].max(), 1),
                mean_load=round(bench["mean_load"].mean(), 1),
            )
        )
    costs = pd.DataFrame(rows)
    costs["wall_share"] = (costs["wall_s"] / costs["wall_s"].sum()).round(3)
    with atomic_output(table) as tmp:
        costs.to_csv(tmp, sep="\t", index=False)
    log.info(
        "%d jobs, %.1f s wall in all; slowest %s (%.1f s); most memory %s (%.0f MB)",
        len(costs),
        costs["wall_s"].sum(),
        *costs.loc[costs["wall_s"].idxmax(), ["job", "wall_s"]],
        *costs.loc[costs["max_rss_mb"].fillna(-1).idxmax(), ["job", "max_rss_mb"]],
    )
