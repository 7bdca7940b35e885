"""Progress of long work as plain log lines, the one form that reads well in a rule's log and a
SLURM job's output: `Progress` for loops over cells, `LogProgress` for Lightning training (it
replaces Lightning's bar whenever stderr is not a terminal; see train.build_trainer)."""

from __future__ import annotations

import logging
import time

from lightning.pytorch.callbacks import Callback

log = logging.getLogger("cellfoundry")


def duration(seconds: float) -> str:
    """12s, 1m43s, 2h05m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of a whole run, however its items are split into calls: one log line every
    `every_s` seconds and one at the end, e.g.
    "embedded 12,288 / 100,000 cells (12%), 850 cells/s, ETA 1m43s"."""

    def __init__(self, total: int, every_s: float = 30.0, verb: str = "embedded", unit: str = "cells") -> None:
        self.total, self.every_s, self.verb, self.unit, self.done = total, every_s, verb, unit, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.done / elapsed
        # floor, so 100% is only shown once every item is done
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        head = f"{self.verb} {self.done:,} / {self.total:,} {self.unit} ({100 * self.done // max(self.total, 1)}%), {shown} {self.unit}/s"
        if self.done >= self.total:
            return f"{head}, done in {duration(elapsed)}"
        return f"{head}, ETA {duration((self.total - self.done) / rate) if rate > 0 else '?'}"


class LogProgress(Callback):
    """Training progress as a log line every `every_s` seconds and at each validation:
    "step 1,200 / 10,000 (12%), 8.1 steps/s, ETA 18m06s, train_loss=0.4123" and
    "epoch 3: val_loss=0.3921"."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self.start = self.last = 0.0
        self.first_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.last = time.perf_counter()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and trainer.global_step != trainer.max_steps:
            return
        self.last = now
        done = trainer.global_step - self.first_step
        rate = done / max(now - self.start, 1e-9)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        line = f"step {trainer.global_step:,}"
        if total and total != float("inf"):
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
            log.info("epoch %d, step %d: %s", trainer.current_epoch, trainer.global_step,
                     ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
