"""Quality control: per-cell metrics, cell filters (fixed or MAD), doublets and the gene filter,
then the train/test split of cellfoundry.split, in `quality_control`; `run_qc` is the rule's
entry point (read the counts, QC, write the outputs and figures)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

from cellfoundry.genes import AUTO, prepare_genes
from cellfoundry.io import load_counts
from cellfoundry.plots import plot_counts_vs_genes, plot_distributions
from cellfoundry.provenance import KEY, provenance
from cellfoundry.samples import load_samples
from cellfoundry.split import combination_label, combination_mask, holdout_split, stratified_split
from cellfoundry.utils import UserError, atomic_output, start_stage, unlabelled

log = logging.getLogger(__name__)

MT_PREFIXES = ("MT-", "mt-")
RIBO_PREFIXES = ("RPS", "RPL", "Rps", "Rpl")
# Haemoglobin genes (HBA1, HBB, HBG2, ..., mouse Hba-a1, Hbb-bs) but not HBEGF, HBP1 or HBS1L.
HB_PATTERN = r"^(HB[ABDEGMQZ]\d?|Hb[abdegmqz](-.*)?)$"
PERCENT_METRICS = ("pct_counts_mt", "pct_counts_ribo", "pct_counts_hb")


@dataclass
class Threshold:
    """One cell filter: cells pass when lower <= obs[metric] <= upper (None = unbounded)."""

    name: str
    metric: str
    lower: float | None = None
    upper: float | None = None
    batch: str | None = None
    key: str | None = None  # the obs column holding `batch` (None: the dataset's batch column)

    def passes(self, values: pd.Series) -> np.ndarray:
        ok = np.ones(len(values), dtype=bool)
        if self.lower is not None:
            ok &= values.to_numpy() >= self.lower
        if self.upper is not None:
            ok &= values.to_numpy() <= self.upper
        return ok


@dataclass
class QCResult:
    filtered: ad.AnnData
    metrics: pd.DataFrame  # one row per input cell
    summary: dict
    thresholds: list[Threshold] = field(default_factory=list)


def annotate_genes(adata: ad.AnnData) -> None:
    """Flag mitochondrial, ribosomal and haemoglobin genes in var (human and mouse symbols)."""
    names = adata.var_names.to_series()
    adata.var["mt"] = names.str.startswith(MT_PREFIXES).to_numpy()
    adata.var["ribo"] = names.str.startswith(RIBO_PREFIXES).to_numpy()
    adata.var["hb"] = names.str.match(HB_PATTERN).to_numpy()


def compute_metrics(adata: ad.AnnData) -> None:
    """Per-cell totals, detected genes and mito/ribo/hb percentages, added to obs."""
    annotate_genes(adata)
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo", "hb"], percent_top=None, log1p=True, inplace=True)


# The config keys a user changes to loosen each filter (named in the large-removal warning).
FILTER_KEYS = {
    "genes": "qc.min_genes / qc.max_genes",
    "counts": "qc.min_counts / qc.max_counts",
    "max_pct_mt": "qc.max_pct_mt",
    "max_pct_hb": "qc.max_pct_hb",
    "doublets": "qc.doublets.threshold (or expected_rate, or enabled: false)",
}
MIN_DOUBLET_CELLS = 100  # smaller batches are not scored for doublets
# Keys a dataset's `sample_qc` may override per sample; the rest are dataset-wide.
FIXED_KEYS = ("min_genes", "max_genes", "min_counts", "max_counts")
SAMPLE_QC_KEYS = (*FIXED_KEYS, "max_pct_mt", "max_pct_hb", "mad", "doublets")


def merge_qc(base: dict, override: dict | None) -> dict:
    """`base` qc settings with `override` applied (nested sections merged key by key)."""
    out = dict(base)
    for key, value in (override or {}).items():
        out[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def fixed_thresholds(cfg: dict) -> list[Threshold]:
    out = [
        Threshold("genes", "n_genes_by_counts", cfg.get("min_genes"), cfg.get("max_genes")),
        Threshold("counts", "total_counts", cfg.get("min_counts"), cfg.get("max_counts")),
    ]
    return [t for t in out if t.lower is not None or t.upper is not None]


def percent_thresholds(cfg: dict) -> list[Threshold]:
    out = []
    if cfg.get("max_pct_mt") is not None:
        out.append(Threshold("max_pct_mt", "pct_counts_mt", None, cfg["max_pct_mt"]))
    if cfg.get("max_pct_hb") is not None:
        out.append(Threshold("max_pct_hb", "pct_counts_hb", None, cfg["max_pct_hb"]))
    return out


def mad_thresholds(
    obs: pd.DataFrame, cfg: dict, batch_key: str | None, batch_cfg: dict[str, dict] | None = None
) -> list[Threshold]:
    """Median ± n·MAD windows per batch; percentages are filtered from above only. `batch_cfg`
    maps a batch to its own qc settings (per-sample overrides)."""
    groups = obs.groupby(batch_key, observed=True) if batch_key else [(None, obs)]
    out = []
    for batch, part in groups:
        mad_cfg = (batch_cfg or {}).get(str(batch), cfg)["mad"]
        n_mads = mad_cfg["n_mads"]
        for metric in mad_cfg["metrics"]:
            values = part[metric].to_numpy()
            median = float(np.median(values))
            mad = float(np.median(np.abs(values - median)))
            lower = None if metric in PERCENT_METRICS else median - n_mads * mad
            out.append(
                Threshold(f"mad_{metric}", metric, lower, median + n_mads * mad, None if batch is None else str(batch))
            )
    return out


def apply_thresholds(obs: pd.DataFrame, thresholds: list[Threshold], batch_key: str | None) -> dict[str, np.ndarray]:
    """Pass mask per filter name (a batch-specific threshold applies to its batch's cells)."""
    masks: dict[str, np.ndarray] = {}
    for t in thresholds:
        ok = t.passes(obs[t.metric])
        if t.batch is not None:
            ok |= (obs[t.key or batch_key].astype(str) != t.batch).to_numpy()
        masks[t.name] = masks.get(t.name, np.ones(len(obs), bool)) & ok
    return masks


def detect_doublets(
    adata: ad.AnnData, cfg: dict, batch_key: str | None, seed: int, batch_cfg: dict[str, dict] | None = None
) -> np.ndarray:
    """scrublet doublet scores and calls, per batch when a batch column is set (`batch_cfg` maps a
    batch to its own doublet settings); adds obs columns doublet_score and predicted_doublet.

    The kNN step uses exact neighbours (scikit-learn, brute force) at every size: scanpy 1.11's
    approximate path (pynndescent, taken once obs + simulated doublets reach 8,192 cells) returns a
    scipy csr_array, and scipy >= 1.17 removed the getnnz its neighbour shortcut calls. Exact
    neighbours are also what scanpy uses below that size, so every size runs one tested path;
    the cost is O(n^2) per batch (about 10 s for 10,000 cells, 70 s for 20,000 on one core).
    Batches under MIN_DOUBLET_CELLS cells are left unscored, with a warning."""
    adata.obs["doublet_score"] = np.nan
    adata.obs["predicted_doublet"] = False
    groups = adata.obs.groupby(batch_key, observed=True).indices if batch_key else {None: np.arange(adata.n_obs)}
    for batch, rows in groups.items():
        bcfg = (batch_cfg or {}).get(str(batch), {}).get("doublets", cfg)
        if not bcfg.get("enabled", True):
            continue
        if len(rows) < MIN_DOUBLET_CELLS:  # scrublet's PCA and kNN need more cells than this
            log.warning(
                "batch %s: only %d cells, too few for scrublet (%d); no doublets called there",
                batch,
                len(rows),
                MIN_DOUBLET_CELLS,
            )
            continue
        part = adata[rows].copy()
        sc.pp.scrublet(
            part,
            expected_doublet_rate=bcfg["expected_rate"],
            threshold=bcfg["threshold"],
            random_state=seed,
            use_approx_neighbors=False,
            verbose=False,
        )
        adata.obs.iloc[rows, adata.obs.columns.get_loc("doublet_score")] = part.obs["doublet_score"].to_numpy()
        adata.obs.iloc[rows, adata.obs.columns.get_loc("predicted_doublet")] = part.obs["predicted_doublet"].to_numpy(
            bool
        )
    return adata.obs["predicted_doublet"].to_numpy(dtype=bool)


def sample_configs(
    obs: pd.DataFrame, cfg: dict, sample_qc: dict[str, dict] | None, sample_key: str, batch: str | None
) -> dict[str, dict]:
    """Each sample's qc settings (cfg with its `sample_qc` overrides); {} without overrides."""
    if not sample_qc:
        return {}
    if sample_key not in obs.columns:
        raise UserError(
            f"`sample_qc` is set but the cells have no obs column {sample_key!r}; per-sample QC overrides "
            "need the dataset to be read from a `samples` sheet. Remove sample_qc or use `samples`."
        )
    samples = obs[sample_key].astype(str)
    unknown = sorted(set(sample_qc) - set(samples))
    if unknown:
        raise UserError(
            f"`sample_qc` names samples {unknown} that are not in the sample sheet (samples: "
            f"{sorted(samples.unique())}); fix the names under sample_qc."
        )
    for name, override in sample_qc.items():
        bad = sorted(set(override) - set(SAMPLE_QC_KEYS))
        if bad:
            raise UserError(
                f"sample_qc.{name} sets {bad}, which are dataset-wide; allowed per sample: {list(SAMPLE_QC_KEYS)}."
            )
        if cfg["filter"] == "mad" and set(override) & set(FIXED_KEYS):
            raise UserError(
                f"sample_qc.{name} sets fixed thresholds {sorted(set(override) & set(FIXED_KEYS))} but qc.filter "
                "is mad, which ignores them; set mad.n_mads for the sample instead, or use filter: fixed."
            )
        if batch != sample_key and {"mad", "doublets"} & set(override):
            raise UserError(
                f"sample_qc.{name} overrides mad/doublets, which run per batch, but the dataset's batch is "
                f"{batch!r}, not {sample_key!r}; unset `batch` (it then defaults to {sample_key}) or move "
                "these keys to the dataset's qc section."
            )
    return {s: merge_qc(cfg, sample_qc.get(s)) for s in pd.unique(samples)}


def large_removal(n_before: int, n_after: int, steps: list[dict], sample: str | None = None) -> dict:
    """The warning for a QC that removes more than half of the cells (of one sample, if given):
    which filters, how many each, and the keys to change."""
    culprits = sorted((s for s in steps if s["cells_failing"]), key=lambda s: -s["cells_failing"])
    filters = [
        {
            "filter": s["filter"],
            "cells_failing": s["cells_failing"],
            "config_key": FILTER_KEYS.get(s["filter"], "qc.mad.n_mads (or qc.mad.metrics)"),
        }
        for s in culprits
    ]
    removed = n_before - n_after
    message = (
        ("" if sample is None else f"sample {sample}: ")
        + f"QC removes {removed} of {n_before} cells ({100 * removed / n_before:.0f}%), more than half: "
        + "; ".join(
            f"{f['filter']} removes {f['cells_failing']} on its own (change {f['config_key']})" for f in filters
        )
        + ". Check the thresholds suit this data (species, chemistry, depth); change them in the qc section, "
        "the dataset's qc overrides or " + ("its sample_qc." if sample is None else f"sample_qc.{sample}.")
    )
    return {
        "cells_removed": removed,
        "fraction_removed": round(removed / n_before, 4),
        "filters": filters,
        "message": message,
    }


def quality_control(
    adata: ad.AnnData,
    cfg: dict,
    *,
    cell_type: str | None = None,
    batch: str | None = None,
    seed: int = 0,
    sample_qc: dict[str, dict] | None = None,
    sample_key: str = "sample",
    holdout: list[dict] | None = None,
) -> QCResult:
    """Filter cells and genes of a raw-count AnnData and split it; nothing in `adata` is changed.

    Filters run in order: metric thresholds, doublets, genes by min_cells. The summary records,
    for each filter, how many cells (or genes) it removes on its own and how many remain after it.
    `sample_qc` maps a value of obs[sample_key] to overrides of the cell filters for its cells
    (SAMPLE_QC_KEYS; mad and doublets overrides need the batch column to be sample_key).
    `holdout`: combinations {obs column: value} whose cells all go to the test split
    (holdout_split); obs["holdout"] marks them.
    """
    for key, role in ((cell_type, "cell_type"), (batch, "batch")):
        if key is not None and key not in adata.obs.columns:
            raise UserError(
                f"the dataset's `{role}: {key}` is not an obs column; obs columns are {list(adata.obs.columns)}."
            )
    # QC adds obs/var columns and only reads the matrices: share them rather than copy (a copy
    # of X is ~16 GB per million cells at 2,000 detected genes each)
    adata = ad.AnnData(
        adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        uns=dict(adata.uns),
        layers=dict(adata.layers),
        obsm=dict(adata.obsm),
        varm=dict(adata.varm),
    )
    compute_metrics(adata)
    obs = adata.obs

    group_cfg = sample_configs(obs, cfg, sample_qc, sample_key, batch)
    thresholds = []
    for sample, scfg in group_cfg.items() or [(None, cfg)]:
        part = (fixed_thresholds(scfg) if cfg["filter"] == "fixed" else []) + percent_thresholds(scfg)
        thresholds += [
            Threshold(t.name, t.metric, t.lower, t.upper, sample, sample_key if sample else None) for t in part
        ]
    if cfg["filter"] == "mad":
        thresholds = mad_thresholds(obs, cfg, batch, group_cfg) + thresholds
    masks = apply_thresholds(obs, thresholds, batch)

    steps = []
    keep = np.ones(adata.n_obs, dtype=bool)
    for name, ok in masks.items():
        keep &= ok
        steps.append({"filter": name, "cells_failing": int((~ok).sum()), "cells_remaining": int(keep.sum())})

    obs["doublet_score"] = np.nan
    obs["predicted_doublet"] = False
    doublets_on = any(c["doublets"]["enabled"] for c in group_cfg.values()) if group_cfg else cfg["doublets"]["enabled"]
    if doublets_on and keep.sum() > 0:
        sub = adata[keep].copy()
        is_doublet = detect_doublets(sub, cfg["doublets"], batch, seed, group_cfg)
        obs.loc[sub.obs_names, "doublet_score"] = sub.obs["doublet_score"].to_numpy()
        obs.loc[sub.obs_names, "predicted_doublet"] = is_doublet
        keep[np.flatnonzero(keep)[is_doublet]] = False
        del sub  # before the filtered copy below
        steps.append({"filter": "doublets", "cells_failing": int(is_doublet.sum()), "cells_remaining": int(keep.sum())})

    failed = {name: ~ok for name, ok in masks.items()}
    failed["doublets"] = obs["predicted_doublet"].to_numpy(dtype=bool)
    obs["passed_qc"] = keep
    obs["failed_filters"] = [",".join(name for name, bad in failed.items() if bad[i]) for i in range(adata.n_obs)]

    summary = {
        "cells_before": int(adata.n_obs),
        "genes_before": int(adata.n_vars),
        "filter_mode": cfg["filter"],
        "thresholds": [t.__dict__ for t in thresholds],
        "steps": steps,
    }
    if keep.sum() < 0.5 * adata.n_obs:
        summary["large_removal"] = large_removal(adata.n_obs, int(keep.sum()), steps)
        log.warning("%s", summary["large_removal"]["message"])
    if sample_key in obs.columns:  # a sample losing most of its cells hides in a data set's total
        for sample, rows in obs.groupby(sample_key, observed=True).indices.items():
            if keep[rows].sum() < 0.5 * len(rows):
                sample_steps = [{"filter": n, "cells_failing": int(b[rows].sum())} for n, b in failed.items()]
                entry = large_removal(len(rows), int(keep[rows].sum()), sample_steps, str(sample))
                summary.setdefault("large_removal_samples", {})[str(sample)] = entry
                log.warning("%s", entry["message"])
    if keep.sum() == 0:
        per_filter = "; ".join(f"{s['filter']}: {s['cells_failing']} cells fail" for s in steps)
        raise UserError(
            f"no cells are left after QC ({adata.n_obs} cells in; {per_filter}). Loosen the failing "
            "thresholds in the `qc` section (or the dataset's `qc` overrides) or check that the input holds raw counts."
        )

    filtered = adata[keep].copy()
    gene_cells = np.asarray((filtered.X > 0).sum(axis=0)).ravel()
    keep_genes = gene_cells >= cfg["min_cells"]
    if not keep_genes.all():  # (another copy of the matrix)
        filtered = filtered[:, keep_genes].copy()
    filtered.var["n_cells"] = gene_cells[keep_genes]
    summary["steps"].append(
        {
            "filter": "min_cells (genes)",
            "genes_failing": int((~keep_genes).sum()),
            "genes_remaining": int(keep_genes.sum()),
        }
    )
    if filtered.n_vars == 0:
        raise UserError(
            f"no genes are detected in at least {cfg['min_cells']} of the {filtered.n_obs} cells left after QC; "
            "lower qc.min_cells."
        )

    labels = filtered.obs[cell_type] if cell_type else None
    if labels is not None:
        summary["unlabelled_cells"] = int(unlabelled(labels).sum())
    if holdout:
        split, held = holdout_split(filtered.obs, holdout, labels, cfg["test_fraction"], seed)
        filtered.obs["holdout"] = held
        summary["holdout"] = [
            {
                "combination": {k: str(v) for k, v in combo.items()},
                "cells": int(combination_mask(filtered.obs, combo).sum()),
            }
            for combo in holdout
        ]
        for entry in summary["holdout"]:
            log.info(
                "held out %d cells of %s (test split only)", entry["cells"], combination_label(entry["combination"])
            )
    else:
        split = stratified_split(labels, filtered.n_obs, cfg["test_fraction"], seed)
    filtered.obs["split"] = pd.Categorical(split, categories=["train", "test"])
    obs["split"] = pd.Series(filtered.obs["split"].astype(str), index=filtered.obs_names).reindex(obs.index)
    summary.update(
        cells_after=int(filtered.n_obs),
        genes_after=int(filtered.n_vars),
        split={k: int(v) for k, v in filtered.obs["split"].value_counts().items()},
    )
    metric_cols = [
        "total_counts",
        "n_genes_by_counts",
        "pct_counts_mt",
        "pct_counts_ribo",
        "pct_counts_hb",
        "doublet_score",
        "predicted_doublet",
        "passed_qc",
        "failed_filters",
        "split",
    ]
    for entry in summary["steps"]:
        log.info("QC %s", entry)
    return QCResult(filtered=filtered, metrics=obs[metric_cols].copy(), summary=summary, thresholds=thresholds)


def run_qc(
    h5ad: str | os.PathLike,
    summary: str | os.PathLike,
    metrics: str | os.PathLike,
    distributions: str | os.PathLike,
    scatter: str | os.PathLike,
    dataset_settings: Mapping[str, Any],
    settings: Mapping[str, Any],
    seed: int,
    gene_map: str | os.PathLike | None = None,
    vocab: str | os.PathLike | None = None,
    dataset: str = "dataset",
) -> QCResult:
    """Rule qc: read the raw counts of `dataset` (its entry `dataset_settings`: one input `path`, or
    a `samples` sheet, which adds obs["sample"]), name its genes (`gene_map`; `vocab` scores the
    candidates of gene_symbols: auto), run quality_control with `settings` (the qc section with
    the dataset's overrides), and write the filtered cells `h5ad`, `summary` (JSON), the per-cell
    `metrics` (TSV) and the figures `distributions` and `scatter`."""
    start_stage(seed)  # QC's draws have their own generators seeded with `seed`; this is the contract
    ds = dataset_settings
    # gene_symbols: auto is chosen after loading, from var_names and the var columns
    symbols, source = None if ds["gene_symbols"] == AUTO else ds["gene_symbols"], ds.get("samples") or ds["path"]
    if ds.get("samples"):
        adata, samples = load_samples(
            source, ds["format"], ds["counts"], symbols, ds["gene_join"], tmp_dir=os.path.dirname(h5ad)
        )
    else:
        adata, samples = load_counts(source, ds["format"], ds["counts"], symbols), None
    log.info("read %d cells x %d genes from %s", adata.n_obs, adata.n_vars, source)
    # gene names and the gene map, before QC so that every later stage sees the same genes
    adata, genes = prepare_genes(adata, ds["gene_symbols"], gene_map, vocab)
    result = quality_control(
        adata,
        settings,
        cell_type=ds["cell_type"],
        batch=ds["batch"] or ("sample" if samples else None),
        seed=seed,
        sample_qc=ds.get("sample_qc"),
        holdout=ds["split"]["holdout"],
    )
    result.summary["dataset"] = dataset
    if samples:
        result.summary["samples"] = samples
    result.summary["genes"] = genes
    title = f"{dataset}: {result.summary['cells_before']} -> {result.summary['cells_after']} cells"

    with atomic_output(metrics) as tmp:
        result.metrics.to_csv(tmp, sep="\t", index_label="cell")
    plot_distributions(result.metrics, result.thresholds, distributions, title)
    plot_counts_vs_genes(result.metrics, scatter, title)
    result.filtered.uns[KEY] = provenance(
        "qc", {"dataset": ds, "qc": settings, "seed": seed}, inputs={"counts": source}
    )
    with atomic_output(h5ad) as tmp:
        result.filtered.write_h5ad(tmp)
    with atomic_output(summary) as tmp:
        tmp.write_text(json.dumps(result.summary, indent=2))
    log.info("kept %d cells x %d genes", result.filtered.n_obs, result.filtered.n_vars)
    return result
