"""The pinned conda environments (envs/*.yaml) used on the cluster (`--sdm conda`) cannot be built
offline, so this test checks them statically: each parses, pins every package to an exact
version, and lists every third-party package that the scripts of the rules using it import.

Rules -> conda env -> script come from parsing workflow/rules/*.smk; script -> imports from the
script's AST, following imports of `cellfoundry` into src/cellfoundry (the rule scripts import the
package from src/, which is not installed in the conda envs)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULES_DIR = REPO / "workflow" / "rules"
SRC = REPO / "src"
FIRST_PARTY = "cellfoundry"
# Supplied to every script by the job runner (Snakemake's preamble puts its own search path on
# sys.path), not by the rule's env.
PROVIDED = {"snakemake"}
# import name -> conda-forge package name, where they differ.
CONDA_NAME = {
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "torch": "pytorch",
    "pytorch_lightning": "lightning",
    "ot": "pot",
    "igraph": "python-igraph",
    "umap": "umap-learn",
    "PIL": "pillow",
    "google": "protobuf",
    "tensorboard": "tensorboard",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "scrublet": "scrublet",
    "louvain": "louvain",
}
# Packages that may stand in for another (conda-forge splits some projects).
ALTERNATIVES = {
    "pytorch": {"pytorch", "pytorch-cpu", "pytorch-gpu", "torch"},
    "lightning": {"lightning", "pytorch-lightning"},
    "python-igraph": {"python-igraph", "igraph"},
    "pyyaml": {"pyyaml", "yaml"},
}
VERSION = re.compile(r"^\d+(\.\d+)+([.\-+_a-zA-Z0-9]*)$")
# conda: directives that call common.smk's torch_env() instead of naming a file: the env files it
# can return (config conda_torch: cuda | cpu).
TORCH_ENV_CALL = "torch_env()"
TORCH_ENVS = {"cuda": REPO / "envs" / "gpu.yaml", "cpu": REPO / "envs" / "gpu-cpu.yaml"}


# -- parsing the rules ----------------------------------------------------------------------
@dataclass
class Rule:
    name: str
    source: Path
    directives: dict[str, str] = field(default_factory=dict)

    def path_of(self, directive: str) -> Path | None:
        """The first quoted path of a directive, resolved like Snakemake (relative to the .smk);
        for `conda: torch_env()` the CUDA env (env_files gives both)."""
        if directive == "conda" and TORCH_ENV_CALL in self.directives.get("conda", ""):
            return TORCH_ENVS["cuda"]
        match = re.search(r"""["']([^"']+)["']""", self.directives.get(directive, ""))
        return (self.source.parent / match.group(1)).resolve() if match else None


def parse_rules(rules_dir: Path = RULES_DIR) -> list[Rule]:
    """Every `rule`/`checkpoint` in rules_dir/*.smk with the raw text of its directives
    (rules inside `if config[...]:` blocks too, whatever their indentation)."""
    rules = []
    for smk in sorted(rules_dir.glob("*.smk")):
        current, directive, indent = None, None, 0
        for line in smk.read_text().splitlines():
            head = re.match(r"^(\s*)(?:rule|checkpoint)\s+(\w+)\s*:", line)
            if head:
                current, directive, indent = Rule(head.group(2), smk), None, len(head.group(1))
                rules.append(current)
                continue
            if current is None or not line.strip() or line.lstrip().startswith("#"):
                continue
            depth = len(line) - len(line.lstrip())
            if depth <= indent:
                current = None  # dedented: the rule ended
                continue
            found = re.match(r"^\s*(\w+):\s*(.*)$", line)
            if found and depth == indent + 4:
                directive = found.group(1)
                current.directives[directive] = found.group(2)
            elif directive:
                current.directives[directive] += "\n" + line
    return rules


def shell_scripts(rule: Rule) -> list[Path]:
    """scripts/*.py named in a shell: directive (called via workflow.source_path)."""
    text = rule.directives.get("shell", "") + rule.directives.get("params", "")
    return [(REPO / m).resolve() for m in re.findall(r"(scripts/[\w/]+\.py)", text)]


# -- following imports ----------------------------------------------------------------------
def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts)
    return ".".join(parts[:-1])


def _guards_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
            return True
    return False


def imports_of(path: Path) -> list[tuple[str, list[str], str | None]]:
    """(absolute module, imported names, enclosing top-level function or None) for every import
    in the file. Imports inside `try: ... except ImportError` are optional and left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.Try) and _guards_import_error(node):
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, function)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = _package_of(path).split(".")
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names], function))
        for child in ast.iter_child_nodes(node):
            inner = function
            if function is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            visit(child, inner)

    visit(tree, None)
    return found


def third_party_imports(script: Path) -> dict[str, set[str]]:
    """Top-level third-party module -> the files importing it, for a script and every
    cellfoundry module it reaches.

    Module-level imports of a reached module always count. An import inside a library function
    counts when that function is imported by name somewhere along the way (or the module is
    used whole); every import in the script itself counts."""
    result: dict[str, set[str]] = {}
    used_names: dict[Path, set[str] | None] = {script: None}  # None: the whole module is used
    done: set[tuple[Path, frozenset | None]] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        names_used = used_names[path]
        key = (path, None if names_used is None else frozenset(names_used))
        if key in done:
            continue
        done.add(key)
        for module, names, function in imports_of(path):
            if function is not None and names_used is not None and function not in names_used:
                continue
            top = module.split(".")[0]
            if top == FIRST_PARTY:
                parts = module.split(".")
                # importing a submodule runs every parent package's __init__ first
                reached = {".".join(parts[:i]): set() for i in range(1, len(parts))}
                reached[module] = set(names)
                for name in names:
                    if _module_file(f"{module}.{name}") is not None:
                        reached[f"{module}.{name}"] = None
                        reached[module].discard(name)
                if not names:
                    reached[module] = None
                for target, wanted in reached.items():
                    file = _module_file(target)
                    if file is None:
                        continue
                    before = used_names.get(file, set())
                    if before is None or wanted is None:
                        merged = None
                    else:
                        merged = before | wanted
                    if file not in used_names or merged != before:
                        used_names[file] = merged
                        todo.append(file)
            elif top and top not in sys.stdlib_module_names and top not in PROVIDED and top != "__future__":
                result.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return result


# -- reading the envs -----------------------------------------------------------------------
def env_packages(env: dict, builds: bool = False) -> dict[str, str]:
    """Package name (lower case) -> its version spec (or, with builds, its build string, "" for
    none), conda and pip entries together."""
    packages = {}
    for dep in env.get("dependencies") or []:
        if isinstance(dep, dict):
            for pip_dep in dep.get("pip", []):
                name, pinned, version = str(pip_dep).partition("==")
                packages[re.split(r"[<>=!~\[ ]", name)[0].strip().lower()] = version.strip() if pinned else ""
            continue
        # conda: "name=1.2.3", "name==1.2.3", "channel::name=1.2.3" or "name=1.2.3=build*"
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(==|=)?\s*([^=\s]*)(?:=(\S+))?$", str(dep).split("::")[-1].strip())
        packages[match.group(1).lower()] = (
            (match.group(4) or "") if builds else match.group(3) if match.group(2) else ""
        )
    return packages


ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def test_there_are_envs_and_rules():
    assert ENV_FILES, "no envs/*.yaml"
    assert parse_rules(), "no rules parsed from workflow/rules/*.smk"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_parses_and_pins_exact_versions(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert isinstance(env, dict) and env.get("dependencies"), f"{env_file.name}: no dependencies"
    assert env.get("channels"), f"{env_file.name}: no channels (conda-forge expected)"
    packages = env_packages(env)
    assert "python" in packages, f"{env_file.name}: python is not pinned"
    unpinned = {name: spec for name, spec in packages.items() if name != "pip" and not VERSION.match(spec)}
    assert not unpinned, f"{env_file.name}: packages without an exact version: {unpinned}"


def test_parser_finds_script_and_conda_directives(tmp_path):
    smk = tmp_path / "x.smk"
    smk.write_text(
        'rule a:\n    input:\n        "x",\n    conda:\n        "../../envs/qc.yaml"\n'
        '    script:\n        "../../scripts/qc.py"\n\n\nrule b:\n    shell:\n        "echo"\n'
        'if config["x"]:\n\n    rule c:\n        resources:\n            **gpu_resources("embed"),\n'
        '        script:\n            "../../scripts/c.py"\n\nelse:\n    pass\n'
    )
    rules = parse_rules(tmp_path)
    assert [r.name for r in rules] == ["a", "b", "c"]
    assert "gpu_resources" in rules[2].directives["resources"]
    assert rules[2].path_of("script").name == "c.py"
    assert rules[0].path_of("conda").name == "qc.yaml"
    assert rules[0].path_of("script").name == "qc.py"
    assert rules[1].path_of("conda") is None


def test_import_follower_reaches_library_modules():
    script = REPO / "scripts" / "qc.py"
    if not script.exists():
        pytest.skip("scripts/qc.py not there yet")
    modules = third_party_imports(script)
    # qc.py itself imports only the package; anndata/numpy come from src/cellfoundry
    assert "numpy" in modules and any("src/cellfoundry" in f for f in modules["numpy"])
    assert FIRST_PARTY not in modules and "json" not in modules


RULES = [r for r in parse_rules() if "script" in r.directives or shell_scripts(r)]


def env_files(rule: Rule) -> list[Path]:
    """The env files a rule's conda: directive can name (both variants for torch_env())."""
    if TORCH_ENV_CALL in rule.directives.get("conda", ""):
        return list(TORCH_ENVS.values())
    return [p for p in [rule.path_of("conda")] if p is not None]


def missing_packages(rule: Rule, env_file: Path | None = None) -> dict[str, list[str]]:
    """Conda package -> files importing it, for packages the rule's scripts import but its env
    (env_file, default the one its conda: directive names) does not list."""
    env_file = env_file or rule.path_of("conda")
    packages = {p.replace("_", "-") for p in env_packages(yaml.safe_load(env_file.read_text()))}
    scripts = [p for p in [rule.path_of("script")] if p is not None] + shell_scripts(rule)
    missing = {}
    for script in scripts:
        assert script.exists(), f"rule {rule.name}: script {script} does not exist"
        for module, files in third_party_imports(script).items():
            name = CONDA_NAME.get(module, module).lower().replace("_", "-")
            accepted = {a.replace("_", "-") for a in ALTERNATIVES.get(name, {name})}
            if not accepted & packages:
                missing[name] = sorted(files)
    return missing


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_env_lists_every_import(rule):
    env_file = rule.path_of("conda")
    assert env_file is not None, f"rule {rule.name} ({rule.source.name}) runs a script but has no conda: directive"
    for env_file in env_files(rule):
        assert env_file.exists(), f"rule {rule.name}: conda env {env_file} does not exist"
        missing = missing_packages(rule, env_file)
        assert not missing, (
            f"rule {rule.name}: {env_file.relative_to(REPO)} lacks packages its scripts import: "
            + "; ".join(f"{name} (imported in {', '.join(files)})" for name, files in sorted(missing.items()))
        )


def test_a_missing_package_is_reported(tmp_path):
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "thin.yaml").write_text("channels: [conda-forge]\ndependencies: [python=3.11, numpy=2.4.6]\n")
    rules_dir = tmp_path / "workflow" / "rules"
    rules_dir.mkdir(parents=True)
    (rules_dir / "x.smk").write_text(
        f'rule x:\n    conda:\n        "../../envs/thin.yaml"\n    script:\n        "{REPO / "scripts" / "qc.py"}"\n'
    )
    (rule,) = parse_rules(rules_dir)
    missing = missing_packages(rule)
    assert "anndata" in missing and "numpy" not in missing


def test_lazy_library_imports_count_only_when_their_function_is_used(tmp_path):
    uses_device = tmp_path / "a.py"
    uses_device.write_text("from cellfoundry.utils import resolve_device\n")
    uses_logging = tmp_path / "b.py"
    uses_logging.write_text("from cellfoundry.utils import setup_logging\n")
    # resolve_device imports torch inside the function; seed_everything guards it by ImportError
    assert "torch" in third_party_imports(uses_device)
    assert "torch" not in third_party_imports(uses_logging)


# -- the GPU envs and the device check ----------------------------------------------------------
def test_gpu_env_selects_the_cuda_build_and_the_cpu_variant_differs_only_in_torch():
    cuda_env, cpu_env = (yaml.safe_load(TORCH_ENVS[k].read_text()) for k in ("cuda", "cpu"))
    # the build string decides: without it a GPU-less login node resolves the CPU build
    assert env_packages(cuda_env, builds=True)["pytorch"].startswith("cuda"), (
        "envs/gpu.yaml must require pytorch=...=cuda*"
    )
    assert VERSION.match(env_packages(cuda_env)["cuda-version"]), "envs/gpu.yaml must pin cuda-version"
    assert env_packages(cpu_env, builds=True)["pytorch"].startswith("cpu")
    assert env_packages(cuda_env)["pytorch"] == env_packages(cpu_env)["pytorch"]
    rest = {k: v for k, v in env_packages(cuda_env).items() if k != "cuda-version"}
    assert rest == env_packages(cpu_env) and cuda_env["channels"] == cpu_env["channels"]


def test_torch_rules_take_their_env_from_torch_env():
    direct = [r.name for r in parse_rules() if re.search(r"envs/gpu(-cpu)?\.yaml", r.directives.get("conda", ""))]
    assert not direct, f"rules naming envs/gpu*.yaml instead of calling {TORCH_ENV_CALL}: {direct}"
    gpu_rules = [r for r in parse_rules() if "gpu_resources" in r.directives.get("resources", "")]
    assert gpu_rules and all(TORCH_ENV_CALL in r.directives.get("conda", "") for r in gpu_rules)
    helper = (RULES_DIR / "common.smk").read_text().split("def torch_env", 1)[1].split("\ndef ", 1)[0]
    assert '"../../envs/gpu.yaml"' in helper and '"../../envs/gpu-cpu.yaml"' in helper


@pytest.mark.parametrize(
    "environ, given",
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_GPUS_ON_NODE": "0"}, None),
        ({"SLURM_JOB_GPUS": "NoDevFiles", "SLURM_GPUS_PER_NODE": "a100:0"}, None),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
        ({"SLURM_STEP_GPUS": "2,3"}, "SLURM_STEP_GPUS=2,3"),
        ({"SLURM_GPUS_PER_NODE": "h100:4"}, "SLURM_GPUS_PER_NODE=h100:4"),
        ({"SLURM_GPU_BIND": "closest"}, None),  # not a GPU allocation
    ],
)
def test_given_gpus_reads_the_allocation(environ, given):
    from cellfoundry.utils import given_gpus

    assert given_gpus(environ) == given


def _no_gpu_env(monkeypatch, **variables):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in [
        k
        for k in os.environ
        if k.startswith("SLURM_GPUS") or k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
    ]:
        monkeypatch.delenv(key)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)


def test_resolve_device_refuses_a_gpu_job_whose_torch_sees_no_gpu(monkeypatch):
    from cellfoundry.utils import UserError, resolve_device

    _no_gpu_env(monkeypatch)
    assert resolve_device("auto") == "cpu"  # a laptop: auto falls back
    _no_gpu_env(monkeypatch, SLURM_JOB_GPUS="0", CUDA_VISIBLE_DEVICES="0")
    with pytest.raises(UserError) as err:
        resolve_device("auto")
    message = str(err.value)
    assert "\n" not in message and "CUDA_VISIBLE_DEVICES=0" in message
    assert sys.prefix in message and "envs/gpu.yaml" in message and "device: cpu" in message
    assert resolve_device("cpu") == "cpu"  # a deliberate CPU run is never refused
    _no_gpu_env(monkeypatch)
    with pytest.raises(UserError, match="device: cuda is set"):
        resolve_device("cuda")


# A rule script run as Snakemake runs it (its `snakemake` object injected), in a GPU job whose
# torch sees no GPU: CUDA is hidden from torch by the patched is_available, as on a CPU build.
FAKE_JOB = """
import runpy, sys
from types import SimpleNamespace as NS
import torch
torch.cuda.is_available = lambda: False
missing = {tmp!r} + "/missing"
job = NS(log=[{tmp!r} + "/rule.log"], threads=1, output=[{tmp!r} + "/out.h5ad"],
         input=NS(ckpt=missing, vocab=missing, tokens=[missing], cells=missing, h5ads=[missing]),
         params=NS(device="auto", shards=1, shard=0, allow_unsafe_pickle=False, work_dir=missing,
                   se={{"trainer": {{}}}}, seed=0, datasets=["d"], batch_size=2),
         config={{"embed": {{"batch_size": 2}}}})
if not {script!r}.endswith("embed.py"):
    job.output = NS(ckpt=missing, losses=missing, datasets=missing)
runpy.run_path({script!r}, init_globals={{"snakemake": job}}, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["embed.py", "pretrain_se.py"])
def test_a_gpu_rule_script_stops_with_one_line_before_any_work(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CUDA_VISIBLE_DEVICES="0", SLURM_JOB_GPUS="0", PYTHONPATH=str(SRC))
    code = FAKE_JOB.format(tmp=str(tmp_path), script=str(REPO / "scripts" / script))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = (tmp_path / "rule.log").read_text()
    # the device check, not a missing input, stopped it: one ERROR line, last, and no traceback
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and log.splitlines()[-1] == errors[0] and "Traceback" not in log, log
    assert "CUDA_VISIBLE_DEVICES=0 but torch" in errors[0] and "envs/gpu.yaml" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
