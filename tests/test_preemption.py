"""Interrupted training resumes: a run of the real SE pretraining module is stopped mid-way by
SIGTERM / SIGUSR1 (SLURM time limit, preemption, `sbatch --signal`) or killed outright after a
periodic checkpoint, and the re-run continues from the saved step instead of step 0."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import BatchSampler

import cellfoundry.trainer as train_module
from cellfoundry.resumable import ResumableSampler
from cellfoundry.trainer import (
    SETTINGS_FILE,
    AtomicCheckpointIO,
    read_metrics,
    resume_path,
    settings_fingerprint,
)

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from train_tiny_se import tiny_data, tiny_module, train  # noqa: E402

MAX_STEPS = 20
CHECKPOINT_EVERY = 5


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _command(out_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(TESTS / "train_tiny_se.py"),
        str(out_dir),
        "--max-steps",
        str(MAX_STEPS),
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
        *extra,
    ]


def interrupt_training(out_dir: Path, signum: int, after_step: int, timeout: float = 180) -> tuple[int, str]:
    """Start a slowed-down run, send `signum` once it printed `step {after_step}` (and a periodic
    checkpoint exists), and return (exit status, output)."""
    log_path = out_dir.parent / f"{out_dir.name}.{signum}.out"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _command(out_dir, "--step-delay", "0.25"), env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True
        )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log_path.read_text()
            if f"step {after_step}\n" in text and (out_dir / "checkpoints" / "last.ckpt").exists():
                break
            if proc.poll() is not None:
                pytest.fail(f"training ended before it could be interrupted:\n{text[-3000:]}")
            time.sleep(0.1)
        else:
            pytest.fail(f"training did not reach step {after_step} in {timeout}s:\n{log_path.read_text()[-3000:]}")
        proc.send_signal(signum)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, log_path.read_text()


def saved_step(out_dir: Path) -> int:
    ckpt = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return int(ckpt["global_step"])


def rerun(out_dir: Path) -> dict:
    proc = subprocess.run(_command(out_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"re-run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out_dir / "rank0.json").read_text())


def assert_same_as_uninterrupted(out: Path, record: dict, reference: Path) -> None:
    """The resumed run in `out` ends with the weights and the loss rows of an uninterrupted run."""
    train(reference, max_steps=MAX_STEPS, checkpoint_every=CHECKPOINT_EVERY)
    assert record["checksum"] == json.loads((reference / "rank0.json").read_text())["checksum"]
    expected = read_metrics(reference)
    assert list(expected["step"]) == list(range(MAX_STEPS))
    pd.testing.assert_frame_equal(read_metrics(out), expected)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_checkpoint_and_the_rerun_continues(tmp_path, signum):
    out = tmp_path / "train"
    status, output = interrupt_training(out, signum, after_step=7)
    # the job must fail (so Snakemake does not take it for finished) with 128 + signal
    assert status == 128 + signum, f"exit status {status}:\n{output[-3000:]}"
    step = saved_step(out)
    # saved at the signal, after the last periodic checkpoint (step 5), before the end
    assert CHECKPOINT_EVERY < step < MAX_STEPS, output[-2000:]
    assert not (out / "rank0.json").exists(), "the interrupted run must not report a finished training"
    # Lightning stops a SIGTERM mostly at the end of the running batch; SIGUSR1 always stops at
    # the start of the next one (CheckpointOnSignal), after Lightning counted that batch as ready
    record = rerun(out)
    assert record["start_step"] == step != 0
    assert record["final_step"] == MAX_STEPS
    assert_same_as_uninterrupted(out, record, tmp_path / "reference")


def test_kill_after_a_checkpoint_resumes_from_it(tmp_path):
    out = tmp_path / "train"
    status, output = interrupt_training(out, signal.SIGKILL, after_step=7)
    assert status == -signal.SIGKILL
    step = saved_step(out)
    assert step >= CHECKPOINT_EVERY and step % CHECKPOINT_EVERY == 0, f"periodic checkpoint at step {step}"
    record = rerun(out)
    assert record["start_step"] == step
    assert record["final_step"] == MAX_STEPS
    assert_same_as_uninterrupted(out, record, tmp_path / "reference")


def test_resume_path_prefers_the_newest_checkpoint(tmp_path):
    assert resume_path(tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resume_path(tmp_path) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # Lightning's SLURM-requeue checkpoint
    hpc.write_bytes(b"x")
    os.utime(last, (time.time() - 60, time.time() - 60))
    assert resume_path(tmp_path) == str(hpc)


def test_resume_only_a_run_of_the_same_settings(tmp_path, caplog):
    """cellfoundry.trainer.fit keys the resume on the stage's settings: unchanged settings continue
    from the checkpoint; changed settings (or a checkpoint without a recorded fingerprint, as
    older runs left) start over from step 0 and the stale checkpoint is removed."""
    out = tmp_path / "train"
    caplog.set_level(logging.INFO, logger="cellfoundry")

    def run(max_steps: int, settings: dict | None, every: int = 2) -> dict:
        train(out, max_steps=max_steps, checkpoint_every=every, settings=settings)
        return json.loads((out / "rank0.json").read_text())

    # a checkpoint of another run (settings None: the identity is the hyperparameters)
    assert run(4, None)["start_step"] == 0 and saved_step(out) == 4
    caplog.clear()
    assert run(6, {"lr": 1e-3})["start_step"] == 0
    assert "training starts over from step 0" in caplog.text
    assert json.loads((out / SETTINGS_FILE).read_text())["fingerprint"] == settings_fingerprint({"lr": 1e-3})
    assert saved_step(out) == 6
    # same settings, more steps: the re-run continues from the checkpoint
    caplog.clear()
    record = run(8, {"lr": 1e-3})
    assert (record["start_step"], record["final_step"]) == (6, 8)
    assert "resuming from" in caplog.text
    # changed settings: step 0, the log names what changed, the step-8 checkpoints are gone
    shutil.copy(out / "checkpoints" / "last.ckpt", out / "hpc_ckpt_1.ckpt")  # as a SLURM requeue leaves
    caplog.clear()
    record = run(3, {"lr": 2e-3}, every=100)
    assert (record["start_step"], record["final_step"]) == (0, 3)
    assert "settings changed" in caplog.text and "(lr)" in caplog.text
    assert not (out / "hpc_ckpt_1.ckpt").exists() and saved_step(out) == 3
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps and max(steps) < 3, f"the earlier runs' rows are still in the CSV log: steps {steps}"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(2)}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 3

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 4}, target)
    # the previous checkpoint is intact and no temporary file is left
    assert torch.load(target, weights_only=True)["global_step"] == 3
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


# -- exact resume: in-process stops at a chosen step ----------------------------------------------
class StopAt(Callback):
    """Ends a run after global step `step`: "signal" sends this process SIGTERM (the run saves
    and exits with 143), "signal-in-validation" sends it after the first batch of the validation
    that follows the step, "crash" raises (only the periodic checkpoints survive, as after SIGKILL)."""

    def __init__(self, step: int, how: str):
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and self.how != "signal-in-validation":
            if self.how == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError(f"crash at step {self.step}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if (
            self.how == "signal-in-validation"
            and trainer.global_step == self.step
            and batch_idx == 0
            and not trainer.sanity_checking
        ):
            os.kill(os.getpid(), signal.SIGTERM)


def interrupted(monkeypatch, step: int, how: str, run: Callable[[], Any]) -> None:
    """`run()` with a StopAt(step, how) in the trainers that cellfoundry.trainer.build_trainer
    makes; asserts that it stopped as a preempted or crashed job does."""
    real = train_module.build_trainer

    def build(*args, callbacks=(), **kwargs):
        return real(*args, callbacks=[*callbacks, StopAt(step, how)], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "build_trainer", build)
        with pytest.raises(RuntimeError if how == "crash" else SystemExit) as stopped:
            run()
    if how != "crash":
        assert stopped.value.code == 128 + signal.SIGTERM


def assert_same_weights(state: dict, reference: dict) -> None:
    assert state.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(state[k], reference[k])]
    assert not differ, f"{len(differ)} of {len(reference)} tensors differ from the uninterrupted run's: {differ[:5]}"


def _tiny_run(out: Path, stop: tuple[int, str] | None = None, monkeypatch=None, every: int = 4):
    """The tiny SE pretraining (8 batches per epoch, 20 steps) through build_trainer/fit."""

    def run():
        torch.manual_seed(123)  # torch's global stream before training must not matter
        module, cells, cfg = tiny_module(MAX_STEPS)
        trainer = train_module.build_trainer(
            out,
            max_steps=MAX_STEPS,
            device="cpu",
            checkpoint_every_n_steps=every,
            log_every_n_steps=1,
            enable_progress_bar=False,
        )
        train_module.fit(
            trainer, module, datamodule=tiny_data(cells, cfg.batch_size), out_dir=out, settings={"run": "tiny"}
        )
        return module

    if stop:
        interrupted(monkeypatch, *stop, run)
    return run()


@pytest.mark.parametrize(
    "stop",
    [(7, "signal"), (8, "signal"), (13, "crash"), (8, "crash")],
    ids=["signal-mid-epoch", "signal-epoch-end", "crash-after-checkpoint", "crash-at-checkpoint-epoch-end"],
)
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, monkeypatch, stop):
    """Weights (torch.equal, every tensor) and the gathered loss log (every step once) of a run
    stopped at `stop` and re-run equal those of an uninterrupted run: the data order and each
    step's random numbers depend only on (seed, step)."""
    reference = _tiny_run(tmp_path / "reference")
    expected = read_metrics(tmp_path / "reference")
    assert list(expected["step"]) == list(range(MAX_STEPS))
    out = tmp_path / "resumed"
    module = _tiny_run(out, stop, monkeypatch)
    assert_same_weights(module.state_dict(), reference.state_dict())
    assert len(list((out / "logs").glob("version_*/metrics.csv"))) == 2  # the first attempt's log survives
    pd.testing.assert_frame_equal(read_metrics(out), expected)


