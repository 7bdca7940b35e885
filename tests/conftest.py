"""Shared fixtures. The workflow tests run the real `snakemake` on the demo in one temporary
copy of the workflow, shared by the whole session so each stage runs once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def run_snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI in `workdir`; on failure show its output and the rule logs."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        logs = "\n".join(
            f"--- {p.relative_to(workdir)}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log"))
        ) if (workdir / "logs").exists() else ""
        pytest.fail(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}\n{logs}")
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
