"""Rule stage_costs: one row per job (wall time, CPU time, peak memory) from its benchmark file."""

from cellfoundry.evaluate.stage import run_stage_costs
from cellfoundry.utils import setup_logging

setup_logging(snakemake.log[0])
run_stage_costs(benchmarks=list(snakemake.input), rules=snakemake.params.rules, table=snakemake.output[0])
