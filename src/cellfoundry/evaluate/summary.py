"""Markdown tables of a dataset's evaluation outputs (the README's demo results).

    python -m cellfoundry.evaluate.summary results/pbmc68k/eval

prints the embedding, reconstruction and generation tables; a model value that a baseline
beats is marked with "▼" so a loss is visible, not tuned away.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

EMBEDDING_METRICS = [
    "knn_accuracy",
    "knn_macro_f1",
    "asw_label",
    "nmi",
    "ari",
    "clisi",
    "isolated_labels",
    "asw_batch",
    "ilisi",
    "kbet_acceptance",
    "graph_connectivity",
    "pcr_comparison",
    "bio_conservation",
    "batch_correction",
    "scib_total",
]
EMBEDDING_MODELS = ("se", "xpressor")
RECONSTRUCTION_METRICS = ["pearson_mean", "spearman_mean", "mse", "gene_pearson_mean", "trainable_fraction"]
GENERATION_METRICS = [
    "w1",
    "w2",
    "mmd_rbf",
    "mmd_linear",
    "energy",
    "knn_auc",
    "r2_mean",
    "r2_var",
    "pearson_mean",
    "label_accuracy",
]
LOWER_IS_BETTER = {"mse", "w1", "w2", "mmd_rbf", "mmd_linear", "energy", "knn_auc"}  # knn_auc: 0.5 is best


def _fmt(value: float) -> str:
    if pd.isna(value):
        return "–"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _table(wide: pd.DataFrame, metrics: list[str], models: tuple[str, ...], baselines: list[str]) -> str:
    metrics = [m for m in metrics if m in wide.columns]
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for method in wide.index:
        cells = []
        for metric in metrics:
            value = wide.loc[method, metric]
            text = _fmt(value)
            if method in models and not pd.isna(value):
                others = wide.loc[[b for b in baselines if b in wide.index], metric].dropna()
                worse = (others < value).any() if metric in LOWER_IS_BETTER else (others > value).any()
                if worse:
                    text += " ▼"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def embedding_table(path: Path) -> str:
    t = pd.read_csv(path, sep="\t")
    wide = t.pivot_table(index="method", columns="metric", values="value", sort=False)
    baselines = [m for m in wide.index if m not in EMBEDDING_MODELS]
    return _table(wide, EMBEDDING_METRICS, EMBEDDING_MODELS, baselines)


def reconstruction_table(path: Path) -> str:
    t = pd.read_csv(path, sep="\t")
    wide = t.pivot_table(index="method", columns="metric", values="value", sort=False)
    return _table(wide, RECONSTRUCTION_METRICS, ("xpressor",), [m for m in wide.index if m != "xpressor"])


def generation_table(path: Path, condition: str = "all") -> str:
    t = pd.read_csv(path, sep="\t")
    t = t[t["condition"] == condition]
    wide = t.pivot_table(index="method", columns="metric", values="value", sort=False)
    # Only the weak generator is a baseline to beat; the floor is the reference for perfection.
    return _table(wide, GENERATION_METRICS, ("diffusion",), [m for m in wide.index if m.startswith("independent")])


def main(argv: list[str] | None = None) -> None:
    eval_dir = Path((argv or sys.argv[1:])[0])
    print("Embeddings\n\n" + embedding_table(eval_dir / "embeddings.tsv") + "\n")
    print("Xpressor reconstruction (held-out cells)\n\n" + reconstruction_table(eval_dir / "reconstruction.tsv") + "\n")
    if (eval_dir / "generation.tsv").exists():
        for condition in ("all", "mean over conditions"):
            print(
                f"Generated cells ({condition})\n\n" + generation_table(eval_dir / "generation.tsv", condition) + "\n"
            )


if __name__ == "__main__":
    main()
