"""The rules' wiring, checked by forced dry runs of the real snakemake (no job runs): every rule
that reads the gene vocabulary reads the one Xpressor trained on, the SE model folder's
protein_embeddings.pt when se.model_folder is set."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml
from conftest import REPO, copy_workflow, run_snakemake

DATA = REPO / "tests" / "data"
# The rules that read the vocabulary (diffusion and evaluate_generation in the latent token space).
VOCAB_RULES = {
    "tokenize",
    "random_se",
    "embed",
    "xpressor_train",
    "xpressor_encode",
    "evaluate_xpressor",
    "diffusion_train",
    "diffusion_sample",
    "evaluate_generation",
}


def _dry_run_inputs(work) -> dict[str, list[list[str]]]:
    """rule -> the input files of each of its jobs, from `snakemake -n --forceall`."""
    jobs: dict[str, list[list[str]]] = {}
    for block in run_snakemake(work, "-n", "--forceall").stdout.split("\nrule ")[1:]:
        found = re.search(r"^\s+input: (.*)$", block, re.M)
        jobs.setdefault(block.split(":", 1)[0], []).append(found[1].split(", ") if found else [])
    return jobs


def _vocab_readers(jobs, vocab: str) -> set[str]:
    return {rule for rule, inputs in jobs.items() if any(vocab in files for files in inputs)}


@pytest.mark.parametrize("model_folder", [False, True])
def test_every_rule_reads_the_vocabulary_xpressor_trained_on(tmp_path, model_folder):
    work = copy_workflow(tmp_path / "wf")
    path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["diffusion"]["enabled"] and cfg["diffusion"]["token_space"] == "latent"
    shared_vocab = "results/shared/vocab/gene_embeddings.pt"
    if model_folder:
        # a small SE model folder in SE-600M layout (tests/data: the shared SE reference fixture)
        folder = tmp_path / "SE-tiny"
        folder.mkdir()
        shutil.copy(DATA / "se_reference.ckpt", folder / "se_tiny_epoch1.ckpt")
        shutil.copy(DATA / "se_reference" / "protein_embeddings.pt", folder / "protein_embeddings.pt")
        cfg["se"]["model_folder"] = str(folder)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    vocab = str(folder / "protein_embeddings.pt") if model_folder else shared_vocab

    jobs = _dry_run_inputs(work)
    assert _vocab_readers(jobs, vocab) >= VOCAB_RULES
    for rule in VOCAB_RULES:  # every job of each, not just one
        assert all(vocab in files for files in jobs[rule]), rule
    if model_folder:
        assert not _vocab_readers(jobs, shared_vocab), "a rule reads the built vocabulary besides the model folder's"
        assert "build_vocab" not in jobs and "pretrain_se" not in jobs and "link_se_checkpoint" in jobs
