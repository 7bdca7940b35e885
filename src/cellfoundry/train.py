"""Lightning glue shared by every training stage: one Trainer recipe with checkpoints, resume,
CSV logs, DDP and SLURM preemption handling. Stage-specific code lives in the stage's module.

Interruption and resume (why this module holds more than a Trainer call):

- Checkpoints are written to a temporary name and renamed, so a job killed while saving
  (SIGKILL at a time limit) never leaves a truncated `last.ckpt` for the re-run to choke on.
- SIGTERM (SLURM time limit or preemption, `scancel`, Snakemake stopping) and SIGUSR1
  (`sbatch --signal=USR1@90`) make the run save `last.ckpt` after the current batch and exit
  with status 128 + signal. Lightning on its own stops on SIGTERM without saving.
- `fit` resumes from the newest checkpoint an interrupted run left (`last.ckpt`, or Lightning's
  `hpc_ckpt_*.ckpt` from a SLURM auto-requeue).

Distributed training: `devices * num_nodes > 1` selects DDP. Processes started by `srun` with
one task per device (SLURM_NTASKS == devices * num_nodes) use Lightning's SLURM environment
(multi-node, auto-requeue on SIGUSR1). A single process (a Snakemake job step, or a local run)
with several devices on one node lets Lightning start the other processes itself.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cellfoundry.utils import UserError

log = logging.getLogger(__name__)


def in_slurm_job() -> bool:
    """True inside a SLURM job step that Lightning can treat as its cluster environment."""
    return SLURMEnvironment.detect()


def cluster_environment(devices: int, num_nodes: int) -> list:
    """The cluster-environment plugin for `devices` x `num_nodes` processes (see module doc).

    Raises UserError for multi-node training in a process that srun did not start once per device.
    """
    world = devices * num_nodes
    if not in_slurm_job():
        return []  # local run: Lightning picks its own environment
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if slurm_tasks == world:
        # srun started every rank (or a single device): Lightning's SLURM support, with requeue
        return [SLURMEnvironment(auto_requeue=True)]
    if num_nodes == 1 and slurm_tasks == 1:
        # one task (Snakemake's job step) holding several GPUs: Lightning launches the ranks
        return [LightningEnvironment()]
    raise UserError(
        f"training asks for devices={devices} x num_nodes={num_nodes} = {world} processes but this SLURM "
        f"step has {slurm_tasks} task(s); multi-node DDP needs one srun task per GPU. Use a single node "
        "(trainer.num_nodes: 1, trainer.devices = resources.<rule>.gpu) or start the training with "
        f"`srun --ntasks-per-node={devices} --nodes={num_nodes}`."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, then rename: never a half-written ckpt."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class CheckpointOnSignal(Callback):
    """Saves `path` when the run stops after the batch during which SIGTERM or SIGUSR1 arrived.

    SIGTERM: Lightning's own handler stops the loop (SIGTERMException, broadcast to all ranks)
    without saving; this callback saves in on_exception. SIGUSR1 gets a handler here unless
    Lightning's SLURM auto-requeue owns it, and stops the loop the same way (ranks agree first).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.signum: int | None = None
        self._previous_usr1: Any = None

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        owned_by_lightning = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if not owned_by_lightning and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            try:
                self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)
            except ValueError:  # not the main thread: leave signals alone
                self._previous_usr1 = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        # Lightning raises SIGTERMException on every rank at the same point (after a batch), so
        # the collective save cannot deadlock; other exceptions are errors and are not saved.
        if isinstance(exception, SIGTERMException):
            if self.signum is None:
                self.signum = signal.SIGTERM
            trainer.save_checkpoint(self.path)
            log.warning("signal %d: saved %s at step %d; a re-run resumes from it", self.signum, self.path, trainer.global_step)

    def _restore(self) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        local = self.signum is not None
        stop = trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local
        if stop:
            self.signum = self.signum or signal.SIGUSR1
            raise SIGTERMException()  # Lightning's own stop path; on_exception saves


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
    Lightning's SLURM environment requeues the job on SIGUSR1 after saving a checkpoint; otherwise
    SIGUSR1 and SIGTERM save `last.ckpt` and end the run (see the module doc).
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
    plugins = [*cluster_environment(devices, num_nodes), AtomicCheckpointIO()]
    # Stage modules hold heads that not every step uses (e.g. SE's dataset head with one
    # dataset), which plain DDP rejects; finding unused parameters costs one graph walk per step.
    strategy = DDPStrategy(find_unused_parameters=True) if devices * num_nodes > 1 else "auto"
    on_signal = CheckpointOnSignal(out_dir / "checkpoints" / "last.ckpt")
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
        callbacks=[checkpoint, on_signal, *callbacks],
        logger=CSVLogger(out_dir, name="logs", version=0),
        log_every_n_steps=log_every_n_steps,
        val_check_interval=val_check_interval,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=True,
        deterministic=not use_cuda,
        plugins=plugins,
    )


def resume_path(out_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint an earlier (interrupted) run left: `out_dir/checkpoints/last.ckpt`
    or Lightning's SLURM-requeue `out_dir/hpc_ckpt_*.ckpt`; None when there is none."""
    out_dir = Path(out_dir)
    candidates = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("resuming from %s", newest)
    return str(newest)


def fit(trainer: pl.Trainer, module: pl.LightningModule, *loaders: Any, out_dir: str | os.PathLike) -> None:
    """trainer.fit that continues from the last checkpoint of an interrupted run.

    A run stopped by SIGTERM/SIGUSR1 exits with status 128 + signal after saving its checkpoint,
    so the job fails (Snakemake retries or a re-run resumes) instead of looking finished."""
    try:
        trainer.fit(module, *loaders, ckpt_path=resume_path(out_dir))
    except SIGTERMException:
        signum = next((cb.signum for cb in trainer.callbacks if isinstance(cb, CheckpointOnSignal) and cb.signum), None)
        signum = signum or signal.SIGTERM
        log.warning("training stopped by signal %d at step %d; re-run to resume", signum, trainer.global_step)
        raise SystemExit(128 + int(signum)) from None
