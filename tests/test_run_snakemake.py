"""conftest.run_snakemake on a slow machine: a run that outlives its timeout is killed with its
jobs, its workdir is unlocked, it fails with the timeout's cause, and later runs in that workdir
skip with that reason instead of each waiting out a timeout or failing on the lock."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import BIN, run_snakemake

# The job records its sleep's pid, so the test can see that the process group was killed.
SNAKEFILE = 'rule slow:\n    output: "done.txt"\n    shell: "sleep 300 & echo $! > pid.txt; wait; touch {output}"\n'


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_timed_out_run_fails_alone_without_leaving_a_lock(tmp_path, monkeypatch):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    monkeypatch.setenv("CELLFOUNDRY_TEST_TIMEOUT", "0.5")  # the factor: 30 s -> 15 s
    with pytest.raises(pytest.fail.Exception) as failed:
        run_snakemake(tmp_path, "done.txt", timeout=30)
    assert "snakemake done.txt timed out after 15 s (slow machine? raise CELLFOUNDRY_TEST_TIMEOUT" in str(failed.value)
    assert not _running(int((tmp_path / "pid.txt").read_text()))  # the job went with snakemake
    # unlocked: a new snakemake in the workdir is not refused
    assert not list((tmp_path / ".snakemake" / "locks").glob("*"))
    assert (
        subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1"], cwd=tmp_path, capture_output=True).returncode
        == 0
    )
    with pytest.raises(pytest.skip.Exception, match="timed out after 15 s"):
        run_snakemake(tmp_path, "done.txt")  # a dependent: skipped at once, with the cause
