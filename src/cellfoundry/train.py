"""Lightning glue shared by every training stage: one Trainer recipe with checkpoints, resume,
CSV logs, DDP and SLURM preemption handling. Stage-specific code lives in the stage's module."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def in_slurm_job() -> bool:
    """True inside a SLURM job step that Lightning can treat as its cluster environment."""
    return SLURMEnvironment.detect()


def build_trainer(
    out_dir: str | os.PathLike,
    *,
    max_epochs: int | None = None,
    max_steps: int = -1,
    devices: int = 1,
    num_nodes: int = 1,
    device: str = "auto",
    checkpoint_every_n_steps: int | None = 50,
    gradient_clip_val: float | None = None,
    log_every_n_steps: int = 10,
    callbacks: Iterable[Callback] = (),
    val_check_interval: Any = None,
    enable_progress_bar: bool = True,
) -> pl.Trainer:
    """A Trainer that writes checkpoints to `out_dir/checkpoints` (last.ckpt always kept) and
    CSV logs to `out_dir/logs`.

    `device` is the config's `auto|cpu|cuda`: bf16 mixed precision on CUDA, fp32 on CPU.
    More than one device or node selects DDP (gloo on CPU, NCCL on CUDA). Inside a SLURM job,
    Lightning's SLURM environment requeues the job on SIGUSR1 after saving a checkpoint.
    """
    out_dir = Path(out_dir)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    accelerator = "gpu" if use_cuda else "cpu"
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        save_last=True,
        save_top_k=0 if checkpoint_every_n_steps else 1,
        every_n_train_steps=checkpoint_every_n_steps,
    )
    plugins = [SLURMEnvironment(auto_requeue=True)] if in_slurm_job() else None
    strategy = "ddp" if devices * num_nodes > 1 else "auto"
    return pl.Trainer(
        default_root_dir=out_dir,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision="bf16-mixed" if use_cuda else "32-true",
        max_epochs=max_epochs,
        max_steps=max_steps,
        gradient_clip_val=gradient_clip_val,
        callbacks=[checkpoint, *callbacks],
        logger=CSVLogger(out_dir, name="logs", version=0),
        log_every_n_steps=log_every_n_steps,
        val_check_interval=val_check_interval,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=True,
        deterministic=not use_cuda,
        plugins=plugins,
    )


def resume_path(out_dir: str | os.PathLike) -> str | None:
    """`out_dir/checkpoints/last.ckpt` when an earlier (interrupted) run left one, else None."""
    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("resuming from %s", last)
        return str(last)
    return None


def fit(trainer: pl.Trainer, module: pl.LightningModule, *loaders: Any, out_dir: str | os.PathLike) -> None:
    """trainer.fit that continues from the last checkpoint of an interrupted run."""
    trainer.fit(module, *loaders, ckpt_path=resume_path(out_dir))
