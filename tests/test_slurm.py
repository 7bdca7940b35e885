"""`snakemake --profile slurm` against a real single-node SLURM (tests/slurm_cluster.py).

The test installs slurm-wlm + munge with apt when needed, starts munged/slurmctld/slurmd, runs
the whole demo through sbatch with the repository's profile (conda switched off by the documented
override `--sdm env-modules`), and checks that

- every job of the DAG (except the local target rule `all`) went through sbatch,
- GPU rules asked for a GPU (`--gpus` in the sbatch call, gres:gpu in slurmctld's record) and
  CPU rules did not, and memory/runtime came from the config,
- the results equal those of a local run of the same workflow,

that a training job cancelled by SLURM (SIGTERM, as at a time limit) saves a checkpoint and
resumes from it when Snakemake runs again, and that a training rule with trainer devices=2 runs
as 2 DDP processes that it starts itself with srun inside its one SLURM job.

It stops the daemons it started, by pid. Without root or apt it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import copy_workflow, run_snakemake
from slurm_cluster import SlurmCluster, stop_leftovers, unavailable_reason
from test_envs import parse_rules

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

# Test-only settings on top of the profile: no conda (envs cannot be built offline), quick
# status polling, squeue for status (no accounting daemon), keep every job's SLURM log. The
# embedding runs as 2 shards (separate GPU jobs) here and unsharded in the local run, so the
# comparison also shows that the gather keeps the cell order.
EMBED_SHARDS = 2
SLURM_TEST_ARGS = [
    "--profile",
    "slurm",
    "--sdm",
    "env-modules",
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--slurm-status-command",
    "squeue",
    "--slurm-keep-successful-logs",
    "--verbose",
    # The placeholder GPU (/dev/null) hands GPU jobs CUDA_VISIBLE_DEVICES but no CUDA device:
    # device auto would rightly stop them (resolve_device), so the test runs them on the CPU on purpose.
    "--config",
    "device=cpu",
]
# CPU rules whose memory comes from a GPU family's entry: random_se builds a model as large as
# the embed jobs load (several GB for SE-600M) without needing a GPU.
CPU_RULE_MEMORY_FAMILY = {"random_se": "embed"}
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
SBATCH_CALL = re.compile(r"sbatch call: (sbatch .*)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    # daemons that a killed earlier run of these tests left running (its pidfile); no others
    stop_leftovers()
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"real SLURM test skipped: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm_state"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    """The whole demo through sbatch; returns (workdir, snakemake's combined output)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm_demo"))
    config = workdir / "config" / "config.yaml"
    text, n = re.subn(
        r"^(embed:.*(?:\n .*)*?\n\s+shards:\s*)\d+", rf"\g<1>{EMBED_SHARDS}", config.read_text(), count=1, flags=re.M
    )
    assert n == 1, "embed.shards not found in config/config.yaml"
    config.write_text(text)
    proc = run_snakemake(workdir, *SLURM_TEST_ARGS, check=False, timeout=2700)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        slurm_logs = "\n".join(
            f"--- {p.relative_to(workdir)}\n{p.read_text(errors='replace')[-2500:]}"
            for p in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
        )
        pytest.fail(
            f"snakemake --profile slurm failed ({proc.returncode}):\n{output[-6000:]}\n"
            f"{slurm_logs[-8000:]}\n{slurm.tail_logs()}"
        )
    return workdir, output


def job_counts(output: str) -> Counter:
    """Snakemake's 'Job stats' table: rule -> number of jobs."""
    table = output.split("Job stats:", 1)[1]
    counts = Counter()
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def submissions(output: str) -> list[dict]:
    """One record per sbatch submission: rule (from the plugin's log path), SLURM job id, call."""
    calls = SBATCH_CALL.findall(output)
    records = []
    for _, slurm_id, log_path in SUBMITTED.findall(output):
        rule = next(p[len("rule_") :] for p in Path(log_path).parts if p.startswith("rule_"))
        # the plugin logs each call before submitting; its --output names the same log folder
        folder = str(Path(log_path).parent)
        call = next((c for c in calls if f"--output {folder}/" in c or f"--output '{folder}/" in c), "")
        records.append({"rule": rule, "slurm_id": slurm_id, "log": log_path, "call": call})
    return records


def gpu_rules() -> dict[str, str]:
    """GPU rule -> its resources family in the config (from `**gpu_resources("family")`)."""
    found = {}
    for rule in parse_rules():
        match = re.search(r"gpu_resources\(\s*[\"'](\w+)[\"']", rule.directives.get("resources", ""))
        if match:
            found[rule.name] = match.group(1)
    return found


def test_every_job_went_through_sbatch(slurm, slurm_run):
    workdir, output = slurm_run
    expected = job_counts(output)
    expected.pop("all", None)  # the target rule has no action and runs on the submit host
    records = submissions(output)
    submitted = Counter(r["rule"] for r in records)
    assert expected, "no jobs in the DAG"
    assert submitted == expected, f"sbatch submissions {dict(submitted)} != jobs {dict(expected)}"
    if "embed_gather" in submitted:
        assert submitted["embed"] == EMBED_SHARDS * submitted["embed_gather"], dict(submitted)
    for record in records:
        job = slurm.show_job(record["slurm_id"])
        assert job.get("JobState") == "COMPLETED", f"{record}: {job}"
        assert job.get("WorkDir") == str(workdir)
        assert Path(record["log"]).exists(), f"no SLURM log for {record}"


def test_gpu_rules_ask_for_gpus_and_cpu_rules_do_not(slurm, slurm_run):
    workdir, output = slurm_run
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    gpu = gpu_rules()
    records = submissions(output)
    for record in records:
        job = slurm.show_job(record["slurm_id"])
        tres = job.get("TresPerJob", "") + job.get("TresPerNode", "") + job.get("TresPerTask", "")
        assert record["call"], f"no sbatch call logged for {record}"
        options = record["call"].split("--wrap", 1)[0]  # sbatch's own options, not the job command
        if record["rule"] in gpu:
            assert "--gpus=" in options or "--gres=gpu" in options, options
            assert "gpu" in tres, f"{record['rule']}: slurmctld has no GPU request: {job}"
            family = config["resources"][gpu[record["rule"]]]
            assert f"--mem {family['mem_mb']} " in options and f"-t {family['runtime']} " in options, options
        else:
            assert "--gpus" not in options and "gpu" not in options, options
            assert "gpu" not in tres, f"{record['rule']} is a CPU rule but asked for {tres}"
            # memory and runtime of CPU rules come from config resources.cpu (first attempt)
            mem_family = CPU_RULE_MEMORY_FAMILY.get(record["rule"], "cpu")
            assert f"--mem {config['resources'][mem_family]['mem_mb']} " in options
            assert f"-t {config['resources']['cpu']['runtime']} " in options
    if gpu:
        ran = {r["rule"] for r in records}
        assert ran & set(gpu), f"no GPU rule ran; GPU rules are {sorted(gpu)}"


def _compare_h5ad(local: Path, remote: Path) -> None:
    import anndata as ad
    import scipy.sparse as sp

    a, b = ad.read_h5ad(local), ad.read_h5ad(remote)
    assert a.shape == b.shape, f"{local.name}: shape {a.shape} != {b.shape}"
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    assert (a.X is None) == (b.X is None), local
    if a.X is not None:
        xa = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        xb = b.X.toarray() if sp.issparse(b.X) else np.asarray(b.X)
        np.testing.assert_allclose(xa, xb, rtol=1e-5, atol=1e-6, err_msg=str(local))
    for key in a.obsm:
        np.testing.assert_allclose(
            np.asarray(a.obsm[key]), np.asarray(b.obsm[key]), rtol=1e-4, atol=1e-5, err_msg=f"{local}: obsm[{key}]"
        )
    assert a.obs.columns.tolist() == b.obs.columns.tolist()


def test_results_match_a_local_run(slurm_run, demo_all):
    workdir, _ = slurm_run
    local_results = demo_all / "results"
    # benchmark files name the jobs that ran (sharded embed here, one embed job locally)
    local_files = sorted(
        rel
        for rel in (p.relative_to(local_results) for p in local_results.rglob("*") if p.is_file())
        if "benchmarks" not in rel.parts
    )
    assert local_files, "the local run wrote nothing"
    missing = [str(p) for p in local_files if not (workdir / "results" / p).exists()]
    assert not missing, f"the SLURM run lacks {missing}"
    compared = []
    for rel in local_files:
        local, remote = local_results / rel, workdir / "results" / rel
        if rel.suffix == ".h5ad":
            _compare_h5ad(local, remote)
        elif rel.suffix == ".npy":
            a, b = np.load(local), np.load(remote)
            assert a.dtype == b.dtype and a.shape == b.shape, rel
            if np.issubdtype(a.dtype, np.integer):
                np.testing.assert_array_equal(a, b, err_msg=str(rel))
            else:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(rel))
        elif rel.name == "attrs.json":
            assert json.loads(local.read_text()) == json.loads(remote.read_text()), rel
        else:
            continue
        compared.append(str(rel))
    assert any(c.endswith("qc/filtered.h5ad") for c in compared), compared


