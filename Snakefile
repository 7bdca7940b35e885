# cellfoundry: single-cell counts -> QC -> tokens -> SE embedding -> Xpressor -> diffusion -> evaluation.
# Run from the repository root: `snakemake --cores 2` (local) or `snakemake --profile slurm`.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/qc.smk"


rule all:
    input:
        all_input(),
    default_target: True
