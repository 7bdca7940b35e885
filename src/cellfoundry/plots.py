"""The plotting module (matplotlib, headless): every stage's figures. Each function writes one
PNG atomically.

Functions take plain arrays so any stage can use them; none reads the Snakemake object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # rules run without a display

import matplotlib.pyplot as plt
import numpy as np

from cellfoundry.utils import atomic_output

if TYPE_CHECKING:
    import pandas as pd

    from cellfoundry.qc import Threshold

# Categorical palettes: tab20 covers most label sets; larger sets cycle through it.
_PALETTE = plt.get_cmap("tab20").colors


def umap_coordinates(X: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP of `X` [N, D] -> [N, 2] float32 (deterministic for a given seed on one thread)."""
    import umap

    X = np.asarray(X, dtype=np.float32)
    n_neighbors = max(2, min(n_neighbors, len(X) - 1))
    reducer = umap.UMAP(
        n_neighbors=n_neighbors, random_state=seed, n_jobs=1, init="random" if len(X) < 10 else "spectral"
    )
    return reducer.fit_transform(X).astype(np.float32)


def _category_colors(values: Sequence) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Return (codes [N], category names, colours [n_categories, 3 or 4])."""
    values = np.asarray([str(v) for v in values])
    names, codes = np.unique(values, return_inverse=True)
    colors = np.array([_PALETTE[i % len(_PALETTE)] for i in range(len(names))])
    return codes, list(names), colors


def scatter_panel(
    ax, xy: np.ndarray, values: Sequence, title: str, legend: bool = True, point_size: float | None = None
) -> None:
    """Draw one categorical scatter `xy` [N, 2] coloured by `values` [N] on `ax`."""
    codes, names, colors = _category_colors(values)
    size = point_size or max(1.0, min(20.0, 12000.0 / max(len(xy), 1)))
    order = np.random.default_rng(0).permutation(len(xy))  # no category hidden under another
    ax.scatter(xy[order, 0], xy[order, 1], c=colors[codes[order]], s=size, linewidths=0, rasterized=True)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend and len(names) <= 30:
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=colors[i], label=n, markersize=4) for i, n in enumerate(names)
        ]
        ax.legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def umap_grid(
    path: str | os.PathLike,
    coords: dict[str, np.ndarray],
    colors: dict[str, Sequence],
    title: str | None = None,
) -> None:
    """One row per embedding (keys of `coords`, each [N, 2]), one column per colouring (keys of
    `colors`, each [N] labels shared by all embeddings); saves a PNG at `path`."""
    rows, cols = list(coords), list(colors)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.6 * len(cols), 3.6 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            scatter_panel(axes[i, j], coords[row], colors[col], f"{row} — {col}")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def umap_scatter(
    path: str | os.PathLike, X: np.ndarray, labels: dict[str, Sequence], seed: int = 0, title: str | None = None
) -> np.ndarray:
    """UMAP of `X` [N, D] coloured by each entry of `labels` (name -> [N] values), one panel each.

    Returns the UMAP coordinates [N, 2] so callers can reuse them.
    """
    xy = umap_coordinates(X, seed=seed)
    umap_grid(path, {title or "UMAP": xy}, labels)
    return xy


def save_figure(fig, path: str | os.PathLike, dpi: int = 110, tight: bool = True) -> None:
    """Save `fig` as PNG atomically and close it; `tight` crops it to its content."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight" if tight else None)
    plt.close(fig)


