"""One process per GPU inside a SLURM job, for the training stages.

`devices * num_nodes > 1` selects DDP (`cellfoundry.trainer.build_trainer`). Locally, Lightning
starts the other processes itself. Inside a SLURM job the rule's script is a single task (the
Snakemake executor's `srun -n1`), so `run_stage` starts a new job step with one task per GPU
(`srun --overlap`, see `cellfoundry.slurm`) that runs the stage's entry point once per rank
(`python -m cellfoundry.launch`); each rank uses Lightning's SLURM environment (multi-node,
auto-requeue on SIGUSR1), and only global rank 0 writes the stage's outputs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.environments import SLURMEnvironment

from cellfoundry import slurm
from cellfoundry.utils import UserError, set_torch_threads

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
        # one task holding several GPUs, started without run_stage: Lightning launches the ranks
        return [LightningEnvironment()]
    raise UserError(
        f"training asks for devices={devices} x num_nodes={num_nodes} = {world} processes but this SLURM "
        f"step has {slurm_tasks} task(s); multi-node DDP needs one srun task per GPU. Start the training "
        "through cellfoundry.launch.run_stage (the workflow's training rules do), or with "
        f"`srun --ntasks-per-node={devices} --nodes={num_nodes}`."
    )


def resolve_entry(entry: str) -> Callable[..., Any]:
    """ "package.module:function" -> the function."""
    module, _, name = entry.partition(":")
    if not module or not name:
        raise ValueError(f"entry point {entry!r} is not 'module:function'")
    return getattr(importlib.import_module(module), name)


def rank_command(
    entry: str, kwargs: Mapping[str, Any], *, log_path: str | None = None, threads: int | None = None
) -> list[str]:
    """The command each rank runs: this module's entry point with the stage's entry and kwargs."""
    command = [
        sys.executable,
        "-m",
        "cellfoundry.launch",
        "--entry",
        entry,
        "--kwargs",
        json.dumps(kwargs, default=str),
    ]
    if log_path:
        command += ["--log", str(log_path)]
    if threads:
        command += ["--threads", str(int(threads))]
    return command


def entry_name(entry: str | Callable[..., Any]) -> str:
    """ "module:function" of a module-level function (ranks import it by that name)."""
    if isinstance(entry, str):
        return entry
    module, name = getattr(entry, "__module__", None), getattr(entry, "__qualname__", "")
    if not module or module == "__main__" or "." in name or "<" in name:
        raise ValueError(f"{entry!r} is not a module-level function that other processes can import")
    return f"{module}:{name}"


def run_stage(
    entry: str | Callable[..., Any],
    kwargs: Mapping[str, Any],
    *,
    trainer: Mapping[str, Any],
    log_path: str | os.PathLike | None = None,
    threads: int | None = None,
    trainer_key: str = "trainer",
    resources_key: str = "resources.<rule>",
) -> Any:
    """Run a training stage `entry` (a module-level function, or "module:function") with
    `kwargs` (JSON-able).

    Here, in this process, unless it runs inside a SLURM job with `trainer` devices x num_nodes
    > 1 and is not yet one of that many srun tasks: then a new job step starts one task per GPU
    (`srun --overlap ...`, see cellfoundry.slurm.srun_command), each running `entry(**kwargs)`
    as one DDP rank with its logging appended to `log_path`. This process waits for the step and
    exits with its status when it fails (128 + signal after a preemption save).
    `threads` torch CPU threads, in this process or in each rank (utils.set_torch_threads).
    `trainer_key`/`resources_key` name the config entries in error messages.
    """
    devices, num_nodes = int(trainer.get("devices", 1)), int(trainer.get("num_nodes", 1))
    if not slurm.needs_own_step(devices, num_nodes):
        set_torch_threads(threads)
        return (resolve_entry(entry) if isinstance(entry, str) else entry)(**kwargs)
    entry = entry_name(entry)
    world = devices * num_nodes
    srun = shutil.which("srun")
    if srun is None:
        raise UserError(
            f"{trainer_key} asks for {world} DDP processes inside SLURM job {os.environ.get('SLURM_JOB_ID')}, "
            "but srun is not on PATH."
        )
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID", "")
    problems = slurm.allocation_problems(slurm.job_allocation(job_id), devices, num_nodes)
    if problems:
        raise UserError(
            f"{trainer_key} asks for devices={devices} x num_nodes={num_nodes} = {world} processes, but "
            + "; ".join(problems)
            + f". Set {resources_key}: {{gpu: {world}, tasks: {world}, nodes: {num_nodes}}} in config/config.yaml "
            "(gpu: 0 for CPU processes), "
            "and remove gpu/tasks/nodes overrides of this rule from the profile's set-resources."
        )
    command = slurm.srun_command(
        devices, num_nodes, rank_command(entry, kwargs, log_path=log_path, threads=threads), srun=srun
    )
    shown = command[: command.index("--kwargs")] + ["--kwargs", "'{...}'"]
    log.info(
        "starting %d DDP processes (%d per node on %d node(s)) in a new step of SLURM job %s: %s",
        world,
        devices,
        num_nodes,
        job_id,
        " ".join(shlex.quote(c) if c != "'{...}'" else c for c in shown),
    )
    proc = subprocess.Popen(command, env=slurm.step_environment())
    status = _wait_forwarding_signals(proc)
    if status != 0:
        log.error(
            "the %d DDP processes of %s ended with status %d (see the lines above and the SLURM log)",
            world,
            entry,
            status,
        )
        raise SystemExit(status if 0 < status < 256 else 1)
    log.info("all %d DDP processes of %s finished", world, entry)
    return None


def _wait_forwarding_signals(proc: subprocess.Popen) -> int:
    """Wait for srun; SIGTERM/SIGUSR1 sent to this process (scancel, Snakemake stopping) go on to
    srun, which passes them to every rank (they save a checkpoint and end)."""
    previous = {}

    def forward(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[signum] = signal.signal(signum, forward)
        except ValueError:  # not the main thread
            pass
    try:
        status = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


def _rank_main(argv: list[str] | None = None) -> int:
    """One DDP rank started by run_stage's srun: log to the rule's log (rank 0 at INFO, the
    others at WARNING after one line saying they started), then run the entry point."""
    from cellfoundry.utils import setup_logging

    parser = argparse.ArgumentParser(prog="python -m cellfoundry.launch", description=_rank_main.__doc__)
    parser.add_argument("--entry", required=True, help="module:function of the training stage")
    parser.add_argument("--kwargs", required=True, help="its keyword arguments as JSON")
    parser.add_argument("--log", default=None, help="the rule's log (appended)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    args = parser.parse_args(argv)
    rank, world = os.environ.get("SLURM_PROCID", "0"), os.environ.get("SLURM_NTASKS", "1")
    setup_logging(args.log)
    log.info(
        "DDP rank %s/%s started on %s (local rank %s, pid %d)",
        rank,
        world,
        socket.gethostname(),
        os.environ.get("SLURM_LOCALID", "0"),
        os.getpid(),
    )
    if rank != "0":
        logging.getLogger().setLevel(logging.WARNING)
    set_torch_threads(args.threads)
    try:
        resolve_entry(args.entry)(**json.loads(args.kwargs))
    except UserError as err:
        log.error("rank %s: %s", rank, err)
        return 1
    except Exception:
        log.exception("rank %s failed", rank)
        return 1
    return 0


if __name__ == "__main__":
    from cellfoundry.launch import _rank_main as main  # the imported module, not this __main__ copy

    sys.exit(main())
