"""Parity of cellfoundry's SE model with the reference implementation (arc-state 0.11.1).

Run in a throwaway environment that has arc-state (not a project dependency), with the
project's src/ on the path, from the repository root:

    python -m venv /tmp/arcvenv && /tmp/arcvenv/bin/pip install torch==2.13.0 arc-state==0.11.1
    PYTHONPATH=src /tmp/arcvenv/bin/python benchmarks/check_reference_parity.py

Checks, fp32 on the CPU, and prints the largest absolute difference of each:
1. arc-state's `state emb transform` path (Inference.encode_adata) on the shared fixture
   reproduces tests/data/se_reference/reference.npy;
2. cellfoundry on the fixture's checkpoint (its tokenizer + model) gives the same embeddings;
3. a checkpoint written by cellfoundry's save_se loads in arc-state, and arc-state's embeddings
   of the fixture cells equal cellfoundry's for that checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from cellfoundry.models.se import SEConfig, StateEmbedding
from cellfoundry.models.se_checkpoint import load_se, save_se
from cellfoundry.tokenize import tokenize_anndata

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "se_reference"
CKPT = REPO / "tests" / "data" / "se_reference.ckpt"
TOL = 1e-5


def arc_embed(ckpt: Path, cells: Path, workdir: Path) -> np.ndarray:
    """Embeddings from arc-state's Inference (the code behind `state emb transform`)."""
    from state.emb.inference import Inference

    protein = torch.load(FIXTURE / "protein_embeddings.pt", weights_only=True)
    inf = Inference(cfg=None, protein_embeds=protein)
    inf.load_model(str(ckpt))
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "arc_out.h5ad"
    return np.asarray(inf.encode_adata(str(cells), str(out), emb_key="X_state", batch_size=4))


def ours(ckpt: Path, cells: Path) -> np.ndarray:
    model, cfg, vocab = load_se(ckpt, gene_embeddings=FIXTURE / "protein_embeddings.pt")
    tokens = tokenize_anndata(ad.read_h5ad(cells), vocab, cfg.pad_length, "se", seed=0)
    with torch.inference_mode():
        return model(
            torch.from_numpy(tokens.gene_ids.astype(np.int64)), torch.from_numpy(tokens.values), vocab.table
        ).numpy()


def main() -> int:
    torch.manual_seed(0)
    reference = np.load(FIXTURE / "reference.npy")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cells = tmp / "cells.h5ad"
        shutil.copy(FIXTURE / "cells.h5ad", cells)

        arc = arc_embed(CKPT, cells, tmp)
        diff = np.abs(arc - reference).max()
        print(f"1. arc-state on the fixture vs reference.npy: max |diff| = {diff:.2e}")
        failures += diff > TOL

        mine = ours(CKPT, cells)
        diff = np.abs(mine - reference).max()
        print(f"2. cellfoundry on the fixture vs reference.npy: max |diff| = {diff:.2e}")
        failures += diff > TOL

        # 3. a cellfoundry-written checkpoint (random weights, fixture sizes) read by arc-state
        _, cfg, vocab = load_se(CKPT, gene_embeddings=FIXTURE / "protein_embeddings.pt")
        own_cfg = SEConfig(**{**cfg.to_dict(), "num_datasets": 1})
        model = StateEmbedding(own_cfg)
        own = tmp / "own.ckpt"
        from cellfoundry.models.se import TrainingHeads

        save_se(
            own,
            model,
            own_cfg,
            training_state=TrainingHeads(own_cfg).state_dict(),
            gene_embeddings=str(FIXTURE / "protein_embeddings.pt"),
            gene_table=vocab.table,
        )
        arc_own = arc_embed(own, cells, tmp / "b")
        mine_own = ours(own, cells)
        diff = np.abs(arc_own - mine_own).max()
        print(f"3. cellfoundry-written checkpoint, arc-state vs cellfoundry: max |diff| = {diff:.2e}")
        failures += diff > TOL
    print("PASS" if not failures else f"FAIL ({failures} check(s) above {TOL})")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