def test_resumable_sampler_order_depends_on_seed_and_step_only():
    def batches(sampler, start, stop):
        """Global batches start..stop-1 as Lightning draws them: per epoch a new iterator, read
        only as far as the epoch's batches (the last partial batch dropped)."""
        batcher, out = BatchSampler(sampler, 4, drop_last=True), []
        while start + len(out) < stop:
            it = iter(batcher)
            out += [
                next(it) for _ in range(min(len(batcher) - (start + len(out)) % len(batcher), stop - start - len(out)))
            ]
        return out

    full = batches(ResumableSampler(10, 4, seed=3, drop_last=True), 0, 7)  # 2 batches per epoch
    assert full[0] + full[1] != list(range(8))  # shuffled
    assert full[:2] != full[2:4]  # a new order each epoch
    for step in (1, 2, 5):
        resumed = ResumableSampler(10, 4, seed=3, drop_last=True)
        resumed.set_step(step)
        assert batches(resumed, step, 7) == full[step:]
    assert batches(ResumableSampler(10, 4, seed=4, drop_last=True), 0, 2) != full[:2]


def test_resumable_sampler_shards_each_epoch_over_ranks(monkeypatch):
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(ResumableSampler, "_ranks", staticmethod(lambda rank=rank: (2, rank)))
        sampler = ResumableSampler(9, 2, seed=0)
        shards.append(list(sampler))
        assert len(sampler) == 5
    # DistributedSampler's split: every item once, plus one again to pad 9 to 2 x 5
    assert sorted(set(shards[0]) | set(shards[1])) == list(range(9)) and len(set(shards[0]) & set(shards[1])) == 1


def test_training_logs_plain_progress_lines_off_a_terminal(tmp_path, caplog):
    """Off a terminal (a log file, a SLURM job) Lightning's bar gives way to trainer.LogProgress:
    its last line carries the rate even when the run is shorter than the 30 s between lines."""
    with caplog.at_level(logging.INFO, logger="cellfoundry"):
        train(tmp_path / "run", max_steps=6, checkpoint_every=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "cellfoundry.trainer"]
    assert lines and lines[-1].startswith("step 6, ") and "steps/s, done in" in lines[-1], lines
