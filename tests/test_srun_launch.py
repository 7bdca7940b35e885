"""Training on several GPUs and nodes inside ONE SLURM job (cellfoundry.slurm, cellfoundry.launch):
the resources a training rule asks for, the `srun` step that starts one process per GPU, and the
launcher end to end with stand-in `srun`/`scontrol` commands (the real SLURM run is in
tests/test_slurm.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cellfoundry import slurm
from cellfoundry.launch import entry_name, rank_command, run_stage
from cellfoundry.utils import UserError

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
sys.path.insert(0, str(TESTS))
from train_tiny_se import report_rank, train  # noqa: E402


def test_srun_command_for_two_nodes_of_two_gpus():
    command = slurm.srun_command(2, 2, ["python", "-m", "cellfoundry.launch", "--entry", "m:f"])
    assert command == [
        "srun",
        "--overlap",
        "--nodes=2",
        "--ntasks=4",
        "--ntasks-per-node=2",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        "python",
        "-m",
        "cellfoundry.launch",
        "--entry",
        "m:f",
    ]
    assert slurm.srun_command(4, 1, ["x"])[1:5] == ["--overlap", "--nodes=1", "--ntasks=4", "--ntasks-per-node=4"]


def test_rank_command_re_executes_the_stage_entry_point():
    command = rank_command(entry_name(train), {"out_dir": "t", "max_steps": 3}, log_path="logs/x.log", threads=2)
    assert command[:5] == [sys.executable, "-m", "cellfoundry.launch", "--entry", "train_tiny_se:train"]
    assert json.loads(command[command.index("--kwargs") + 1]) == {"out_dir": "t", "max_steps": 3}
    assert command[-4:] == ["--log", "logs/x.log", "--threads", "2"]
    with pytest.raises(ValueError, match="module-level"):
        entry_name(lambda: None)


def test_own_step_only_inside_a_job_with_several_ranks_not_yet_started():
    job_step = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}  # Snakemake's srun -n1
    assert slurm.needs_own_step(2, 1, job_step) and slurm.needs_own_step(4, 2, job_step)
    assert not slurm.needs_own_step(1, 1, job_step)  # one device: train here
    assert not slurm.needs_own_step(2, 1, {})  # local: Lightning starts its processes itself
    assert not slurm.needs_own_step(2, 1, {**job_step, "SLURM_JOB_NAME": "interactive"})  # Lightning's opt-out
    rank = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "3"}
    assert not slurm.needs_own_step(2, 2, rank)  # already one of the 4 ranks


def test_training_resources_follow_the_trainer_settings():
    keys = dict(trainer_key="se.trainer", resources_key="resources.pretrain_se")
    assert slurm.training_resources({"gpu": 1}, 1, 1, **keys) == {"gpu": 1}
    assert slurm.training_resources({"gpu": 4, "tasks": 4, "gpu_model": "a100", "cpus_per_gpu": 8}, 4, 1, **keys) == {
        "gpu": 4,
        "tasks_per_gpu": 1,
        "nodes": 1,
        "gpu_model": "a100",
        "cpus_per_gpu": 8,
    }
    assert slurm.training_resources({"gpu": 8, "tasks": 8, "nodes": 2, "gpu_model": "h100"}, 4, 2, **keys) == {
        "gres": "gpu:h100:4",
        "tasks_per_gpu": 1,
        "nodes": 2,
    }
    assert slurm.training_resources({"gpu": 0, "tasks": 2}, 2, 1, **keys) == {"tasks": 2, "nodes": 1}
    assert slurm.inference_resources({"gpu": 8, "tasks": 8, "nodes": 2, "gpu_model": "h100"}) == {
        "gpu": 1,
        "gpu_model": "h100",
    }


def test_inconsistent_resources_name_the_keys_to_fix():
    keys = dict(trainer_key="xpressor.trainer", resources_key="resources.xpressor")
    with pytest.raises(slurm.ResourceMismatch) as err:
        slurm.training_resources({"gpu": 4, "tasks": None, "nodes": 1}, 4, 2, **keys)
    message = str(err.value)
    for expected in (
        "resources.xpressor.tasks must be 8",
        "resources.xpressor.nodes must be 2",
        "resources.xpressor.gpu must be 8",
        "{gpu: 8, tasks: 8, nodes: 2}",
    ):
        assert expected in message, message
    with pytest.raises(slurm.ResourceMismatch, match="tasks is 4"):
        slurm.training_resources({"gpu": 1, "tasks": 4}, 1, 1, **keys)


class _Resources(dict):
    __getattr__ = dict.__getitem__


@pytest.mark.parametrize(
    "res, devices, num_nodes, expected",
    [
        ({"gpu": 4, "tasks": 4}, 4, 1, ["--gpus=4", "--ntasks-per-gpu=1", "--nodes=1"]),
        (
            {"gpu": 8, "tasks": 8, "nodes": 2, "gpu_model": "h100"},
            4,
            2,
            ["--gres=gpu:h100:4", "--ntasks-per-gpu=1", "--nodes=2"],
        ),
        ({"gpu": 0, "tasks": 2}, 2, 1, ["--ntasks=2", "--nodes=1"]),
    ],
)
def test_the_slurm_plugin_turns_them_into_one_task_per_gpu(res, devices, num_nodes, expected):
    """What snakemake-executor-plugin-slurm submits for these resources (its own functions)."""
    submit_string = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm.utils")
    resources = _Resources(
        mem_mb=1000, runtime=10, **slurm.training_resources(res, devices, num_nodes, trainer_key="t", resources_key="r")
    )
    job = SimpleNamespace(resources=resources, threads=2)
    params = dict(run_uuid="u", slurm_logfile="l", comment_str="c", account="", partition="", workdir="")
    call = submit_string.get_submit_command(job, params) + plugin.set_gres_string(job)
    options = call.split()
    for option in expected:
        assert option in options, call
    assert not any(o.startswith("--ntasks-per-gpu=") and o != "--ntasks-per-gpu=1" for o in options), call


def test_the_new_step_does_not_inherit_the_callers_step_settings():
    env = slurm.step_environment(
        {
            "SLURM_JOB_ID": "9",
            "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_GPU": "1",
            "SLURM_CPUS_PER_TASK": "2",
            "SLURM_CONF": "/etc/slurm/slurm.conf",
            "SRUN_CPUS_PER_TASK": "2",
            "PATH": "/bin",
        }
    )
    assert env == {"SLURM_JOB_ID": "9", "SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin"}


def test_run_stage_outside_slurm_calls_the_entry_here(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    calls = []
    run_stage(lambda **kw: calls.append(kw), {"a": 1}, trainer={"devices": 2, "num_nodes": 1})
    assert calls == [{"a": 1}]


FAKE_SRUN = """#!{python}
# Stand-in for srun: records its options and starts the command once per task with the
# variables srun gives each task.
import json, os, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
with open(os.environ["FAKE_SRUN_RECORD"], "w") as f:
    json.dump({{"opts": opts, "inherited": sorted(k for k in os.environ if k.startswith("SLURM_"))}}, f)
