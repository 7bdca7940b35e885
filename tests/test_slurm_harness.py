"""The SLURM test harness without starting SLURM: when it cannot run, it says why; daemons that a
killed earlier run left (its pidfile) are stopped at the next start, and no others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import slurm_cluster
from slurm_cluster import MARKER, SlurmCluster, unavailable_reason


def test_not_root_gives_a_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in unavailable_reason()


def test_no_slurm_and_no_apt_gives_a_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda tool: None)
    monkeypatch.setattr(slurm_cluster, "_running", lambda name: False)
    assert "apt-get" in unavailable_reason()


def test_a_foreign_slurm_conf_is_never_overwritten(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster, "_running", lambda name: False)
    monkeypatch.setattr(slurm_cluster, "SLURM_ETC", tmp_path)
    (tmp_path / "slurm.conf").write_text("ClusterName=production\n")
    assert "refusing to overwrite" in unavailable_reason()
    (tmp_path / "slurm.conf").write_text(MARKER + "\nClusterName=cftest\n")
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    assert unavailable_reason() is None


def test_a_running_slurmctld_is_left_alone(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster, "_running", lambda name: name == "slurmctld")
    assert "already runs" in unavailable_reason()


# -- daemons left by a killed run -------------------------------------------------------------
@pytest.fixture
def pidfile(monkeypatch, tmp_path):
    path = tmp_path / "run" / "slurm-daemons.json"
    monkeypatch.setattr(slurm_cluster, "PIDFILE", path)
    return path


@pytest.fixture
def sleepers():
    """Start stand-in daemons (sleep processes of this test); end whatever is left afterwards."""
    procs = []

    def start(seconds: int) -> subprocess.Popen:
        procs.append(subprocess.Popen(["sleep", str(seconds)]))
        time.sleep(0.1)  # let exec replace the forked python, so /proc shows sleep's command line
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_daemons_recorded_by_a_killed_run_are_stopped_at_the_next_start(pidfile, sleepers):
    left = sleepers(301)  # "slurmctld" of a run killed before stop()
    foreign = sleepers(302)  # a daemon these tests did not start: not in the pidfile
    reused = sleepers(303)  # a recorded pid now running another program
    pidfile.parent.mkdir()
    pidfile.write_text(
        json.dumps(
            [
                {"name": "slurmctld", "pid": left.pid, "cmdline": ["sleep", "301"]},
                {"name": "slurmd", "pid": reused.pid, "cmdline": ["/usr/sbin/slurmd"]},
            ]
        )
    )
    assert slurm_cluster.stop_leftovers() == [left.pid]
    assert left.wait(timeout=10) == -signal.SIGTERM
    assert foreign.poll() is None and reused.poll() is None
    assert not pidfile.exists()


def test_started_daemons_are_recorded_until_stopped(pidfile, sleepers, tmp_path):
    daemon = sleepers(304)
    cluster = SlurmCluster(tmp_path / "state")
    cluster._started("slurmd", daemon.pid)
    assert json.loads(pidfile.read_text()) == [{"name": "slurmd", "pid": daemon.pid, "cmdline": ["sleep", "304"]}]
    cluster.stop()
    assert daemon.wait(timeout=30) == -signal.SIGTERM and not pidfile.exists()
