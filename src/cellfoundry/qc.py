"""Quality control: per-cell metrics, cell filters (fixed or MAD), doublets, gene filter, and the
stratified train/test split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

from cellfoundry.utils import UserError

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


def mad_thresholds(obs: pd.DataFrame, cfg: dict, batch_key: str | None) -> list[Threshold]:
    """Median ± n·MAD windows per batch; percentages are filtered from above only."""
    n_mads = cfg["mad"]["n_mads"]
    groups = obs.groupby(batch_key, observed=True) if batch_key else [(None, obs)]
    out = []
    for batch, part in groups:
        for metric in cfg["mad"]["metrics"]:
            values = part[metric].to_numpy()
            median = float(np.median(values))
            mad = float(np.median(np.abs(values - median)))
            lower = None if metric in PERCENT_METRICS else median - n_mads * mad
            out.append(Threshold(f"mad_{metric}", metric, lower, median + n_mads * mad, None if batch is None else str(batch)))
    return out


def apply_thresholds(obs: pd.DataFrame, thresholds: list[Threshold], batch_key: str | None) -> dict[str, np.ndarray]:
    """Pass mask per filter name (a batch-specific threshold applies to its batch's cells)."""
    masks: dict[str, np.ndarray] = {}
    for t in thresholds:
        ok = t.passes(obs[t.metric])
        if t.batch is not None:
            ok |= (obs[batch_key].astype(str) != t.batch).to_numpy()
        masks[t.name] = masks.get(t.name, np.ones(len(obs), bool)) & ok
    return masks


def detect_doublets(adata: ad.AnnData, cfg: dict, batch_key: str | None, seed: int) -> np.ndarray:
    """scrublet doublet scores and calls (per batch when a batch column is set); adds obs columns."""
    sc.pp.scrublet(
        adata,
        batch_key=batch_key,
        expected_doublet_rate=cfg["expected_rate"],
        threshold=cfg["threshold"],
        random_state=seed,
        verbose=False,
    )
    return adata.obs["predicted_doublet"].to_numpy(dtype=bool)


def stratified_split(labels: pd.Series | None, n: int, test_fraction: float, seed: int) -> np.ndarray:
    """'train'/'test' per cell; each label keeps test_fraction of its cells in test (at least one
    cell on each side for labels with two or more cells)."""
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    codes = np.zeros(n, dtype=int) if labels is None else pd.factorize(labels.astype(str).to_numpy())[0]
    for code in np.unique(codes):
        members = np.flatnonzero(codes == code)
        if len(members) < 2:
            continue
        n_test = min(max(int(round(test_fraction * len(members))), 1), len(members) - 1)
        split[rng.permutation(members)[:n_test]] = "test"
    return split


def run_qc(
    adata: ad.AnnData,
    cfg: dict,
    *,
    cell_type: str | None = None,
    batch: str | None = None,
    seed: int = 0,
) -> QCResult:
    """Filter cells and genes of a raw-count AnnData and split it; nothing in `adata` is changed.

    Filters run in order: metric thresholds, doublets, genes by min_cells. The summary records,
    for each filter, how many cells (or genes) it removes on its own and how many remain after it.
    """
    for key, role in ((cell_type, "cell_type"), (batch, "batch")):
        if key is not None and key not in adata.obs.columns:
            raise UserError(
                f"the dataset's `{role}: {key}` is not an obs column; obs columns are {list(adata.obs.columns)}."
            )
    adata = adata.copy()
    compute_metrics(adata)
    obs = adata.obs

    thresholds = percent_thresholds(cfg)
    if cfg["filter"] == "fixed":
        thresholds = fixed_thresholds(cfg) + thresholds
    else:
        thresholds = mad_thresholds(obs, cfg, batch) + thresholds
    masks = apply_thresholds(obs, thresholds, batch)

    steps = []
    keep = np.ones(adata.n_obs, dtype=bool)
    for name, ok in masks.items():
        keep &= ok
        steps.append({"filter": name, "cells_failing": int((~ok).sum()), "cells_remaining": int(keep.sum())})

    obs["doublet_score"] = np.nan
    obs["predicted_doublet"] = False
    if cfg["doublets"]["enabled"] and keep.sum() > 0:
        sub = adata[keep].copy()
        is_doublet = detect_doublets(sub, cfg["doublets"], batch, seed)
        obs.loc[sub.obs_names, "doublet_score"] = sub.obs["doublet_score"].to_numpy()
        obs.loc[sub.obs_names, "predicted_doublet"] = is_doublet
        keep[np.flatnonzero(keep)[is_doublet]] = False
        steps.append({"filter": "doublets", "cells_failing": int(is_doublet.sum()), "cells_remaining": int(keep.sum())})

    failed = {name: ~ok for name, ok in masks.items()}
    failed["doublets"] = obs["predicted_doublet"].to_numpy(dtype=bool)
    obs["passed_qc"] = keep
    obs["failed_filters"] = [
        ",".join(name for name, bad in failed.items() if bad[i]) for i in range(adata.n_obs)
    ]

    summary = {
        "cells_before": int(adata.n_obs),
        "genes_before": int(adata.n_vars),
        "filter_mode": cfg["filter"],
        "thresholds": [t.__dict__ for t in thresholds],
        "steps": steps,
    }
    if keep.sum() == 0:
        per_filter = "; ".join(f"{s['filter']}: {s['cells_failing']} cells fail" for s in steps)
        raise UserError(
            f"no cells are left after QC ({adata.n_obs} cells in; {per_filter}). Loosen the failing "
            "thresholds in the `qc` section (or the dataset's `qc` overrides) or check that the input holds raw counts."
        )

    filtered = adata[keep].copy()
    gene_cells = np.asarray((filtered.X > 0).sum(axis=0)).ravel()
    keep_genes = gene_cells >= cfg["min_cells"]
    filtered = filtered[:, keep_genes].copy()
    filtered.var["n_cells"] = gene_cells[keep_genes]
    summary["steps"].append(
        {"filter": "min_cells (genes)", "genes_failing": int((~keep_genes).sum()), "genes_remaining": int(keep_genes.sum())}
    )
    if filtered.n_vars == 0:
        raise UserError(
            f"no genes are detected in at least {cfg['min_cells']} of the {filtered.n_obs} cells left after QC; "
            "lower qc.min_cells."
        )

    labels = filtered.obs[cell_type] if cell_type else None
    filtered.obs["split"] = pd.Categorical(
        stratified_split(labels, filtered.n_obs, cfg["test_fraction"], seed), categories=["train", "test"]
    )
    obs["split"] = pd.Series(filtered.obs["split"].astype(str), index=filtered.obs_names).reindex(obs.index)
    summary.update(
        cells_after=int(filtered.n_obs),
        genes_after=int(filtered.n_vars),
        split={k: int(v) for k, v in filtered.obs["split"].value_counts().items()},
    )
    metric_cols = [
        "total_counts", "n_genes_by_counts", "pct_counts_mt", "pct_counts_ribo", "pct_counts_hb",
        "doublet_score", "predicted_doublet", "passed_qc", "failed_filters", "split",
    ]
    for entry in summary["steps"]:
        log.info("QC %s", entry)
    return QCResult(filtered=filtered, metrics=obs[metric_cols].copy(), summary=summary, thresholds=thresholds)
