"""Data sets of many samples: a sample sheet (one count matrix per sample, e.g. one Cell Ranger
output each) read into one AnnData with obs["sample"] and the sheet's metadata columns.

The sheet is a tab-separated file with columns `sample` and `path`, an optional `format`, and any
further columns, which become obs columns of the sample's cells. Relative paths are taken from the
sheet's folder, so a sheet travels with its data. Samples are read one at a time and written as
CSR pieces to a temporary folder, then joined on disk (anndata's concat_on_disk) and read back
once: memory holds one sample plus the joined sparse matrix, never every sample twice or dense.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

from cellfoundry.utils import UserError

log = logging.getLogger(__name__)

REQUIRED = ("sample", "path")
GENE_JOINS = ("intersection", "union")
MTX_PARTS = (
    ("matrix.mtx.gz", "matrix.mtx"),
    ("features.tsv.gz", "genes.tsv.gz", "features.tsv", "genes.tsv"),
    ("barcodes.tsv.gz", "barcodes.tsv"),
)


def read_sheet(sheet: str | os.PathLike) -> pd.DataFrame:
    """The validated sheet: one row per sample, `path` resolved against the sheet's folder."""
    from cellfoundry.io import FORMATS

    sheet = Path(sheet)
    if not sheet.is_file():
        raise UserError(
            f"sample sheet not found: {sheet}. Check the dataset's `samples` (relative to the repository root)."
        )
    table = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    table.columns = table.columns.str.strip()
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise UserError(
            f"sample sheet {sheet} lacks column(s) {missing} (it has {list(table.columns)}); it must be "
            "tab-separated with a header row naming at least `sample` and `path`."
        )
    table = table.apply(lambda col: col.str.strip())
    if table.empty:
        raise UserError(f"sample sheet {sheet} lists no samples; add one row per sample.")
    blank = table.index[(table["sample"] == "") | (table["path"] == "")]
    if len(blank):
        raise UserError(
            f"sample sheet {sheet}: rows {[int(i) + 2 for i in blank]} have an empty `sample` or `path`; fill them in."
        )
    dups = sorted(table["sample"][table["sample"].duplicated()].unique())
    if dups:
        raise UserError(f"sample sheet {sheet}: sample names {dups} occur more than once; give every row its own name.")
    table["path"] = [os.path.normpath(p if os.path.isabs(p) else sheet.parent / p) for p in table["path"]]
    absent = [f"{s} ({p})" for s, p in zip(table["sample"], table["path"]) if not os.path.exists(p)]
    if absent:
        raise UserError(
            f"sample sheet {sheet}: paths of samples {absent} do not exist; relative paths are taken from "
            "the sheet's folder. Fix them in the sheet."
        )
    if "format" not in table.columns:
        table["format"] = ""
    bad = sorted(set(table["format"]) - {"", "auto", *FORMATS})
    if bad:
        raise UserError(
            f"sample sheet {sheet}: unknown format(s) {bad}; use auto, {', '.join(FORMATS)} (or leave it empty)."
        )
    return table


def metadata_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in (*REQUIRED, "format")]


def sheet_inputs(sheet: str | os.PathLike) -> list[str]:
    """The files a data set read from `sheet` depends on: the sheet and every sample's input
    (a 10x Matrix Market folder as its three files, so that a changed file reruns QC)."""
    if not Path(sheet).is_file():
        return [str(sheet)]  # Snakemake then reports the missing sheet as a missing input
    out = [str(sheet)]
    for path in read_sheet(sheet)["path"]:
        parts = (
            [
                next((os.path.join(path, f) for f in names if os.path.exists(os.path.join(path, f))), None)
                for names in MTX_PARTS
            ]
            if os.path.isdir(path)
            else [None]
        )
        out += [p for p in parts if p] if all(parts) else [path]
    return out


def load_samples(
    sheet: str | os.PathLike,
    fmt: str = "auto",
    counts: str = "X",
    gene_symbols: str | None = None,
    gene_join: str = "intersection",
    tmp_dir: str | os.PathLike | None = None,
):
    """Read every sample of `sheet` (load_counts each) into one AnnData of raw counts.

    Cell names become "<sample>_<barcode>"; obs gets `sample` and the sheet's metadata columns
    (categorical, in sheet order). Genes are reconciled by `gene_join`: intersection keeps genes
    every sample has, union fills a sample's absent genes with zero counts. Returns (AnnData,
    summary) where summary records per sample its cells, genes, and genes dropped (intersection)
    or absent (union)."""
    import anndata as ad

    from cellfoundry.io import load_counts

    if gene_join not in GENE_JOINS:
        raise UserError(f"unknown gene_join {gene_join!r}; use one of {', '.join(GENE_JOINS)}.")
    table = read_sheet(sheet)
    meta = metadata_columns(table)
    genes: dict[str, pd.Index] = {}
    cells: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix=".samples-", dir=tmp_dir) as tmp:
        pieces = {}
        for row in table.to_dict("records"):
            name = row["sample"]
            try:
                adata = load_counts(row["path"], row["format"] or fmt, counts, gene_symbols)
            except UserError as exc:
                raise UserError(f"sample {name} of {sheet}: {exc}") from exc
            clash = [c for c in ("sample", *meta) if c in adata.obs.columns]
            if clash:
                log.warning("sample %s: obs columns %s of the input are replaced by the sheet's", name, clash)
            adata.obs_names = name + "_" + adata.obs_names
            adata.obs["sample"] = name
            for col in meta:
                adata.obs[col] = row[col]
            genes[name], cells[name] = adata.var_names.copy(), adata.n_obs
            pieces[name] = Path(tmp) / f"{len(pieces)}.h5ad"
            adata.write_h5ad(pieces[name])
            log.info("sample %s: %d cells x %d genes from %s", name, adata.n_obs, adata.n_vars, row["path"])
            del adata
        joined = Path(tmp) / "joined.h5ad"
        ad.experimental.concat_on_disk(
            list(pieces.values()), joined, join="inner" if gene_join == "intersection" else "outer", merge="first"
        )
        adata = ad.read_h5ad(joined)
    for col in ("sample", *meta):
        adata.obs[col] = pd.Categorical(adata.obs[col].astype(str), categories=pd.unique(table[col]))
    kept = set(adata.var_names)
    per_sample = [
        {
            "sample": s,
            "cells": cells[s],
            "genes": len(g),
            ("genes_dropped" if gene_join == "intersection" else "genes_absent"): len(kept.symmetric_difference(g)),
        }
        for s, g in genes.items()
    ]
    summary = {"sheet": str(sheet), "gene_join": gene_join, "genes": int(adata.n_vars), "per_sample": per_sample}
    changed = [p for p in per_sample if p.get("genes_dropped", p.get("genes_absent"))]
    if changed:
        what = "dropped (not in every sample)" if gene_join == "intersection" else "absent (counted as zero)"
        log.warning(
            "samples' gene sets differ: gene_join %s keeps %d genes; genes %s per sample: %s",
            gene_join,
            adata.n_vars,
            what,
            ", ".join(f"{p['sample']} {p.get('genes_dropped', p.get('genes_absent'))}" for p in changed),
        )
    log.info("read %d samples: %d cells x %d genes", len(pieces), adata.n_obs, adata.n_vars)
    return adata, summary
