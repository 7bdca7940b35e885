"""Lightning glue shared by every training stage: one Trainer recipe with checkpoints, resume,
CSV logs and preemption handling. Stage-specific code lives in the stage's package; starting one
process per GPU inside a SLURM job is `cellfoundry.launch`.

Interruption and resume (why this module holds more than a Trainer call):

- Checkpoints are written to a temporary name and renamed, so a job killed while saving
  (SIGKILL at a time limit) never leaves a truncated `last.ckpt` for the re-run to choke on.
- SIGTERM (SLURM time limit or preemption, `scancel`, Snakemake stopping) and SIGUSR1
  (`sbatch --signal=USR1@90`) make the run save `last.ckpt` after the current batch and exit
  with status 128 + signal. Lightning on its own stops on SIGTERM without saving.
- `fit` resumes from the newest checkpoint an interrupted run left (`last.ckpt`, or Lightning's
  `hpc_ckpt_*.ckpt` from a SLURM auto-requeue), but only when the run that wrote it had the same
  settings: the module's and the data module's hyperparameters (`resume_identity`), whose
  fingerprint is kept beside the checkpoints (`settings_fingerprint.json`); after a config
  change training starts over from step 0.
- A resumed run continues exactly as the uninterrupted run would (same weights on the CPU): the
  training loader from `resumable_loader` visits an order that depends only on (seed, epoch) and
  restarts at the checkpoint's global step, and every step's random numbers (dropout, task genes,
  noise) come from a torch seed of (seed, step, rank).
- Every attempt writes its own CSV log (`logs/version_<attempt>/metrics.csv`, Lightning's
  CSVLogger empties an existing one); `read_metrics` gathers them, each row once.

Distributed training: `devices * num_nodes > 1` selects DDP. Locally, Lightning starts the other
processes itself; inside a SLURM job `cellfoundry.launch.run_stage` starts one task per GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cellfoundry.launch import cluster_environment
from cellfoundry.progress import duration
from cellfoundry.resumable import ExactResume, ResumableSampler

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


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
    """Saves `path` when the run stops before the batch after the one during which SIGTERM or
    SIGUSR1 arrived.

    SIGTERM: Lightning's own handler stops the loop (SIGTERMException, broadcast to all ranks)
    without saving; this callback saves in on_exception. SIGUSR1 gets a handler here unless
    Lightning's SLURM auto-requeue owns it, and stops the loop the same way (ranks agree first).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.signum: int | None = None
        self._previous_usr1: Any = None
        self._stopped_before_batch = False

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
            loop = trainer.fit_loop
            if not trainer.validating and loop.epoch_progress.current.completed == loop.epoch_progress.current.started:
                # Lightning stopped at the end of an epoch, before the next one reset the batch
                # counters; reset them as that would, or the resumed run takes the finished
                # epoch's batches for part of the next epoch
                loop.epoch_loop.batch_progress.reset_on_run()
            if self._stopped_before_batch:
                # on_train_batch_start stops after Lightning counted the next batch as ready;
                # uncount it, or the resumed run takes the stop for one mid-batch and logs every
                # later step one too high
                batches = loop.epoch_loop.batch_progress
                batches.total.ready -= 1
                batches.current.ready -= 1
                batches.is_last_batch = False
            trainer.save_checkpoint(self.path)
            log.warning(
                "signal %d: saved %s at step %d; a re-run resumes from it", self.signum, self.path, trainer.global_step
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # A checkpoint saved after a training batch whose validation is still to run (periodic
        # checkpoints) or while it runs (SIGTERM): Lightning resumes the first without that
        # validation, the second with the batches it had done counted as done (on the first
        # ones of a fresh loader) and no validation metrics. Record both as Lightning's
        # "restarted mid-evaluation" state with no batch done: the resumed run validates again.
        epoch_loop = trainer.fit_loop.epoch_loop
        train = epoch_loop.batch_progress.total
        if trainer.validating:
            pending = not epoch_loop.val_loop.batch_progress.is_last_batch
        else:  # inside on_train_batch_end: the batch is processed but not completed
            pending = train.processed == train.completed + 1 and epoch_loop._should_check_val_fx(
                trainer.fit_loop._data_fetcher
            )
        state = checkpoint.get("loops", {}).get("fit_loop", {})
        if not pending or "epoch_loop.val_loop.batch_progress" not in state:
            return
        batches, val = state["epoch_loop.batch_progress"], state["epoch_loop.val_loop.batch_progress"]
        for part in ("total", "current"):
            batches[part]["completed"] = batches[part]["processed"]
        before = {k: v - val["current"][k] for k, v in val["total"].items()}  # counts before this validation
        val["total"] = {**before, "ready": before["ready"] + 1, "started": before["started"] + 1}
        val["current"] = {k: 0 for k in val["current"]}
        val["is_last_batch"] = False

    def _restore(self) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Stop between steps: the previous step's loss row is logged by then (a stop in
        # on_train_batch_end would lose it) and nothing of the next step has run. Lightning alone
        # stops a single process on SIGTERM only at the end of the epoch.
        local = self.signum is not None or trainer.received_sigterm
        stop = trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local
        if stop:
            self.signum = self.signum or (signal.SIGTERM if trainer.received_sigterm else signal.SIGUSR1)
            self._stopped_before_batch = True
            raise SIGTERMException()  # Lightning's own stop path; on_exception saves


class LogProgress(Callback):
    """Training progress as a log line every `every_s` seconds, at each validation and at the end:
    "step 1,200 / 10,000 (12%), 8.1 steps/s, ETA 18m06s, train_loss=0.4123",
    "epoch 3, step 480: val_loss=0.3921" and "step 10,000, 8.0 steps/s, done in 20m50s, ..."."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self.start = self.last = 0.0
        self.first_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.last = time.perf_counter()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if time.perf_counter() - self.last >= self.every_s and trainer.global_step != trainer.max_steps:
            self._log_step(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log_step(trainer, done=True)  # every run ends with its rate, however short

    def _log_step(self, trainer, done: bool = False) -> None:
        now = self.last = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rate = (trainer.global_step - self.first_step) / elapsed
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        line = f"step {trainer.global_step:,}"
        if done:
            line += f", {rate:.1f} steps/s, done in {duration(elapsed)}"
        elif total and total != float("inf"):
            total = int(total)
            eta = duration((total - trainer.global_step) / rate) if rate > 0 else "?"
            line += f" / {total:,} ({100 * trainer.global_step // max(total, 1)}%), {rate:.1f} steps/s, ETA {eta}"
        else:
            line += f", {rate:.1f} steps/s"
        losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train") and v.numel() == 1}
        log.info("%s", ", ".join([line, *(f"{k}={v:.4f}" for k, v in sorted(losses.items()))]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val") and v.numel() == 1}
        if metrics:
            log.info(
                "epoch %d, step %d: %s",
                trainer.current_epoch,
                trainer.global_step,
                ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())),
            )


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
    # Lightning's bar redraws with carriage returns, which fill a log file or a SLURM job's
    # output; there, progress is a plain line every 30 s instead
    show_bar = enable_progress_bar and sys.stderr.isatty()
    callbacks = [*callbacks] if show_bar else [*callbacks, LogProgress()]
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
        # version: the attempt, set by fit; every logged row goes to disk at once, so a run killed
        # after a checkpoint keeps the rows of the steps that checkpoint holds
        logger=CSVLogger(out_dir, name="logs", version=0, flush_logs_every_n_steps=1),
        log_every_n_steps=log_every_n_steps,
        val_check_interval=val_check_interval,
        enable_progress_bar=show_bar,
        enable_model_summary=True,
        deterministic=not use_cuda,
        plugins=plugins,
    )


# -- resume only a run of the same settings ------------------------------------------------------
SETTINGS_FILE = "settings_fingerprint.json"


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hex digest of a stage's training settings (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plain(settings: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".") or "settings"]


def _stored_settings(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _checkpoints(out_dir: Path) -> list[Path]:
    return [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.exists()]


def resume_path(out_dir: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> str | None:
    """The newest checkpoint an earlier (interrupted) run left: `out_dir/checkpoints/last.ckpt`
    or Lightning's SLURM-requeue `out_dir/hpc_ckpt_*.ckpt`; None when there is none.

    With `settings`, only a checkpoint of a run with the same settings fingerprint counts (a
    checkpoint without a stored fingerprint counts as another run's)."""
    out_dir = Path(out_dir)
    candidates = _checkpoints(out_dir)
    if not candidates:
        return None
    if settings is not None:
        stored = _stored_settings(out_dir)
        fingerprint = settings_fingerprint(settings)
        if stored.get("fingerprint") != fingerprint:
            changed = _changed_keys(stored.get("settings"), _plain(settings)) if "settings" in stored else []
            if is_global_zero():  # every DDP rank decides the same; one line in the log
                log.warning(
                    "not resuming from %s: the settings changed since it was written (%s); "
                    "training starts over from step 0",
                    out_dir,
                    ", ".join(changed[:12]) if changed else f"no settings fingerprint in {out_dir / SETTINGS_FILE}",
                )
            return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    if is_global_zero():
        log.info("resuming from %s", newest)
    return str(newest)


class _SettingsStamp(Callback):
    """On global rank 0, once every rank has chosen whether to resume (setup runs after the
    process group started): for a fresh run, removes what an earlier run left (checkpoints,
    its rows in the CSV log), then records the settings beside the checkpoints."""

    def __init__(self, out_dir: Path, settings: Mapping[str, Any], fresh: bool):
        self.out_dir, self.settings, self.fresh = out_dir, settings, fresh

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        root = self.out_dir.resolve()
        if self.fresh:
            stale = [*self.out_dir.glob("hpc_ckpt_*.ckpt")]
            stale += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            log_dir = getattr(trainer.logger, "log_dir", None)
            if log_dir:  # the earlier run's CSV logs, one per attempt
                stale.append(Path(log_dir) / "metrics.csv")
                stale += [p for p in Path(log_dir).parent.glob("version_*") if p != Path(log_dir)]
            for path in stale:
                if path.exists() and root in path.resolve().parents:  # never outside the stage's folder
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": settings_fingerprint(self.settings), "settings": _plain(self.settings)}
        tmp = self.out_dir / f".{SETTINGS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.out_dir / SETTINGS_FILE)


def resume_identity(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict:
    """What a resumed run must share with the interrupted one: the module's and the data module's
    hyperparameters (their save_hyperparameters), less the module's RESUMABLE_CHANGES (dotted
    keys of hyperparameters that may change between attempts, such as a step budget)."""
    identity = {"module": _plain(dict(module.hparams)), "data": _plain(dict(datamodule.hparams))}
    for key in getattr(module, "RESUMABLE_CHANGES", ()):
        *parents, last = key.split(".")
        node = identity["module"]
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return identity


def fit(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    *loaders: Any,
    datamodule: pl.LightningDataModule | None = None,
    out_dir: str | os.PathLike,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """trainer.fit that continues from the last checkpoint of an interrupted run, exactly when
    the training loader (the first of `loaders`, or the datamodule's) is a `resumable_loader`.

    `settings` (JSON-able) identify the run; with a `datamodule` they default to
    `resume_identity(module, datamodule)`. A checkpoint is resumed only when it was written with
    the same settings; otherwise training starts over, and what the earlier run left
    (checkpoints, CSV metrics) is removed first. None (and no datamodule) resumes any checkpoint
    and removes nothing.

    A run stopped by SIGTERM/SIGUSR1 exits with status 128 + signal after saving its checkpoint,
    so the job fails (Snakemake retries or a re-run resumes) instead of looking finished."""
    out_dir = Path(out_dir)
    if datamodule is not None and settings is None:
        settings = resume_identity(module, datamodule)
    ckpt_path = resume_path(out_dir, settings)
    if settings is not None:
        trainer.callbacks.insert(
            0, _SettingsStamp(out_dir, settings, fresh=ckpt_path is None)
        )  # before ModelCheckpoint
    if isinstance(trainer.logger, CSVLogger):
        # a CSV log per attempt (CSVLogger empties an existing metrics.csv); read_metrics gathers them
        trainer.logger._version = _attempt(Path(trainer.logger.root_dir)) if ckpt_path else 0
    train_loader = datamodule.train_dataloader() if datamodule is not None else loaders[0] if loaders else None
    sampler = getattr(train_loader, "sampler", None)
    if isinstance(sampler, ResumableSampler):
        trainer.callbacks.insert(0, ExactResume(sampler))
    try:
        with warnings.catch_warnings():
            if isinstance(sampler, ResumableSampler):  # Lightning cannot tell it is resumable
                warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
            trainer.fit(module, *loaders, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        signum = next((cb.signum for cb in trainer.callbacks if isinstance(cb, CheckpointOnSignal) and cb.signum), None)
        signum = signum or signal.SIGTERM
        log.warning("training stopped by signal %d at step %d; re-run to resume", signum, trainer.global_step)
        raise SystemExit(128 + int(signum)) from None


def _versions(log_root: Path) -> list[tuple[int, Path]]:
    """The CSVLogger version folders under `log_root` (one per attempt of a run), in order."""
    found = [(p.name.removeprefix("version_"), p) for p in log_root.glob("version_*")]
    return sorted((int(v), p) for v, p in found if v.isdigit())


def _attempt(log_root: Path) -> int:
    """The next free CSVLogger version under `log_root`."""
    return max((v for v, _ in _versions(log_root)), default=-1) + 1


def read_metrics(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Every attempt's CSV log of the run in `out_dir` (logs/version_*/metrics.csv) as one table
    sorted by step, each row once: a resumed attempt logs again what it re-runs after its
    checkpoint (steps, a validation), so of the rows with the same step and the same metrics the
    first attempt's is kept. An interrupted and resumed run gives the table of an uninterrupted
    one. Empty when nothing was logged."""
    import pandas as pd

    paths = [p / "metrics.csv" for _, p in _versions(Path(out_dir, "logs")) if (p / "metrics.csv").exists()]
    parts = [part for part in map(pd.read_csv, paths) if len(part)]
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    metrics = table.drop(columns=[c for c in ("step", "epoch") if c in table])
    kind = metrics.notna().apply(lambda row: "|".join(metrics.columns[row.to_numpy()]), axis=1)
    table = table[~pd.DataFrame({"step": table["step"], "kind": kind}).duplicated()]
    return table.sort_values("step", kind="stable").reset_index(drop=True)


def is_global_zero() -> bool:
    """True in the process that writes a stage's outputs: global rank 0 of the last DDP run, or
    the only process (Lightning records the rank when its strategy starts)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
