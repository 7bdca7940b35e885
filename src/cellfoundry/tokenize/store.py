"""The on-disk token format (``tokens/``): gene_ids.npy int32 [N, L], values.npy float32 [N, L],
n_expressed.npy int32 [N] (plain .npy, memory-mappable), attrs.json, coverage.tsv."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry.tokenize.ranking import CLS_ID, PAD_ID
from cellfoundry.utils import UserError
from cellfoundry.vocab import GeneVocab

FORMAT_VERSION = 1
ARRAYS = ("gene_ids", "values", "n_expressed")


@dataclass
class Tokens:
    """Tokens of N cells: gene_ids int32 [N, L], values float32 [N, L], n_expressed int32 [N]
    (memory-mapped when read from disk), attrs (vocab_hash, L, method, seed, source_hash, n_cells)."""

    gene_ids: np.ndarray
    values: np.ndarray
    n_expressed: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.gene_ids.shape[0])

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells [start:stop] as in-memory arrays (a contiguous read of each file)."""
        return (
            np.array(self.gene_ids[start:stop]),
            np.array(self.values[start:stop]),
            np.array(self.n_expressed[start:stop]),
        )


def token_attrs(vocab: GeneVocab, length, method, seed, source_hash, n_cells, target_sum) -> dict[str, Any]:
    """attrs.json of a tokens folder."""
    return {
        "format_version": FORMAT_VERSION,
        "vocab_hash": vocab.hash,
        "vocab_size": len(vocab),
        "L": int(length),
        "method": method,
        "seed": int(seed),
        "target_sum": float(target_sum) if method == "topk" else None,
        "source_hash": source_hash,
        "n_cells": int(n_cells),
        "cls_id": CLS_ID,
        "pad_id": PAD_ID,
    }


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    """A table of rows (dicts with the same keys), tab-separated with a header (coverage.tsv)."""
    keys = list(rows[0])
    lines = ["\t".join(keys)] + ["\t".join(str(r[k]) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def read_tokens(path: str | os.PathLike, vocab_hash: str | None = None, mmap: bool = True) -> Tokens:
    """Open a tokens/ folder (memory-mapped by default, so slicing rows [a:b] reads only them).

    Raises UserError when the folder is incomplete or was built with another vocabulary than
    `vocab_hash` (GeneVocab.hash of the vocabulary the model uses).
    """
    path = Path(path)
    attrs_file = path / "attrs.json"
    if not attrs_file.is_file():
        raise UserError(f"{path} is not a complete tokens folder (no attrs.json); re-run the tokenize rule")
    attrs = json.loads(attrs_file.read_text())
    if vocab_hash is not None and attrs.get("vocab_hash") != vocab_hash:
        raise UserError(
            f"tokens in {path} were built with another gene vocabulary (hash {str(attrs.get('vocab_hash'))[:12]}..., "
            f"the model's is {vocab_hash[:12]}...); re-run the tokenize rule with this model's vocabulary "
            f"(e.g. snakemake --forcerun tokenize)"
        )
    mode = "r" if mmap else None
    arrays = [np.load(path / f"{name}.npy", mmap_mode=mode) for name in ("gene_ids", "values", "n_expressed")]
    n, L = attrs["n_cells"], attrs["L"]
    if arrays[0].shape != (n, L) or arrays[1].shape != (n, L) or arrays[2].shape != (n,):
        raise UserError(f"tokens in {path} do not match their attrs.json (N={n}, L={L}); re-run the tokenize rule")
    return Tokens(*arrays, attrs)
