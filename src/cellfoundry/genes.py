"""Gene identifiers: which names a dataset's genes go by, and a user's gene map applied to the raw
counts right after loading (rule qc), so every later stage sees the same genes.

- ``gene_symbols: auto`` picks var_names or a string var column. With a known vocabulary (the SE
  model folder's protein_embeddings.pt) the candidate whose names, after the gene map, are most
  often in the vocabulary wins; without one, the candidate most often found in the gene map's
  first column; without either, the one with the most distinct names that are not Ensembl IDs
  (gene symbols). Ties go to var_names, then to the columns in var order. Every candidate's
  score is logged and written to qc/summary.json.
- ``gene_map``: a two-column tab-separated file, source name -> target name (e.g. a BioMart
  export of mouse gene names and their human orthologs). Read without a header: a header line
  maps no gene of the dataset, so it has no effect. Rows with an empty target (no ortholog) are
  ignored. Several source genes with one target are summed into it; a source gene of the dataset
  with several targets is refused. Genes absent from the map keep their name and counts (they
  still count in QC metrics; the tokenizer drops those not in the vocabulary and coverage.tsv
  says how many matched); a kept gene whose name equals a target is summed into it too.

The result's var holds, for each output gene, the var row of its first source gene and
``gene_map_from``: its source genes joined by ";" ("" for genes not in the map).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .utils import UserError

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)

AUTO = "auto"
MAP_COLUMN = "gene_map_from"
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")  # as in vocab.py (which needs torch; QC has none)


# ---------------------------------------------------------------------------- inputs


class _KeysOnly(pickle.Unpickler):
    """Unpickles a torch.save'd dict without torch: every torch object becomes None (only the
    keys are wanted); any other class is refused, so nothing else can run."""

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" or module.startswith("torch."):
            return lambda *args, **kwargs: None
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a gene-embedding file")

    def persistent_load(self, pid):
        return None


def vocab_symbols(path: str | os.PathLike) -> list[str]:
    """The gene symbols (keys) of a protein_embeddings.pt-style dict, read without torch."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            obj = _KeysOnly(zf.open(pkl)).load()
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError) as exc:
        raise UserError(
            f"cannot read the gene names of {path} ({exc}); expected a torch.save'd dict gene "
            "symbol -> vector (SE protein_embeddings.pt); re-save it with a current torch.save"
        ) from exc
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} does not hold a dict gene symbol -> vector (SE protein_embeddings.pt format)")
    return [str(k) for k in obj]


def read_gene_map(path: str | os.PathLike) -> pd.DataFrame:
    """Unique (source, target) pairs of a two-column TSV; rows with an empty target dropped."""
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"gene map {path} does not exist; fix datasets.<name>.gene_map") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(
            f"cannot read gene map {path} as a tab-separated table ({exc}); "
            "it needs two tab-separated columns: source gene, target gene"
        ) from None
    if table.shape[1] != 2:
        raise UserError(
            f"gene map {path} has {table.shape[1]} tab-separated column(s), expected 2 (source gene, "
            "target gene); export only those two columns (tab-separated)"
        )
    pairs = table.set_axis(["source", "target"], axis=1).fillna("").apply(lambda col: col.str.strip())
    return pairs[(pairs.source != "") & (pairs.target != "")].drop_duplicates().reset_index(drop=True)


# ---------------------------------------------------------------------------- choosing names


def name_candidates(adata: ad.AnnData) -> dict[str, list[str]]:
    """var_names and every string-valued var column, each as a list of names."""
    out = {"var_names": [str(v) for v in adata.var_names]}
    for col in adata.var.columns:
        values = adata.var[col]
        if col != MAP_COLUMN and (
            values.dtype == object or isinstance(values.dtype, (pd.CategoricalDtype, pd.StringDtype))
        ):
            out[str(col)] = values.astype(str).tolist()
    return out


def _translate(names: Sequence[str], lookup: dict[str, str] | None) -> list[str]:
    return list(names) if lookup is None else [lookup.get(n, n) for n in names]


def choose_names(
    candidates: dict[str, list[str]], vocab: Sequence[str] | None = None, pairs: pd.DataFrame | None = None
) -> tuple[str, dict[str, float], str]:
    """(best candidate, score of each candidate, what the score measures); see the module doc."""
    lookup = None if pairs is None else dict(zip(pairs.source, pairs.target))
    if vocab is not None:
        known, measure = set(vocab), "fraction of genes in the vocabulary (after the gene map)"
        score = lambda names: np.mean([n in known for n in _translate(names, lookup)])  # noqa: E731
    elif lookup is not None:
        measure = "fraction of genes in the gene map's first column"
        score = lambda names: np.mean([n in lookup for n in names])  # noqa: E731
    else:
        measure = "fraction of genes with a distinct name that is not an Ensembl ID"
        score = lambda names: len({n for n in names if n and not _ENSEMBL.match(n)}) / len(names)  # noqa: E731
    scores = {name: round(float(score(names)) if names else 0.0, 6) for name, names in candidates.items()}
    best = max(scores, key=scores.get)  # first of equals: var_names, then var order
    return best, scores, measure


