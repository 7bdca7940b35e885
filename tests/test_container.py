"""The container image definition (./Dockerfile, `snakemake --containerize` output plus one ENV
line) against the pinned envs. Docker and Apptainer cannot run here, so this checks content: with
`containerized:` set, Snakemake looks for each rule's env at /conda-envs/<md5 of the env file>
inside the image, so every env the rules use must be copied there with identical content and
created there, and nothing stale may remain."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml
from test_envs import REPO, TORCH_ENVS, env_packages, parse_rules

DOCKERFILE = REPO / "Dockerfile"
COPY = re.compile(r"^COPY (\S+) /conda-envs/(\w+)/environment\.yaml$", re.M)
CREATE = re.compile(r"conda env create --prefix /conda-envs/(\w+) --file /conda-envs/(\w+)/environment\.yaml")


def image_envs() -> set[Path]:
    """Env files the rules use when config container is set: torch_env() then gives the CUDA
    env (the image runs on CPUs too), so envs/gpu-cpu.yaml is not in the image."""
    helper = (REPO / "workflow" / "rules" / "common.smk").read_text().split("def torch_env", 1)[1].split("\ndef ", 1)[0]
    assert 'config["conda_torch"] == "cpu" and not config["container"]' in helper
    return {rule.path_of("conda") for rule in parse_rules() if rule.path_of("conda") is not None}


def test_every_env_is_in_the_image_with_identical_content():
    text = DOCKERFILE.read_text()
    copied = {REPO / src: prefix for src, prefix in COPY.findall(text)}
    expected = image_envs()
    assert set(copied) == expected, (
        f"Dockerfile copies {sorted(p.name for p in copied)}, the rules use {sorted(p.name for p in expected)}: "
        "regenerate it (snakemake --containerize > Dockerfile, then re-add the ENV line)"
    )
    for env, prefix in copied.items():
        # Snakemake's content hash of an env without pin or post-deploy files: md5 of the file
        assert not list(env.parent.glob(f"{env.stem}.*pin.txt")) and not env.with_suffix(".post-deploy.sh").exists()
        assert prefix == hashlib.md5(env.read_bytes()).hexdigest(), (
            f"{env.name} changed since the Dockerfile was generated"
        )
        block = text.split(f"#   source: {env.relative_to(REPO)}\n", 1)[1].split("\nRUN mkdir", 1)[0]
        shown = "\n".join(line.removeprefix("#   ") for line in block.splitlines()[1:])
        assert shown == env.read_text().strip(), f"the Dockerfile's copy of {env.name} differs from the file"
    created = CREATE.findall(text)
    assert sorted(a for a, b in created) == sorted(copied.values()) and all(a == b for a, b in created)
    envhash = hashlib.sha256()
    for env in sorted(copied, key=lambda p: str(p.relative_to(REPO))):
        envhash.update(env.read_bytes())
    assert f'io.github.snakemake.conda_env_hash="{envhash.hexdigest()}"' in text


def test_the_image_declares_the_cuda_of_the_gpu_env():
    # without it conda cannot solve pytorch=...=cuda* on a build machine without a GPU
    pin = env_packages(yaml.safe_load(TORCH_ENVS["cuda"].read_text()))["cuda-version"]
    assert re.search(rf"^ENV CONDA_OVERRIDE_CUDA={re.escape(pin)}$", DOCKERFILE.read_text(), re.M)


def test_the_workflow_uses_the_image_when_configured():
    snakefile = (REPO / "Snakefile").read_text()
    assert re.search(r'^if config\["container"\]:\s+containerized: config\["container"\]$', snakefile, re.M)
    # set before the first rule file, or the rules would not take it
    assert snakefile.index("containerized:") < snakefile.index('include: "workflow/rules/demo.smk"')
    # the build context: the env files only, not results/
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignored == ["*", "!envs/*.yaml"]