PREEMPT_SNAKEFILE = """
rule train:
    output:
        "train/rank0.json",
    log:
        "logs/train.log",
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=10,
    shell:
        "{python} {script} train --max-steps 40 --step-delay 0.3 --checkpoint-every 5 >> {{log}} 2>&1"
"""


def test_cancelled_training_job_is_retried_with_more_memory_and_resumes(slurm, tmp_path):
    """scancel (what SLURM does at a time limit or on preemption: SIGTERM, then SIGKILL) stops a
    training job submitted by Snakemake; the job saves a checkpoint, Snakemake resubmits it
    (retries: 1) with twice the memory, and training continues from the saved step."""
    script = Path(__file__).resolve().parent / "train_tiny_se.py"
    (tmp_path / "Snakefile").write_text(PREEMPT_SNAKEFILE.format(python=sys.executable, script=script))
    command = [
        str(Path(sys.executable).parent / "snakemake"),
        "--executor",
        "slurm",
        "--jobs",
        "1",
        "--retries",
        "1",
        "--workflow-profile",
        "none",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-status-command",
        "squeue",
        "--latency-wait",
        "5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, ckpt = tmp_path / "logs" / "train.log", tmp_path / "train" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while not (ckpt.exists() and log.exists() and "step 8\n" in log.read_text()):
            assert time.monotonic() < deadline and run.poll() is None, (
                f"training never got going:\n{log.read_text() if log.exists() else ''}\n{slurm.tail_logs()}"
            )
            time.sleep(0.2)
        queue = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True).stdout
        first_jobs = [line.split()[0] for line in queue.splitlines() if line.split()[1:] == ["rule_train"]]
        assert len(first_jobs) == 1, queue
        subprocess.run(["scancel", first_jobs[0]], check=True)
        # the signal-time save, before the retry overwrites last.ckpt
        deadline = time.monotonic() + 120
        while "saved" not in log.read_text():
            assert time.monotonic() < deadline, f"no checkpoint at the signal:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        saved = int(re.search(r"saved \S+ at step (\d+)", log.read_text()).group(1))
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, f"{output[-5000:]}\n{log.read_text()[-3000:]}"
    assert slurm.show_job(first_jobs[0]).get("JobState") == "CANCELLED"
    ids = sorted(int(i) for i in re.findall(r"submitted with SLURM jobid (\d+)", output))
    assert len(ids) == 2 and str(ids[0]) == first_jobs[0], output[-3000:]
    first, retry = slurm.show_job(str(ids[0])), slurm.show_job(str(ids[1]))
    assert (first.get("MinMemoryNode"), retry.get("MinMemoryNode")) == ("1000M", "2000M")
    assert retry.get("JobState") == "COMPLETED"
    record = json.loads((tmp_path / "train" / "rank0.json").read_text())
    assert 5 < saved < 40 and record["start_step"] == saved and record["final_step"] == 40


