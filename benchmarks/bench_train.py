"""Training-glue figures: throughput of the SE pretraining module with 1 and 2 DDP processes on
the CPU (gloo), and the cost of a checkpoint (atomic write) for a given model size.

    .venv/bin/python benchmarks/bench_train.py [--steps 60] [--ckpt-params 50_000_000]

Prints one line per measurement. The DDP worker is this file (Lightning's launcher re-runs it
for the second rank), so the measurement runs in subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "tests"))


def worker(out_dir: Path, devices: int, steps: int) -> None:
    from lightning.pytorch.callbacks import Callback
    from train_tiny_se import tiny_data, tiny_module

    from cellfoundry.trainer import build_trainer, fit

    class Clock(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 5:  # skip warm-up steps
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *args):
            if trainer.is_global_zero:
                seconds = time.perf_counter() - self.t0
                (out_dir / "clock.json").write_text(json.dumps({"steps": trainer.global_step - 5, "seconds": seconds}))

    torch.set_num_threads(1)
    module, cells, cfg = tiny_module(steps)
    trainer = build_trainer(
        out_dir,
        max_steps=steps,
        devices=devices,
        device="cpu",
        checkpoint_every_n_steps=10**6,
        callbacks=[Clock()],
        enable_progress_bar=False,
        log_every_n_steps=50,
    )
    fit(trainer, module, datamodule=tiny_data(cells, cfg.batch_size), out_dir=out_dir)


def ddp_throughput(steps: int) -> None:
    for devices in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
            env["OMP_NUM_THREADS"] = "1"
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, str(HERE), "--worker", tmp, "--devices", str(devices), "--steps", str(steps)],
                env=env,
                check=True,
                capture_output=True,
            )
            wall = time.perf_counter() - t0
            clock = json.loads((Path(tmp) / "clock.json").read_text())
            per_step = clock["seconds"] / clock["steps"]
            # each step is one batch of 8 cells per process
            print(
                f"ddp devices={devices}: {1 / per_step:.1f} steps/s, {8 * devices / per_step:.0f} cells/s "
                f"(batch 8 per process), process wall {wall:.1f} s incl. start-up"
            )


def checkpoint_cost(n_params: int) -> None:
    from cellfoundry.trainer import AtomicCheckpointIO

    state = {"state_dict": {"w": torch.randn(n_params)}, "global_step": 1}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.ckpt"
        io = AtomicCheckpointIO()
        io.save_checkpoint(state, path)  # warm the page cache / allocator
        t0 = time.perf_counter()
        for _ in range(3):
            io.save_checkpoint(state, path)
        seconds = (time.perf_counter() - t0) / 3
        size = path.stat().st_size / 2**20
    print(
        f"checkpoint: {n_params / 1e6:.0f} M fp32 params = {size:.0f} MiB written atomically in {seconds:.2f} s "
        f"({size / seconds:.0f} MiB/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ckpt-params", type=int, default=50_000_000)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.devices, args.steps)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    ddp_throughput(args.steps)
    checkpoint_cost(args.ckpt_params)


if __name__ == "__main__":
    main()
