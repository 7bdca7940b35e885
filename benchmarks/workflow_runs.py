"""What the benchmark scripts that run the workflow share: `--set` overrides of config keys, and
one snakemake run of a config in its own directory."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def set_key(config: dict, assignment: str) -> None:
    """--set a.b.c=value (value parsed as YAML)."""
    key, _, value = assignment.partition("=")
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)


def run_workflow(workdir: Path, config: dict, targets: Sequence[str], cores: int, options: Sequence[str] = ()) -> int:
    """Write `config` to workdir/config.yaml and run the repository's workflow on it there
    (an interrupted run continues); returns snakemake's exit status."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        *("-s", str(REPO / "Snakefile"), "--configfile", str(config_path)),
        *("--cores", str(cores), "--rerun-incomplete", *options),
        "--",
        *targets,
    ]
    print(f"running in {workdir}:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=workdir).returncode
