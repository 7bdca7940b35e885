"""QC figures: metric distributions before and after filtering (thresholds drawn), and total
counts against detected genes coloured by mitochondrial fraction."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellfoundry.qc import Threshold  # noqa: E402

PANELS = [
    ("total_counts", "total counts per cell", True),
    ("n_genes_by_counts", "detected genes per cell", True),
    ("pct_counts_mt", "% counts mitochondrial", False),
    ("pct_counts_ribo", "% counts ribosomal", False),
    ("pct_counts_hb", "% counts haemoglobin", False),
    ("doublet_score", "scrublet doublet score", False),
]


def _log_transform(metric: str, values: np.ndarray, log_scale: bool) -> np.ndarray:
    return np.log10(np.maximum(values, 1)) if log_scale else values


def plot_distributions(metrics: pd.DataFrame, thresholds: list[Threshold], path, title: str = "") -> None:
    """Histograms of each metric for all cells and for the kept cells, thresholds as lines."""
    panels = [p for p in PANELS if p[0] in metrics and metrics[p[0]].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    kept = metrics["passed_qc"].to_numpy(dtype=bool)
    for ax, (metric, label, log_scale) in zip(axes[0], panels):
        values = metrics[metric].to_numpy(dtype=float)
        finite = np.isfinite(values)
        x = _log_transform(metric, values, log_scale)
        bins = np.histogram_bin_edges(x[finite], bins=40)
        ax.hist(x[finite], bins=bins, color="0.75", label=f"before ({finite.sum()})")
        ax.hist(x[finite & kept], bins=bins, color="tab:blue", alpha=0.7, label=f"after ({(finite & kept).sum()})")
        for t in thresholds:
            if t.metric.replace("log1p_", "") != metric:
                continue
            for bound in (t.lower, t.upper):
                if bound is None:
                    continue
                # MAD windows on log1p metrics are drawn on the panel's log10 axis.
                value = np.expm1(bound) if t.metric.startswith("log1p_") else bound
                ax.axvline(_log_transform(metric, np.array([value]), log_scale)[0], color="tab:red", ls="--", lw=1)
        ax.set_xlabel(f"log10 {label}" if log_scale else label)
        ax.set_ylabel("cells")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_counts_vs_genes(metrics: pd.DataFrame, path, title: str = "") -> None:
    """Total counts vs detected genes per cell, coloured by % mitochondrial; removed cells as x."""
    kept = metrics["passed_qc"].to_numpy(dtype=bool)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    vmax = max(float(metrics["pct_counts_mt"].max()), 1e-6)
    kw = dict(c=None, cmap="viridis", vmin=0, vmax=vmax)
    for mask, marker, label in ((kept, "o", "kept"), (~kept, "x", "removed")):
        if mask.any():
            kw["c"] = metrics.loc[mask, "pct_counts_mt"]
            points = ax.scatter(
                metrics.loc[mask, "total_counts"], metrics.loc[mask, "n_genes_by_counts"],
                s=8, marker=marker, label=f"{label} ({mask.sum()})", **kw,
            )
    fig.colorbar(points, ax=ax, label="% counts mitochondrial")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total counts")
    ax.set_ylabel("detected genes")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