n, per = int(opts["ntasks"]), int(opts["ntasks-per-node"])
env = dict(os.environ, SLURM_NTASKS=str(n), SLURM_NTASKS_PER_NODE=str(per), SLURM_NNODES=opts["nodes"],
           SLURM_STEP_ID="1", SLURM_JOB_NAME="python")
rank_env = lambda r: dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % per), SLURM_NODEID=str(r // per))
procs = [subprocess.Popen(args, env=rank_env(r)) for r in range(n)]
sys.exit(max(p.wait() for p in procs))
"""


@pytest.fixture
def fake_slurm_job(tmp_path, monkeypatch):
    """This process as Snakemake's one-task job step of SLURM job 42, with stand-in srun/scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\necho "JobId=42 NumNodes=${FAKE_NODES:-1} NumCPUs=${FAKE_CPUS:-2} NumTasks=2"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), str(TESTS)]))
    monkeypatch.setenv("FAKE_SRUN_RECORD", str(tmp_path / "srun.json"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key, value in {
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_JOB_NAME": "snakejob",
        "SLURM_NTASKS_PER_GPU": "1",
        "SLURM_CPUS_PER_TASK": "2",
    }.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_run_stage_in_a_slurm_job_starts_one_process_per_rank(fake_slurm_job, caplog):
    caplog.set_level(logging.INFO, logger="cellfoundry")
    out, log = fake_slurm_job / "out", fake_slurm_job / "train.log"
    out.mkdir()
    run_stage(
        report_rank,
        {"out_dir": str(out)},
        trainer={"devices": 2, "num_nodes": 1},
        log_path=log,
        threads=1,
        trainer_key="se.trainer",
        resources_key="resources.pretrain_se",
    )
    srun = json.loads((fake_slurm_job / "srun.json").read_text())
    assert srun["opts"] == {
        "overlap": "",
        "nodes": "1",
        "ntasks": "2",
        "ntasks-per-node": "2",
        "kill-on-bad-exit": "1",
        "export": "ALL",
    }
    assert srun["inherited"] == ["SLURM_JOB_ID"]  # the caller's step settings are not passed on
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["SLURM_PROCID"], r["SLURM_LOCALID"], r["SLURM_NTASKS"]) for r in ranks] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]
    assert all(r["SLURM_NTASKS_PER_GPU"] is None for r in ranks)
    assert "starting 2 DDP processes (2 per node on 1 node(s)) in a new step of SLURM job 42: " in caplog.text
    assert "/srun --overlap --nodes=1 --ntasks=2 --ntasks-per-node=2" in caplog.text
    text = log.read_text()  # the ranks log to the rule's log
    assert "DDP rank 0/2 started" in text and "DDP rank 1/2 started" in text


def test_a_failing_rank_fails_the_rule_with_its_traceback_in_the_log(fake_slurm_job, caplog):
    log = fake_slurm_job / "train.log"
    with pytest.raises(SystemExit) as ended:
        run_stage(
            report_rank,
            {"out_dir": str(fake_slurm_job), "fail_on_rank": 1},
            trainer={"devices": 2, "num_nodes": 1},
            log_path=log,
        )
    assert ended.value.code == 1
    assert "rank 1 failed" in log.read_text() and "RuntimeError: rank 1 fails on purpose" in log.read_text()
    assert "the 2 DDP processes of train_tiny_se:report_rank ended with status 1" in caplog.text


def test_a_job_without_room_for_the_ranks_is_a_user_error(fake_slurm_job, monkeypatch):
    monkeypatch.setenv("FAKE_NODES", "1")
    monkeypatch.setenv("FAKE_CPUS", "2")
    with pytest.raises(
        UserError,
        match=r"job has 1 node.*num_nodes=2.*job has 2 CPU.*resources.diffusion: \{gpu: 4, tasks: 4, nodes: 2\}",
    ):
        run_stage(
            report_rank,
            {"out_dir": "x"},
            trainer={"devices": 2, "num_nodes": 2},
            trainer_key="diffusion.trainer",
            resources_key="resources.diffusion",
        )
    assert not (fake_slurm_job / "srun.json").exists()
