# What each stage cost: every job's `benchmark:` file (Snakemake's wall time and peak memory of
# the job's processes) gathered into one table per dataset, shared jobs included.


rule stage_costs:
    input:
        lambda wc: [path for _, path in stage_benchmarks(wc.dataset)],
    output:
        report_item(
            "results/{dataset}/eval/costs.tsv",
            "stage_costs",
            "7. Costs",
            table="time and memory per job",
        ),
    params:
        rules=lambda wc: [rule for rule, _ in stage_benchmarks(wc.dataset)],
    log:
        "logs/{dataset}/stage_costs.log",
    benchmark:
        "results/{dataset}/benchmarks/stage_costs.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        **cpu_resources(),
    script:
        "../../scripts/stage_costs.py"