def decoded_vs_observed(
    path: str | os.PathLike,
    predicted: np.ndarray,
    observed: np.ndarray,
    gene_names: Sequence[str],
    genes: Sequence[int],
    gene_r: np.ndarray | None = None,
    title: str | None = None,
) -> None:
    """Per-cell scatter of decoded vs observed expression for each gene index in `genes`
    (predicted/observed [n, G]), plus a last panel of per-gene means over all G genes."""
    genes = list(genes)
    n_panels = len(genes) + 1
    cols = min(4, n_panels)
    rows = int(np.ceil(n_panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[n_panels:]:
        ax.axis("off")
    panels = [(g, observed[:, g], predicted[:, g], gene_names[g]) for g in genes]
    panels.append((None, observed.mean(0), predicted.mean(0), "per-gene mean (all genes)"))
    for ax, (_, x, y, name) in zip(axes.ravel(), panels):
        ax.scatter(x, y, s=6, alpha=0.5, linewidths=0, rasterized=True)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        r = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else float("nan")
        ax.set_title(f"{name}  (r = {r:.2f})", fontsize=8)
        ax.set_xlabel("observed log1p", fontsize=7)
        ax.set_ylabel("decoded log1p", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def metric_bars(
    path: str | os.PathLike,
    table,
    metrics: Sequence[str],
    title: str | None = None,
    lower_is_better: Sequence[str] = (),
) -> None:
    """Grouped bars of a long-format table (columns method, metric, value): one panel per metric,
    one bar per method, in the table's method order."""
    methods = list(dict.fromkeys(table["method"]))
    metrics = [m for m in metrics if m in set(table["metric"])]
    cols = min(4, max(1, len(metrics)))
    rows = int(np.ceil(len(metrics) / cols)) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(metrics) :]:
        ax.axis("off")
    colors = [_PALETTE[2 * i % len(_PALETTE)] for i in range(len(methods))]
    for ax, metric in zip(axes.ravel(), metrics):
        sub = table[table["metric"] == metric].set_index("method")["value"]
        values = [float(sub.get(m, np.nan)) for m in methods]
        ax.bar(range(len(methods)), values, color=colors)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(metric + (" (lower better)" if metric in lower_is_better else ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_prediction(
    path,
    per_combination: Mapping[str, dict],
    gene_names: Sequence[str],
    methods: Sequence[str],
    title: str | None = None,
) -> None:
    """One row per combination, one panel per method: predicted vs real per-gene mean log1p over
    all genes (grey) and the top DE genes (colour; the five first named), titled with the table's
    R2 (split-half: against the other half). `per_combination` is evaluate.prediction's
    per-gene means; `methods` its methods."""
    rows = len(per_combination)
    fig, axes = plt.subplots(rows, len(methods), figsize=(3.1 * len(methods), 3.0 * rows), squeeze=False)
    for row, (label, means) in zip(axes, per_combination.items()):
        real, de = means["real"], means["de"]
        for ax, method in zip(row, methods):
            pred = means[method]
            ax.scatter(real, pred, s=3, c="lightgrey", linewidths=0, rasterized=True)
            ax.scatter(real[de], pred[de], s=6, c="tab:red", linewidths=0)
            for g in de[:5]:
                ax.annotate(str(gene_names[g]), (real[g], pred[g]), fontsize=5)
            hi = float(max(real.max(), pred.max()))
            ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
            r2_all, r2_de = means[f"{method} r2"]
            ax.set_title(f"{method}\nR2 all {r2_all:.2f}, DE {r2_de:.2f}", fontsize=7)
            ax.set_xlabel(f"real mean ({label})", fontsize=6)
            ax.set_ylabel("predicted mean", fontsize=6)
            ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def xpressor_summary(path: str | os.PathLike, metrics, knn: Mapping[str, Mapping[str, float]]) -> None:
    """Xpressor stage figure: bar charts of held-out reconstruction per method and metric (the
    long table `metrics`: method, metric, value) and of kNN label accuracy per label column
    (`knn`: column -> {"xpressor": ..., "se_cls": ...})."""
    shown = ["pearson_mean", "spearman_mean", "mse"]
    fig, axes = plt.subplots(1, len(shown) + (1 if knn else 0), figsize=(3.2 * (len(shown) + 1), 3.2))
    methods = list(dict.fromkeys(metrics["method"]))
    for ax, metric in zip(axes, shown):
        values = [float(metrics[(metrics.method == m) & (metrics.metric == metric)].value.iloc[0]) for m in methods]
        ax.bar(methods, values, color=["C0", "C7", "C8"][: len(methods)])
        ax.set_title(f"held-out {metric}")
    if knn:
        ax = axes[-1]
        cols = list(knn)
        x = np.arange(len(cols))
        ax.bar(x - 0.2, [knn[c]["xpressor"] for c in cols], 0.4, label="X_xpressor")
        ax.bar(x + 0.2, [knn[c]["se_cls"] for c in cols], 0.4, label="SE CLS", color="C7")
        ax.set_xticks(x, cols)
        ax.set_ylim(0, 1)
        ax.set_title("kNN label accuracy (test)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# QC figures: metric distributions before and after filtering (thresholds drawn), and total
# counts against detected genes coloured by mitochondrial fraction.

_QC_PANELS = [
    ("total_counts", "total counts per cell", True),
    ("n_genes_by_counts", "detected genes per cell", True),
    ("pct_counts_mt", "% counts mitochondrial", False),
    ("pct_counts_ribo", "% counts ribosomal", False),
    ("pct_counts_hb", "% counts haemoglobin", False),
    ("doublet_score", "scrublet doublet score", False),
]


def _log_transform(metric: str, values: np.ndarray, log_scale: bool) -> np.ndarray:
    return np.log10(np.maximum(values, 1)) if log_scale else values


def plot_distributions(
    metrics: pd.DataFrame, thresholds: list[Threshold], path: str | os.PathLike, title: str = ""
) -> None:
    """Histograms of each metric for all cells and for the kept cells, thresholds as lines."""
    panels = [p for p in _QC_PANELS if p[0] in metrics and metrics[p[0]].notna().any()]
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
    save_figure(fig, path, tight=False)


def plot_counts_vs_genes(metrics: pd.DataFrame, path: str | os.PathLike, title: str = "") -> None:
    """Total counts vs detected genes per cell, coloured by % mitochondrial; removed cells as x."""
    kept = metrics["passed_qc"].to_numpy(dtype=bool)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    vmax = max(float(metrics["pct_counts_mt"].max()), 1e-6)
    kw = dict(c=None, cmap="viridis", vmin=0, vmax=vmax)
    for mask, marker, label in ((kept, "o", "kept"), (~kept, "x", "removed")):
        if mask.any():
            kw["c"] = metrics.loc[mask, "pct_counts_mt"]
            points = ax.scatter(
                metrics.loc[mask, "total_counts"],
                metrics.loc[mask, "n_genes_by_counts"],
                s=8,
                marker=marker,
                label=f"{label} ({mask.sum()})",
                **kw,
            )
    fig.colorbar(points, ax=ax, label="% counts mitochondrial")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total counts")
    ax.set_ylabel("detected genes")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, tight=False)
