"""Every job declares its benchmark file by the convention, and stage_costs gathers exactly the
benchmark files of the jobs behind rule all (dry runs; the real run: test_unlabelled_workflow)."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO, copy_workflow, run_snakemake


def test_every_rule_declares_its_benchmark_beside_its_log():
    """results/{dataset}/benchmarks/<log name>.tsv (shared rules: results/shared/benchmarks/)."""
    checked = 0
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for name, body in re.findall(r"^\s*rule (\w+):\n(.*?)(?=^\s*rule \w+:|\Z)", smk.read_text(), re.S | re.M):
            if name == "all":
                continue
            # an f-string's {{wildcard}} is the pattern's {wildcard}
            body = body.replace("{{", "{").replace("}}", "}")
            log = re.search(r'log:\s*\n\s*f?"logs/([^/]+)/(.+)\.log"', body)
            bench = re.search(r'benchmark:\s*\n\s*f?"(.+)"', body)
            assert log and bench, f"{smk.name}: rule {name} needs log: and benchmark:"
            where = "results/{dataset}" if log[1] == "{dataset}" else "results/shared"
            assert bench[1] == f"{where}/benchmarks/{log[2]}.tsv", f"{smk.name}: rule {name}"
            checked += 1
    assert checked >= 20


def _dry_run_benchmarks(work):
    """(benchmark files of every job but stage_costs, stage_costs' inputs) of a forced dry run."""
    out = run_snakemake(work, "-n", "--forceall").stdout
    jobs = out.split("\nrule ")[1:]
    declared = {b for job in jobs if not job.startswith("stage_costs:") for b in re.findall(r"benchmark: (\S+)", job)}
    gathered = {
        p for job in jobs if job.startswith("stage_costs:") for p in re.search(r"input: (.*)", job)[1].split(", ")
    }
    return declared, gathered


@pytest.mark.parametrize("variant", ["demo", "shards_no_diffusion", "model_folder"])
def test_stage_costs_gathers_the_benchmarks_of_every_job_of_rule_all(tmp_path, variant):
    work = copy_workflow(tmp_path / "wf")
    path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    if variant == "shards_no_diffusion":
        cfg["embed"]["shards"] = 3
        cfg["diffusion"]["enabled"] = False
        # a second dataset (not the demo's file): its own rows, no demo_data
        cfg["datasets"]["other"] = dict(cfg["datasets"]["pbmc68k"], path="other.h5ad")
        (work / "other.h5ad").write_bytes(b"")
    if variant == "model_folder":
        folder = tmp_path / "se600m"
        folder.mkdir()
        (folder / "protein_embeddings.pt").write_bytes(b"")
        cfg["se"]["model_folder"] = str(folder)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    declared, gathered = _dry_run_benchmarks(work)
    assert declared == gathered and len(gathered) >= 17
    names = {p.rsplit("/", 1)[1] for p in gathered}
    if variant == "shards_no_diffusion":
        assert "results/other/benchmarks/embed_random.2.tsv" in gathered and "embed_gather_se.tsv" in names
        assert "diffusion_train.tsv" not in names
    if variant == "model_folder":
        assert "link_se_checkpoint.tsv" in names and not {"pretrain_se.tsv", "build_vocab.tsv"} & names
