"""Reading upstream outputs for evaluation, with messages that say which stage to (re-)run,
and writing the stage's long-format tables."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cellfoundry.utils import UserError, atomic_output


def require(path: str | os.PathLike, producer: str) -> Path:
    """`path` as a Path; UserError naming the rule that makes it when it is missing."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path} is missing; it is made by rule {producer}: run `snakemake {path}` (or --forcerun {producer})."
        )
    return path


def read_h5ad(path: str | os.PathLike, producer: str, layers: bool = True):
    """Read an AnnData written by `producer` (without its layers: `layers` False, e.g. the dense
    mean counts of samples.h5ad); UserError when missing or unreadable."""
    import anndata as ad

    path = require(path, producer)
    try:
        if layers:
            return ad.read_h5ad(path)
        import h5py
        from anndata.io import read_elem

        with h5py.File(path, "r") as f:
            return ad.AnnData(**{key: read_elem(f[key]) for key in ("X", "obs", "var", "uns") if key in f})
    except Exception as exc:  # any failure: turned into an actionable message
        raise UserError(
            f"cannot read {path} as .h5ad ({exc}); re-run rule {producer} (snakemake --forcerun {producer})."
        ) from exc


def read_embedding(path: str | os.PathLike, key: str, obs_names, producer: str) -> np.ndarray:
    """obsm[`key`] of the embedding file at `path`, checked to hold the QC'd cells in order.

    Returns float32 [N, D]."""
    adata = read_h5ad(path, producer)
    if key not in adata.obsm:
        raise UserError(
            f"{path} has no obsm[{key!r}] (it has {sorted(adata.obsm)}); "
            f"re-run rule {producer} (snakemake --forcerun {producer})."
        )
    if adata.n_obs != len(obs_names) or not np.array_equal(adata.obs_names.to_numpy(), np.asarray(obs_names)):
        raise UserError(
            f"{path} holds {adata.n_obs} cells that do not match the {len(obs_names)} cells "
            "of qc/filtered.h5ad in order; "
            f"it is stale: re-run rule {producer} (snakemake --forcerun {producer})."
        )
    X = np.asarray(adata.obsm[key], dtype=np.float32)
    if X.ndim != 2 or not np.isfinite(X).all():
        raise UserError(
            f"{path} obsm[{key!r}] must be a finite 2-D array, got shape {X.shape}; re-run rule {producer}."
        )
    return X


def read_json(path: str | os.PathLike, producer: str) -> dict:
    path = require(path, producer)
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-run rule {producer}.") from exc


def read_table(path: str | os.PathLike, columns: list[str], producer: str) -> pd.DataFrame:
    """A TSV with at least `columns`; UserError otherwise."""
    path = require(path, producer)
    table = pd.read_csv(path, sep="\t")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {missing} (has {list(table.columns)}); re-run rule {producer}.")
    return table


def write_table(rows: list[dict] | pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    """Write the long-format table (one row per method and metric) atomically as TSV."""
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    with atomic_output(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    return table


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=_plain))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value)}")
