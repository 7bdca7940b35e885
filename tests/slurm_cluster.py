"""A real single-node SLURM for the test suite (Debian `slurm-wlm` + `munge`, a placeholder GPU).

`SlurmCluster.start()` installs the packages with apt when they are missing, writes
/etc/slurm/slurm.conf and gres.conf (only when absent or written by an earlier run of these
tests), starts munged (unless one already runs), slurmctld and slurmd, and waits until the node
is idle. `stop()` ends exactly the daemons it started, by the pids in their pid files, and
removes the config files it wrote. Recipe and facts: ../shared/spec/slurm.md.

Every daemon it starts is also recorded (pid and command line) in its own pidfile, PIDFILE, so a
run killed before `stop()` (pytest killed, a timeout) leaves a record: `stop_leftovers()`, called
before the next start, ends the recorded daemons that still run with the same command line and
removes the file. Daemons it did not start are never recorded, so never touched.

`unavailable_reason()` says why a cluster cannot be started here (not root, no apt, another
slurmctld already running, a foreign slurm.conf), so the test can skip with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_ETC = Path("/etc/slurm")
MUNGE_PIDFILE = Path("/run/munge/munged.pid")
MARKER = "# written by cellfoundry tests/slurm_cluster.py"
# The daemons this harness started and has not stopped yet: [{name, pid, cmdline}] (JSON).
PIDFILE = Path("/run/cellfoundry-tests/slurm-daemons.json")
# The node advertises more CPUs and memory than a 2-core CI machine has (slurmd is told to
# trust the config), so the workflow's real resource requests schedule; nothing is enforced
# (TaskPlugin=task/none), jobs just share the cores.
NODE_CPUS = 8
NODE_MEMORY_MB = 64000


def _pid_alive(pid: int) -> bool:
    """True for a running process (a zombie waiting to be reaped counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running(name: str) -> bool:
    """True when a process with this exact command name runs (read-only check via /proc)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == name:
                    return True
            except OSError:
                continue
    return False


def _cmdline(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return None


def _terminate(pid: int, grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after `grace` s."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_records() -> list[dict]:
    try:
        return json.loads(PIDFILE.read_text())
    except (OSError, ValueError):
        return []


def _write_records(records: list[dict]) -> None:
    if records:
        PIDFILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = PIDFILE.with_name(PIDFILE.name + ".tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, PIDFILE)
    else:
        PIDFILE.unlink(missing_ok=True)


def stop_leftovers(log=lambda message: None) -> list[int]:
    """End the daemons an earlier run recorded in PIDFILE and never stopped (it was killed),
    those still running with the recorded command line only (a reused pid is another program),
    then remove the file. Returns the pids ended."""
    if not PIDFILE.exists():
        return []
    stopped = []
    for record in _read_records():
        pid = record.get("pid")
        if isinstance(pid, int) and _pid_alive(pid) and _cmdline(pid) == record.get("cmdline"):
            log(f"stopping {record.get('name')} (pid {pid}) left running by an earlier, killed test run")
            _terminate(pid)
            stopped.append(pid)
    _write_records([])
    return stopped


def _conf_is_ours(path: Path) -> bool:
    return not path.exists() or path.read_text().startswith(MARKER)


def unavailable_reason() -> str | None:
    """Why a test SLURM cannot be started on this machine, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to install and start slurmctld/slurmd/munged (CI runs `make test` as root)"
    have_slurm = all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
    if _running("slurmctld") or _running("slurmd"):
        return "a slurmctld/slurmd already runs on this machine; refusing to reconfigure it"
    for name in ("slurm.conf", "gres.conf"):
        if not _conf_is_ours(SLURM_ETC / name):
            return f"{SLURM_ETC / name} exists and was not written by these tests; refusing to overwrite it"
    return None


def install(log) -> None:
    """apt-get install slurm-wlm and munge when a daemon or client is missing."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        log(f"$ {' '.join(cmd)}")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@dataclass
class SlurmCluster:
    """A single-node cluster whose state, logs and pid files live in `state_dir`."""

    state_dir: Path
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    started_pids: dict[str, int] = field(default_factory=dict)
    written_files: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.messages.append(message)

    @property
    def ctld_log(self) -> Path:
        return self.state_dir / "slurmctld.log"

    @property
    def slurmd_log(self) -> Path:
        return self.state_dir / "slurmd.log"

    # -- set-up ---------------------------------------------------------------------------
    def write_config(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("ctld", "d"):
            (self.state_dir / sub).mkdir(exist_ok=True)
        slurm_conf = f"""{MARKER}
ClusterName=cftest
SlurmctldHost={self.hostname}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.state_dir / "ctld"}
SlurmdSpoolDir={self.state_dir / "d"}
SlurmctldPidFile={self.state_dir / "slurmctld.pid"}
SlurmdPidFile={self.state_dir / "slurmd.pid"}
SlurmctldLogFile={self.ctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=debug
SlurmdDebug=info
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName={self.hostname} CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        # A placeholder GPU: GPU requests schedule and jobs see CUDA_VISIBLE_DEVICES=0.
        gres_conf = f"{MARKER}\nNodeName={self.hostname} Name=gpu File=/dev/null\n"
        SLURM_ETC.mkdir(parents=True, exist_ok=True)
        for name, text in (("slurm.conf", slurm_conf), ("gres.conf", gres_conf)):
            path = SLURM_ETC / name
            path.write_text(text)
            self.written_files.append(path)

    def start_munge(self) -> None:
        pid = _read_pid(MUNGE_PIDFILE)
        if pid and _pid_alive(pid):
            self.log(f"munged already running (pid {pid}); leaving it alone")
            return
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            subprocess.run(["chown", "munge:munge", "/etc/munge/munge.key"], check=True)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(
            ["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True, capture_output=True, timeout=30
        )
        self._started("munged", self._wait_pidfile(MUNGE_PIDFILE))

    def start_daemon(self, name: str) -> None:
        proc = subprocess.run([f"/usr/sbin/{name}"], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start ({proc.returncode}): {proc.stderr}\n{self.tail_logs()}")
        self._started(name, self._wait_pidfile(self.state_dir / f"{name}.pid"))

    def _started(self, name: str, pid: int) -> None:
        """Remember a daemon we started, here and in PIDFILE (which outlives this process)."""
        self.started_pids[name] = pid
        _write_records(_read_records() + [{"name": name, "pid": pid, "cmdline": _cmdline(pid)}])

    def _wait_pidfile(self, pidfile: Path, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(pidfile)
            if pid and _pid_alive(pid):
                return pid
            time.sleep(0.2)
        raise RuntimeError(f"no live pid in {pidfile} after {timeout}s\n{self.tail_logs()}")

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout}s (state {state!r})\n{self.tail_logs()}")

    def start(self) -> SlurmCluster:
        stop_leftovers(self.log)
        install(self.log)
        self.write_config()
        try:
            self.start_munge()
            self.start_daemon("slurmctld")
            self.start_daemon("slurmd")
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    # -- queries --------------------------------------------------------------------------
    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (MinJobAge keeps finished jobs visible)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def tail_logs(self, n: int = 3000) -> str:
        parts = []
        for path in (self.ctld_log, self.slurmd_log):
            if path.exists():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    # -- tear-down ------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel our jobs, end the daemons this object started (by pid), remove our config."""
        if "slurmctld" in self.started_pids:
            subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.started_pids.pop(name, None)
            if pid is not None and _pid_alive(pid):
                _terminate(pid)
            _write_records([r for r in _read_records() if r.get("pid") != pid])
        for path in self.written_files:
            if path.exists() and path.read_text().startswith(MARKER):
                path.unlink()
        self.written_files.clear()
