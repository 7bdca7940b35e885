"""Multi-process training: 2 gloo processes on the CPU train the real SE pretraining module
through cellfoundry.trainer.build_trainer (devices=2 -> DDP), and the checkpoint loads.
Also the choice of cluster environment inside SLURM job steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.environments import SLURMEnvironment

from cellfoundry.launch import cluster_environment
from cellfoundry.utils import UserError

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from train_tiny_se import tiny_module, weights_checksum  # noqa: E402

MAX_STEPS = 6


def run_training(out_dir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(TESTS / "train_tiny_se.py"), str(out_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = run_training(out, "--devices", "2", "--max-steps", str(MAX_STEPS), "--checkpoint-every", "3")
    assert proc.returncode == 0, f"2-process DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def test_two_processes_train_in_lockstep(ddp_run):
    records = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["final_step"] == MAX_STEPS and r["start_step"] == 0 for r in records)
    # gradients were all-reduced: both replicas hold the same weights after training
    assert records[0]["checksum"] == records[1]["checksum"]


def test_ddp_checkpoint_loads_into_a_fresh_module(ddp_run):
    ckpt = torch.load(ddp_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    module, _, _ = tiny_module(MAX_STEPS)
    untrained = weights_checksum(module)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    trained = json.loads((ddp_run / "rank0.json").read_text())["checksum"]
    assert weights_checksum(module) == trained != untrained
    assert not list((ddp_run / "checkpoints").glob("*.tmp")), "temporary checkpoint files left behind"


def _slurm_env(monkeypatch, ntasks: int, per_node: int | None = None) -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
    monkeypatch.setenv("SLURM_JOB_NAME", "snakejob")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    if per_node is not None:
        monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(per_node))


def test_cluster_environment_outside_slurm(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert cluster_environment(2, 1) == []


def test_srun_started_ranks_use_lightnings_slurm_environment(monkeypatch):
    _slurm_env(monkeypatch, ntasks=4, per_node=2)
    (env,) = cluster_environment(2, 2)
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue


def test_one_snakemake_task_with_several_gpus_launches_ranks_itself(monkeypatch):
    _slurm_env(monkeypatch, ntasks=1)
    (env,) = cluster_environment(4, 1)
    assert isinstance(env, LightningEnvironment) and not isinstance(env, SLURMEnvironment)
    (single,) = cluster_environment(1, 1)
    assert isinstance(single, SLURMEnvironment)


def test_multi_node_without_srun_tasks_is_a_user_error(monkeypatch):
    _slurm_env(monkeypatch, ntasks=1)
    with pytest.raises(UserError, match="srun"):
        cluster_environment(2, 2)