DDP_SNAKEFILE = """
import sys
sys.path.insert(0, {src!r})
from cellfoundry.slurm import training_resources

rule train:
    output:
        "train/rank0.json",
    log:
        "logs/train.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        # 2 DDP processes on the CPU (gpu: 0): sbatch --ntasks=2 --nodes=1
        **training_resources({{"gpu": 0, "tasks": 2}}, 2, 1, trainer_key="trainer", resources_key="resources.train"),
    script:
        "train_script.py"
"""
DDP_SCRIPT = """
from cellfoundry.launch import run_stage
from cellfoundry.utils import setup_logging
from train_tiny_se import train

setup_logging(snakemake.log[0])
run_stage(train, dict(out_dir="train", max_steps={steps}, devices=2, checkpoint_every=3),
          trainer=dict(devices=2, num_nodes=1), log_path=snakemake.log[0], threads=1)
"""


def test_two_process_ddp_training_inside_one_slurm_job(slurm, tmp_path):
    """A training rule with trainer devices=2 submitted by Snakemake's SLURM executor: one job
    (--ntasks=2), whose one-task script starts its own srun step of 2 gloo processes; both ranks
    train in lockstep and rank 0's checkpoint loads into a fresh module."""
    import torch
    from train_tiny_se import tiny_module, weights_checksum

    steps = 6
    tests = Path(__file__).resolve().parent
    (tmp_path / "Snakefile").write_text(DDP_SNAKEFILE.format(src=str(tests.parent / "src")))
    (tmp_path / "train_script.py").write_text(DDP_SCRIPT.format(steps=steps))
    command = [
        str(Path(sys.executable).parent / "snakemake"),
        "--executor",
        "slurm",
        "--jobs",
        "1",
        "--workflow-profile",
        "none",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-status-command",
        "squeue",
        "--slurm-keep-successful-logs",
        "--latency-wait",
        "5",
        "--verbose",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)]),
    }
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    log = tmp_path / "logs" / "train.log"
    log_text = log.read_text() if log.exists() else ""
    slurm_logs = "\n".join(
        p.read_text(errors="replace")[-3000:] for p in (tmp_path / ".snakemake" / "slurm_logs").rglob("*.log")
    )
    assert proc.returncode == 0, (
        f"{output[-5000:]}\n--- rule log\n{log_text[-4000:]}\n--- SLURM log\n{slurm_logs}\n{slurm.tail_logs()}"
    )

    (record,) = submissions(output)
    assert "--ntasks=2" in record["call"].split("--wrap", 1)[0], record["call"]
    assert slurm.show_job(record["slurm_id"]).get("JobState") == "COMPLETED"
    assert "starting 2 DDP processes" in log_text and "srun --overlap" in log_text, log_text[-3000:]
    assert "DDP rank 0/2 started" in log_text and "DDP rank 1/2 started" in log_text, log_text[-3000:]
    ranks = [json.loads((tmp_path / "train" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world_size"], r["rank"], r["start_step"], r["final_step"]) for r in ranks] == [
        (2, 0, 0, steps),
        (2, 1, 0, steps),
    ]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were all-reduced

    ckpt = torch.load(tmp_path / "train" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    module, _, _ = tiny_module(steps)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    assert weights_checksum(module) == ranks[0]["checksum"]
