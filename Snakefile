# cellfoundry: single-cell counts -> QC -> tokens -> SE embedding -> Xpressor -> diffusion ->
# evaluation.
# Run from the repository root: `snakemake --cores 2` (local) or `snakemake --profile slurm`.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# config container (an image built from ./Dockerfile): with --sdm conda apptainer every job runs
# in it, in the env baked into it for its rule (README, "Containers"). Set before any rule.
if config["container"]:

    containerized: config["container"]


include: "workflow/rules/demo.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/xpressor.smk"
include: "workflow/rules/diffusion.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/costs.smk"


rule all:
    default_target: True
    input:
        all_input(),
