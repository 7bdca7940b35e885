"""The SLURM test harness without starting SLURM: when it cannot run, it says why."""

from __future__ import annotations

import os

import slurm_cluster
from slurm_cluster import MARKER, unavailable_reason


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
