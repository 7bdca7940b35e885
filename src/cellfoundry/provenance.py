"""Which model made this? The record every .h5ad that cellfoundry writes carries in
`uns["cellfoundry"]`: the stage, the package version, the stage's config section, the SHA-256 of
the checkpoint(s) and of the gene vocabulary, and the inputs' paths and sizes.

anndata's uns holds no None and no arbitrary objects, so the record is plain strings and integers
in nested dicts, with the config section as JSON text (`read_provenance` parses it back).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellfoundry import __version__
from cellfoundry.utils import file_sha256

KEY = "cellfoundry"
PathLike = str | os.PathLike


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def sha256(path: PathLike) -> str:
    """SHA-256 of a file, computed once per process while the file is unchanged (an SE-600M
    checkpoint is several GB and one job may record it more than once)."""
    stat = os.stat(path)
    return _cached_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def path_size(path: PathLike) -> int:
    """Bytes of a file, or of every file under a folder (10x mtx folder, .zarr store, tokens/)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def recorded_path(path: PathLike) -> str:
    """A path as the record keeps it: relative to the working directory (the workflow's root) when
    it lies below it, so the same run in another clone writes the same bytes; else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(absolute)


def _check_names(kind: str, items: Mapping[str, Any]) -> dict[str, Any]:
    # the names become HDF5 group names, where "/" would nest groups
    bad = [name for name in items if not name or "/" in name]
    if bad:
        raise ValueError(f"{kind} names must be non-empty and free of '/': {bad}")
    return {name: p for name, p in items.items() if p is not None}


def provenance(
    stage: str,
    config_section: Mapping[str, Any] | None = None,
    *,
    checkpoints: Mapping[str, PathLike | None] | None = None,
    vocab: PathLike | None = None,
    inputs: Mapping[str, PathLike | None] | None = None,
) -> dict[str, Any]:
    """The provenance record of an output of `stage` (h5ad-safe; store it as uns["cellfoundry"]).

    checkpoints and inputs map a role ("se", "xpressor", "cells", ...) to a path; None entries
    are left out. Paths are recorded as `recorded_path` gives them; inputs with their size in bytes, checkpoints and
    the vocabulary with their SHA-256."""
    record: dict[str, Any] = {
        "stage": stage,
        "version": __version__,
        "config": json.dumps(config_section or {}, sort_keys=True, default=str),
        "checkpoints": {
            name: {"path": recorded_path(p), "sha256": sha256(p)}
            for name, p in _check_names("checkpoint", checkpoints or {}).items()
        },
        "inputs": {
            name: {"path": recorded_path(p), "size_bytes": path_size(p)}
            for name, p in _check_names("input", inputs or {}).items()
        },
    }
    if vocab is not None:
        record["vocab"] = {"path": recorded_path(vocab), "sha256": sha256(vocab)}
    return record


def read_provenance(h5ad_path: PathLike) -> dict[str, Any] | None:
    """The provenance record of an .h5ad (config parsed back from JSON), or None without one.
    Reads only uns["cellfoundry"], not X or obsm."""
    import anndata as ad
    import h5py

    with h5py.File(h5ad_path, "r") as f:
        if "uns" not in f or KEY not in f["uns"]:
            return None
        record = ad.io.read_elem(f["uns"][KEY])
    record["config"] = json.loads(record["config"])
    return record
