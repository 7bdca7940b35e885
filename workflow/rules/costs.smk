# What each stage cost: every job's `benchmark:` file (Snakemake's wall time and peak memory of
# the job's processes) gathered into one table per dataset, shared jobs included.


rule stage_costs:
    input:
        lambda wc: [path for _, path in stage_benchmarks(wc.dataset)],
    output:
        report(
            "results/{dataset}/eval/costs.tsv",
            caption="../report/stage_costs.rst",
            category="7. Costs",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "table": "time and memory per job"},
        ),
    log:
        "logs/{dataset}/stage_costs.log",
    benchmark:
        "results/{dataset}/benchmarks/stage_costs.tsv",
    params:
        rules=lambda wc: [rule for rule, _ in stage_benchmarks(wc.dataset)],
    resources:
        **cpu_resources(),
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../../scripts/stage_costs.py"
