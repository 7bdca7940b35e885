"""Train a tiny SE model with the real SE pretraining LightningModule (cellfoundry.se.module) through
cellfoundry.trainer.build_trainer/fit, on synthetic cells. Run as a script by tests/test_ddp.py and
tests/test_preemption.py: DDP's launcher re-runs this file for the other ranks, and a killed run
must be a separate process.

    python tests/train_tiny_se.py OUT_DIR --max-steps 40 [--devices 2] [--step-delay 0.2]
        [--checkpoint-every 5] [--settings JSON]

`train(...)` is the same run as a function: tests/test_slurm.py starts it once per rank through
cellfoundry.launch.run_stage (entry point `train_tiny_se:train`).

Writes OUT_DIR/rank{R}.json per rank: world size, the global step at which training started
(0 for a fresh run, the checkpoint's step for a resumed one), the final step and a checksum of
the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch.callbacks import Callback

from cellfoundry.models.se import SEConfig
from cellfoundry.se.data import PretrainCells, PretrainDataModule
from cellfoundry.se.module import PretrainConfig, SEPretrainModule
from cellfoundry.tokenize import CLS_ID
from cellfoundry.trainer import build_trainer, fit

N_CELLS, N_GENES, LENGTH, TOKEN_DIM = 64, 40, 12, 16


def tiny_cells(seed: int = 0) -> tuple[PretrainCells, torch.Tensor]:
    """Synthetic cells with counts, top-gene tokens and a random gene-embedding table."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, size=(N_CELLS, N_GENES)).astype(np.float32)
    order = np.argsort(-counts, axis=1, kind="stable")[:, : LENGTH - 1]
    gene_ids = np.concatenate([np.full((N_CELLS, 1), CLS_ID), order], axis=1).astype(np.int32)
    values = np.concatenate([np.zeros((N_CELLS, 1)), np.take_along_axis(counts, order, 1)], axis=1).astype(np.float32)
    part = dict(
        gene_ids=gene_ids,
        values=values,
        counts=sp.csr_matrix(counts),
        gene_vocab_ids=np.arange(N_GENES),
        rows=np.arange(N_CELLS),
    )
    table = torch.from_numpy(rng.normal(size=(N_GENES, TOKEN_DIM)).astype(np.float32))
    return PretrainCells([part]), table


def tiny_module(max_steps: int, seed: int = 0) -> tuple[SEPretrainModule, PretrainCells, PretrainConfig]:
    torch.manual_seed(seed)
    cells, table = tiny_cells(seed)
    cfg = SEConfig(
        token_dim=TOKEN_DIM, d_model=16, nhead=2, d_hid=32, nlayers=1, output_dim=8, pad_length=LENGTH, encoding="se"
    )
    train_cfg = PretrainConfig(
        max_steps=max_steps,
        batch_size=8,
        lr=1e-3,
        weight_decay=0.01,
        warmup_steps=2,
        loss="mse",
        P=4,
        N=4,
        S=4,
        dataset_loss_weight=0.1,
        num_workers=0,
        sentence_genes=None,
    )
    module = SEPretrainModule(asdict(cfg), asdict(train_cfg), table, torch.from_numpy(cells.gene_cols))
    return module, cells, train_cfg


def tiny_data(cells: PretrainCells, batch_size: int) -> PretrainDataModule:
    """The tiny cells as the stage's data module (seed 0, no loader workers)."""
    return PretrainDataModule(cells, batch_size, 0, 0, sources=["tiny"], vocab_hash="tiny")


def weights_checksum(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


class Report(Callback):
    """Records where training started and ended; optionally slows steps down so a test can
    signal the run mid-way."""

    def __init__(self, out_dir: Path, step_delay: float):
        self.out_dir, self.step_delay, self.start_step = out_dir, step_delay, None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        print(f"rank {trainer.global_rank}: training starts at step {trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.step_delay:
            time.sleep(self.step_delay)
        print(f"step {trainer.global_step}", flush=True)

    def on_train_end(self, trainer, pl_module):
        record = dict(
            world_size=trainer.world_size,
            rank=trainer.global_rank,
            start_step=self.start_step,
            final_step=trainer.global_step,
            checksum=weights_checksum(pl_module),
        )
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def train(
    out_dir: str | os.PathLike,
    max_steps: int = 20,
    devices: int = 1,
    num_nodes: int = 1,
    step_delay: float = 0.0,
    checkpoint_every: int = 5,
    settings: dict | None = None,
) -> None:
    """One training run (also the entry point that cellfoundry.launch.run_stage starts per rank)."""
    out_dir = Path(out_dir)
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    module, cells, train_cfg = tiny_module(max_steps)
    trainer = build_trainer(
        out_dir,
        max_steps=max_steps,
        devices=devices,
        num_nodes=num_nodes,
        device="cpu",
        checkpoint_every_n_steps=checkpoint_every,
        log_every_n_steps=1,
        callbacks=[Report(out_dir, step_delay)],
        enable_progress_bar=False,
    )
    fit(trainer, module, datamodule=tiny_data(cells, train_cfg.batch_size), out_dir=out_dir, settings=settings)
    print(f"rank {trainer.global_rank} pid {os.getpid()}: done at step {trainer.global_step}", flush=True)


def report_rank(out_dir: str, fail_on_rank: int | None = None) -> None:
    """A trivial entry point for the launcher tests: records this process's SLURM rank variables."""
    rank = int(os.environ["SLURM_PROCID"])
    if rank == fail_on_rank:
        raise RuntimeError(f"rank {rank} fails on purpose")
    keys = (
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_NTASKS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_NTASKS_PER_GPU",
        "SLURM_JOB_ID",
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--settings", type=json.loads, default=None, help="JSON: resume only a run of these settings")
    args = parser.parse_args()
    train(args.out_dir, args.max_steps, args.devices, 1, args.step_delay, args.checkpoint_every, args.settings)


if __name__ == "__main__":
    main()