# ---------------------------------------------------------------------------- mapping


def apply_gene_map(adata: ad.AnnData, pairs: pd.DataFrame) -> tuple[ad.AnnData, dict[str, Any]]:
    """The counts over target names: source genes with one target summed into it (sparse),
    genes not in the map kept. Refuses a dataset gene with several targets."""
    names = pd.Index(adata.var_names.astype(str))
    present = pairs[pairs.source.isin(names)]
    ambiguous = present[present.source.duplicated(keep=False)].groupby("source", sort=False).target.agg(list)
    if len(ambiguous):
        shown = "; ".join(f"{src} -> {', '.join(t)}" for src, t in ambiguous.head(5).items())
        raise UserError(
            f"the gene map maps {len(ambiguous)} gene(s) of the dataset to several genes ({shown}"
            f"{'; ...' if len(ambiguous) > 5 else ''}); counts cannot be split between targets: keep one "
            "target per source gene (e.g. only one-to-one orthologs) in the map"
        )
    lookup = dict(zip(present.source, present.target))
    in_map = names.isin(present.source)
    # output genes in the order of their first source gene; column = output gene of each gene
    column, out_names = pd.factorize(np.array([lookup.get(n, n) for n in names], dtype=object))
    first = np.unique(column, return_index=True)[1]
    M = sp.csr_matrix(
        (np.ones(len(names), dtype=np.float32), (np.arange(len(names)), column)), shape=(len(names), len(out_names))
    )
    X = sp.csr_matrix(adata.X @ M, dtype=np.float32)  # exact: integer counts far below 2**24 per entry
    X.sort_indices()
    var = adata.var.iloc[first].copy()
    var.index = pd.Index(out_names, dtype=str)
    sources: list[list[str]] = [[] for _ in range(len(out_names))]
    for name, out in zip(names[in_map], column[in_map]):  # a plain loop: pandas' groupby-join is 100x slower
        sources[out].append(name)
    var[MAP_COLUMN] = [";".join(s) for s in sources]
    summary = {
        "genes_in": int(len(names)),
        "genes_in_map": int(in_map.sum()),
        "genes_not_in_map": int((~in_map).sum()),
        "genes_out": int(len(out_names)),
        "genes_out_from_map": int((var[MAP_COLUMN] != "").sum()),
        "genes_summed_away": int(len(names) - len(out_names)),
    }
    return type(adata)(X=X, obs=adata.obs.copy(), var=var), summary


def _set_names(adata: ad.AnnData, names: Sequence[str]) -> None:
    adata.var_names = pd.Index(names, dtype=str)
    if adata.var_names.has_duplicates:
        dups = adata.var_names[adata.var_names.duplicated()].unique()
        log.warning(
            "%d gene names occur more than once (e.g. %s); made unique by appending -1, -2, ...",
            len(dups),
            ", ".join(dups[:5]),
        )
        adata.var_names_make_unique()


def prepare_genes(
    adata: ad.AnnData,
    gene_symbols: str | None,
    gene_map: str | os.PathLike | None = None,
    vocab: str | os.PathLike | None = None,
) -> tuple[ad.AnnData, dict[str, Any]]:
    """Apply `gene_symbols: auto` (load_counts has applied a named column already) and the gene
    map to freshly loaded counts; returns the counts and a summary for qc/summary.json."""
    pairs = read_gene_map(gene_map) if gene_map else None
    summary: dict[str, Any] = {
        "gene_symbols": gene_symbols,
        "names": gene_symbols or "var_names",
        "gene_map": str(gene_map) if gene_map else None,
    }
    if gene_symbols == AUTO:
        symbols = vocab_symbols(vocab) if vocab else None
        best, scores, measure = choose_names(name_candidates(adata), symbols, pairs)
        log.info(
            "gene_symbols auto (%s): %s -> %s",
            measure,
            ", ".join(f"{name} {s:.1%}" for name, s in scores.items()),
            best,
        )
        summary.update(names=best, auto_scores=scores, auto_measure=measure)
        if best != "var_names":
            _set_names(adata, adata.var[best].astype(str).tolist())
    if pairs is not None:
        adata, counts = apply_gene_map(adata, pairs)
        summary.update(counts)
        log.info(
            "gene map %s: %d of %d genes in the map -> %d genes from the map; %d genes not in the map kept; "
            "%d genes summed into others",
            gene_map,
            counts["genes_in_map"],
            counts["genes_in"],
            counts["genes_out_from_map"],
            counts["genes_not_in_map"],
            counts["genes_summed_away"],
        )
    return adata, summary


def mapped_genes(path: str | os.PathLike) -> np.ndarray | None:
    """Which genes of an h5ad came from the gene map (var column gene_map_from), None without one."""
    import anndata as ad
    import h5py

    with h5py.File(path, "r") as f:
        var = f["var"]
        if not isinstance(var, h5py.Group) or MAP_COLUMN not in var:
            return None
        values = ad.io.read_elem(var[MAP_COLUMN])
    return np.asarray(pd.Series(values).astype(str) != "")
