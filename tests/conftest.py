"""Shared fixtures. The workflow tests run the real `snakemake` on the demo in one temporary
copy of the workflow, shared by the whole session so each stage runs once.

CELLFOUNDRY_TEST_TIMEOUT (a factor, default 1) scales every snakemake timeout for slow machines.
A run that times out is killed (its whole process group), its workdir unlocked, and it fails
alone; later runs in that workdir are skipped with the reason instead of each timing out too."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent
WORKFLOW_PARTS = ["Snakefile", "config", "workflow", "scripts", "src", "profiles", "envs"]

# Keep tests on one thread each: the CI machine has two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow (not results) into `dest` and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, symlinks=True)
        elif src.exists():
            shutil.copy2(src, dest / part)
    if (REPO / "slurm").is_symlink():
        (dest / "slurm").symlink_to("profiles/slurm")
    return dest


# Workdir -> why its earlier snakemake run was killed (a timeout): later runs there are skipped.
TIMED_OUT: dict[Path, str] = {}


def timeout_scale() -> float:
    value = os.environ.get("CELLFOUNDRY_TEST_TIMEOUT", "1")
    try:
        scale = float(value)
    except ValueError:
        scale = 0
    if not scale > 0:
        raise pytest.UsageError(
            f"CELLFOUNDRY_TEST_TIMEOUT={value!r}: give a positive factor for the snakemake timeouts, e.g. 2"
        )
    return scale


def _kill_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM snakemake's process group (it and its local jobs); SIGKILL what is left after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        deadline = time.monotonic() + wait
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reap snakemake, or its zombie keeps the group alive
                os.killpg(proc.pid, 0)
                time.sleep(0.2)
        except ProcessLookupError:
            return


def run_snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 2700) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI in `workdir`; on failure show its output and the rule logs.
    The default timeout leaves room for the whole demo chain on a loaded machine (over 30 min
    at load 4)."""
    workdir = Path(workdir)
    if workdir in TIMED_OUT:
        pytest.skip(f"an earlier snakemake run in {workdir} was killed: {TIMED_OUT[workdir]}")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "snakemake"), "--cores", "2", *args]
    timeout = timeout * timeout_scale()
    # its own session: on a timeout the whole group (snakemake and its local jobs) is killed
    popen = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    unlock = None
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(popen)
        stdout, stderr = popen.communicate(timeout=60)
        # a killed snakemake leaves its lock, which would fail every later run in this workdir
        unlock = subprocess.run(
            [str(BIN / "snakemake"), "--unlock"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
        )
    if unlock is not None:  # outside the except: the failure shows no TimeoutExpired traceback
        reason = (
            f"snakemake {' '.join(args)} timed out after {timeout:.0f} s (slow machine? raise "
            f"CELLFOUNDRY_TEST_TIMEOUT, the factor on every snakemake timeout, now {timeout_scale():g})"
        )
        TIMED_OUT[workdir] = reason
        pytest.fail(
            f"{reason}; killed its process group, `snakemake --unlock` exited {unlock.returncode}.\n"
            f"{stdout[-3000:]}\n{stderr[-5000:]}"
        )
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        logs = (
            "\n".join(
                f"--- {p.relative_to(workdir)}\n{p.read_text()[-3000:]}"
                for p in sorted((workdir / "logs").rglob("*.log"))
            )
            if (workdir / "logs").exists()
            else ""
        )
        pytest.fail(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}\n{logs}"
        )
    return proc


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """A fresh copy of the workflow with the demo config; stages run in it on demand."""
    return copy_workflow(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_all(demo_workdir) -> Path:
    """The whole demo workflow (`rule all`), run once per session."""
    run_snakemake(demo_workdir)
    return demo_workdir
