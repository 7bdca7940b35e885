"""Reading count matrices: format detection, readers for h5ad / 10x h5 / 10x mtx / zarr, and the
checks that the values really are raw counts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cellfoundry.utils import UserError

log = logging.getLogger(__name__)

FORMATS = ("h5ad", "10x_h5", "10x_mtx", "zarr")
MTX_FILES = ("matrix.mtx.gz", "matrix.mtx")


def detect_format(path: str | os.PathLike) -> str:
    """The input format of `path`, from its name and (for folders) its content."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"input not found: {path}. Check the dataset's `path` in config/config.yaml "
            "(relative paths are taken from the repository root)."
        )
    name = path.name.lower()
    if name.endswith(".zarr") or (path.is_dir() and ((path / ".zattrs").exists() or (path / "zarr.json").exists())):
        return "zarr"
    if path.is_dir():
        if any((path / f).exists() for f in MTX_FILES):
            return "10x_mtx"
        raise UserError(
            f"{path} is a folder but holds neither a 10x Matrix Market matrix (matrix.mtx.gz, "
            "features.tsv.gz, barcodes.tsv.gz) nor an AnnData zarr store. Point `path` at one of those."
        )
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".h5"):
        return "10x_h5"
    raise UserError(
        f"cannot tell the format of {path}: expected .h5ad, a 10x .h5, a 10x Matrix Market folder or "
        f"a .zarr store. Convert the file, or set the dataset's `format` to one of {', '.join(FORMATS)}."
    )


def read_anndata(path: str | os.PathLike, fmt: str = "auto") -> ad.AnnData:
    """Read `path` into memory as AnnData, whatever its supported format."""
    import scanpy as sc

    path = Path(path)
    detected = detect_format(path)
    fmt = detected if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}.")
    try:
        if fmt == "h5ad":
            adata = ad.read_h5ad(path)
        elif fmt == "zarr":
            adata = ad.read_zarr(path)
        elif fmt == "10x_h5":
            adata = sc.read_10x_h5(path)
        else:
            adata = sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=False)
    except UserError:
        raise
    except Exception as exc:  # a reader's own error: say which file and format failed
        raise UserError(
            f"could not read {path} as {fmt}: {exc}. Check that the file is complete and that "
            f"`format` ({fmt}) is right for it."
        ) from exc
    return adata


def _counts_matrix(adata: ad.AnnData, where: str):
    if where == "X":
        return adata.X
    if where == "raw":
        if adata.raw is None:
            raise UserError("`counts: raw` was set but the file has no .raw; use X or a layer name.")
        if adata.raw.n_vars != adata.n_vars:
            raise UserError(
                f"`counts: raw` holds {adata.raw.n_vars} genes but X holds {adata.n_vars}; "
                "cellfoundry needs counts aligned with var. Save raw.to_adata() as its own file."
            )
        return adata.raw.X
    if where not in adata.layers:
        raise UserError(
            f"layer {where!r} named in `counts` does not exist; available layers: "
            f"{sorted(adata.layers) or 'none'} (or use X / raw)."
        )
    return adata.layers[where]


def _values(matrix) -> np.ndarray:
    """The stored values of a dense or sparse matrix (a view where possible)."""
    if sp.issparse(matrix):
        return matrix.data
    return np.asarray(matrix).ravel()


def count_problem(matrix) -> str | None:
    """Why `matrix` is not a raw count matrix (NaN/inf, negative, non-integer), or None."""
    values = _values(matrix)
    if values.size == 0:
        return None
    if not np.isfinite(values).all():
        return f"{int((~np.isfinite(values)).sum())} NaN or infinite values"
    if (values < 0).any():
        return f"{int((values < 0).sum())} negative values"
    nonint = values != np.round(values)
    if nonint.any():
        return f"{int(nonint.sum())} non-integer values (e.g. {values[nonint][0]:.4g}): normalised or log data"
    return None


def _where_counts_live(adata: ad.AnnData, skip: str) -> list[str]:
    places = []
    for name in ["X", "raw", *adata.layers.keys()]:
        if name == skip:
            continue
        try:
            matrix = _counts_matrix(adata, name)
        except UserError:
            continue
        if matrix is not None and count_problem(matrix) is None:
            places.append(name)
    return places


def load_counts(
    path: str | os.PathLike,
    fmt: str = "auto",
    counts: str = "X",
    gene_symbols: str | None = None,
) -> ad.AnnData:
    """Read a dataset and return AnnData with X = raw counts (float32 CSR) and gene symbols as
    unique var_names. Refuses, with the reason and the fix, anything that is not raw counts."""
    adata = read_anndata(path, fmt)
    if adata.n_obs == 0:
        raise UserError(f"{path} holds zero cells; check that it is the right file.")
    if adata.n_vars == 0:
        raise UserError(f"{path} holds zero genes; check that it is the right file.")

    matrix = _counts_matrix(adata, counts)
    problem = count_problem(matrix)
    if problem:
        elsewhere = _where_counts_live(adata, skip=counts)
        hint = (
            f" Raw integer counts seem to be in {', '.join(elsewhere)}: set the dataset's `counts` to {elsewhere[0]!r}."
            if elsewhere
            else " Point `path` at the raw (unnormalised) count matrix, or name the layer holding it in `counts`."
        )
        raise UserError(f"{path} ({counts}) is not a raw count matrix: {problem}.{hint}")

    out = ad.AnnData(
        X=sp.csr_matrix(matrix, dtype=np.float32),
        obs=adata.obs.copy(),
        var=adata.var.copy(),
    )
    out.obs_names = adata.obs_names.astype(str)
    if gene_symbols is not None:
        if gene_symbols not in adata.var.columns:
            raise UserError(
                f"`gene_symbols: {gene_symbols}` is not a var column; var columns are "
                f"{list(adata.var.columns) or 'none'} (null uses var_names)."
            )
        out.var_names = adata.var[gene_symbols].astype(str).to_numpy()
    out.var_names = out.var_names.astype(str)
    if out.var_names.has_duplicates:
        dups = out.var_names[out.var_names.duplicated()].unique()
        log.warning(
            "%d gene names occur more than once (e.g. %s); made unique by appending -1, -2, ... "
            "Such genes will not match the vocabulary under their new names.",
            len(dups),
            ", ".join(dups[:5]),
        )
        out.var_names_make_unique()
    if not out.obs_names.is_unique:
        log.warning("cell barcodes are not unique; made unique by appending -1, -2, ...")
        out.obs_names_make_unique()
    return out
