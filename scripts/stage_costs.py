"""Rule stage_costs: one row per job (wall time, CPU time, peak memory) from its benchmark file."""

import logging
from pathlib import Path

import pandas as pd

from cellfoundry.utils import atomic_output, setup_logging

setup_logging(snakemake.log[0])
rows = []
for rule, path in zip(snakemake.params.rules, snakemake.input):
    # one line per repeat; "NA" where the job ended before the first sample (0.5 s)
    bench = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
    rows.append(dict(
        rule=rule,
        job=Path(path).stem,
        scope="shared" if Path(path).parts[1] == "shared" else "dataset",
        wall_s=round(bench["s"].mean(), 2),
        cpu_s=round(bench["cpu_time"].mean(), 2),
        max_rss_mb=round(bench["max_rss"].max(), 1),
        mean_load=round(bench["mean_load"].mean(), 1),
    ))
table = pd.DataFrame(rows)
table["wall_share"] = (table["wall_s"] / table["wall_s"].sum()).round(3)
with atomic_output(snakemake.output[0]) as tmp:
    table.to_csv(tmp, sep="\t", index=False)
logging.getLogger("cellfoundry").info(
    "%d jobs, %.1f s wall in all; slowest %s (%.1f s); most memory %s (%.0f MB)",
    len(table), table["wall_s"].sum(), *table.loc[table["wall_s"].idxmax(), ["job", "wall_s"]],
    *table.loc[table["max_rss_mb"].fillna(-1).idxmax(), ["job", "max_rss_mb"]],
)
