"""Progress of long work as plain log lines, the one form that reads well in a rule's log and a
SLURM job's output. Training's counterpart is trainer.LogProgress. No Lightning import here:
the tokenize and QC environments have none."""

from __future__ import annotations

import logging
import time

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
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        # floor, so 100% is only shown once every item is done
        percent = 100 * self.done // max(self.total, 1)
        head = f"{self.verb} {self.done:,} / {self.total:,} {self.unit} ({percent}%), {shown} {self.unit}/s"
        if self.done >= self.total:
            return f"{head}, done in {duration(elapsed)}"
        return f"{head}, ETA {duration((self.total - self.done) / rate) if rate > 0 else '?'}"
