"""SLURM facts the workflow needs without torch: the resources a training rule asks for, the
`srun` command that starts one process per GPU inside the job, and checks that name the config
keys to fix. `workflow/rules/common.smk` imports this module while Snakemake parses the workflow
(standard library only); `cellfoundry.launch` uses it inside the job.

Why training starts its own job step: the Snakemake SLURM executor runs a rule's script as ONE
task (`srun -n1 ...` inside the job), so there is a single process however many GPUs and nodes
the job holds. For DDP over `devices * num_nodes` GPUs that process starts a second, parallel
job step with one task per GPU (`srun --overlap`: a step inside a running step must share its
resources, or it waits for them forever), and each task is one Lightning rank in
`SLURMEnvironment`. Verified against Slurm 22.05 (tests/test_slurm.py).

Resources (config `resources.<family>`, mapped to snakemake-executor-plugin-slurm 2.x keys):
`gpu` = GPUs of the whole job = devices * num_nodes, `tasks` = SLURM tasks = one per GPU (for
CPU-only ranks: one per process), `nodes` = num_nodes. The plugin passes `tasks` of a GPU job as
`--ntasks-per-gpu`, so a multi-GPU job is sent as `tasks_per_gpu: 1`; a multi-node one asks for
`gres: gpu:<devices>` (GPUs per node) so that every node gets the same number of GPUs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

# Environment of the process that calls srun: SLURM_*/SRUN_*/SBATCH_* variables describe the
# caller's own step (1 task, its CPUs and GPUs, `--ntasks-per-gpu` of the batch job) and srun
# would take them as options for the new step. Only the job's identity and the config survive
# (as in snakemake-executor-plugin-slurm-jobstep).
KEEP_SLURM_VARS = frozenset(
    {
        "SLURM_JOB_ID",
        "SLURM_JOBID",
        "SLURM_CONF",
        "SLURM_CLUSTER_NAME",
        "SLURM_SUBMIT_DIR",
        "SLURM_SUBMIT_HOST",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_MAX",
        "SLURM_ARRAY_TASK_STEP",
    }
)


class ResourceMismatch(ValueError):
    """The trainer settings and the SLURM resources of a training rule disagree (names the keys)."""


def world_size(devices: int, num_nodes: int) -> int:
    return int(devices) * int(num_nodes)


def check_training_resources(
    res: Mapping, devices: int, num_nodes: int, *, trainer_key: str, resources_key: str
) -> None:
    """Raise ResourceMismatch when config `resources_key` (gpu, tasks, nodes) cannot run
    `trainer_key` (devices x num_nodes ranks, one per GPU). Every problem in one message."""
    world = world_size(devices, num_nodes)
    gpu = int(res.get("gpu") or 0)
    tasks = res.get("tasks")
    nodes = res.get("nodes") or 1
    problems = []
    if world > 1 and tasks != world:
        problems.append(f"{resources_key}.tasks must be {world} (one SLURM task per DDP process), not {tasks}")
    elif world == 1 and tasks not in (None, 1):
        problems.append(f"{resources_key}.tasks is {tasks} but the training runs one process; set it to null")
    if nodes != num_nodes:
        problems.append(f"{resources_key}.nodes must be {num_nodes} ({trainer_key}.num_nodes), not {nodes}")
    if gpu and gpu != world and world > 1:
        problems.append(
            f"{resources_key}.gpu must be {world} ({trainer_key}.devices x num_nodes: one GPU per process), not {gpu}"
        )
    if problems:
        raise ResourceMismatch(
            f"{trainer_key} asks for devices={devices} x num_nodes={num_nodes} = {world} process(es), but "
            + "; ".join(problems)
            + f". Set {trainer_key}.devices to the GPUs per node, {trainer_key}.num_nodes to the nodes, and "
            f"{resources_key}: {{gpu: {world}, tasks: {world}, nodes: {num_nodes}}} (gpu: 0 for CPU processes)."
        )


def training_resources(res: Mapping, devices: int, num_nodes: int, *, trainer_key: str, resources_key: str) -> dict:
    """The executor plugin's resources (besides memory and runtime) for a training rule.

    One process: `gpu` (default 1), `gpu_model`, `cpus_per_gpu`, as for any GPU rule. Several
    processes on one node: `--gpus=[MODEL:]N --ntasks-per-gpu=1 --nodes=1`. Several nodes:
    `--gres=gpu:[MODEL:]DEVICES --ntasks-per-gpu=1 --nodes=M` (GPUs per node: the same count on
    every node, and the executor's own one-task step on the first node does not ask for all of
    the job's GPUs at once). CPU processes (`gpu: 0`): `--ntasks=N --nodes=M`.
    """
    check_training_resources(res, devices, num_nodes, trainer_key=trainer_key, resources_key=resources_key)
    world = world_size(devices, num_nodes)
    gpu = int(res.get("gpu", 1) or 0)
    out: dict = {}
    if world == 1:
        out["gpu"] = gpu
        for key in ("gpu_model", "cpus_per_gpu", "tasks", "nodes"):
            if res.get(key) is not None:
                out[key] = res[key]
        return out
    if gpu == 0:
        return {"tasks": world, "nodes": num_nodes}
    if num_nodes == 1:
        out.update(gpu=world, tasks_per_gpu=1, nodes=1)
        if res.get("gpu_model"):
            out["gpu_model"] = res["gpu_model"]
    else:
        model = f"{res['gpu_model']}:" if res.get("gpu_model") else ""
        out.update(gres=f"gpu:{model}{devices}", tasks_per_gpu=1, nodes=num_nodes)
    if res.get("cpus_per_gpu") is not None:
        out["cpus_per_gpu"] = res["cpus_per_gpu"]
    return out


def inference_resources(res: Mapping) -> dict:
    """Resources of a one-process GPU rule of a training family (xpressor_encode,
    diffusion_sample): one GPU on one node whatever the training asks for."""
    out = {"gpu": min(int(res.get("gpu", 1) or 0), 1)}
    for key in ("gpu_model", "cpus_per_gpu"):
        if out["gpu"] and res.get(key) is not None:
            out[key] = res[key]
    return out


# ------------------------------------------------------------------------------ inside the job


def in_slurm_allocation(environ: Mapping[str, str] | None = None) -> bool:
    """Inside a SLURM job, unless its name is "bash" or "interactive" (Lightning's convention
    for an allocation whose processes are started by hand)."""
    env = os.environ if environ is None else environ
    interactive = env.get("SLURM_JOB_NAME") in ("bash", "interactive")
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) and not interactive


def is_rank_process(devices: int, num_nodes: int, environ: Mapping[str, str] | None = None) -> bool:
    """True in one of the `devices * num_nodes` tasks of an srun step (a rank already)."""
    env = os.environ if environ is None else environ
    return "SLURM_PROCID" in env and env.get("SLURM_NTASKS") == str(world_size(devices, num_nodes))


def needs_own_step(devices: int, num_nodes: int, environ: Mapping[str, str] | None = None) -> bool:
    """Inside a SLURM job, more than one rank, and this process is not one of them yet."""
    return (
        in_slurm_allocation(environ)
        and world_size(devices, num_nodes) > 1
        and not is_rank_process(devices, num_nodes, environ)
    )


def srun_command(devices: int, num_nodes: int, command: Sequence[str], *, srun: str = "srun") -> list[str]:
    """`srun` that starts `command` once per rank: `devices` tasks on each of `num_nodes` nodes.

    --overlap: the calling process is itself a task of a running step (the executor's `srun -n1`)
    that holds the job's CPUs and GPUs; without it the new step would wait for them forever.
    Each task sees all of its node's GPUs (a step gets all of the job's GRES by default) and
    Lightning picks GPU `SLURM_LOCALID`. --kill-on-bad-exit: one failed rank ends the others
    instead of leaving them waiting in a collective.
    """
    world = world_size(devices, num_nodes)
    return [
        srun,
        "--overlap",
        f"--nodes={num_nodes}",
        f"--ntasks={world}",
        f"--ntasks-per-node={devices}",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        *command,
    ]


def step_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without the SLURM variables of its own step (see KEEP_SLURM_VARS)."""
    env = dict(os.environ if environ is None else environ)
    for key in list(env):
        if key.startswith(("SLURM_", "SRUN_", "SBATCH_")) and key not in KEEP_SLURM_VARS:
            del env[key]
    return env


def job_allocation(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB_ID` as a dict ({} when scontrol is missing or fails)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for token in shlex.split(out) if out else []:
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def allocation_problems(allocation: Mapping[str, str], devices: int, num_nodes: int) -> list[str]:
    """Why the job (as `scontrol show job` reports it) cannot hold devices x num_nodes ranks."""
    problems = []
    try:
        nodes = int(allocation["NumNodes"].split("-")[0])
        cpus = int(allocation["NumCPUs"].split("-")[0])
    except (KeyError, ValueError):
        return problems  # unknown: let srun decide
    if nodes != num_nodes:
        problems.append(f"the job has {nodes} node(s), the training asks for num_nodes={num_nodes}")
    if cpus < world_size(devices, num_nodes):
        problems.append(f"the job has {cpus} CPU(s) for {world_size(devices, num_nodes)} processes")
    return problems
