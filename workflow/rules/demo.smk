rule demo_data:
    output:
        "results/demo/pbmc68k_reduced.h5ad",
    log:
        "logs/demo/demo_data.log",
    benchmark:
        "results/shared/benchmarks/demo_data.tsv"
    conda:
        "../../envs/qc.yaml"
    resources:
        **cpu_resources(),
    script:
        "../../scripts/demo_data.py"
