rule qc:
    input:
        dataset_input,
        gene_map=lambda wc: dataset_cfg(wc.dataset)["gene_map"] or [],
        # gene_symbols: auto scores the candidates against a vocabulary known before QC
        vocab=lambda wc: (
            vocab_path()
            if config["se"]["model_folder"] and dataset_cfg(wc.dataset)["gene_symbols"] == "auto"
            else []
        ),
    output:
        h5ad="results/{dataset}/qc/filtered.h5ad",
        summary=report_item(
            "results/{dataset}/qc/summary.json", "qc_summary", "1. QC", figure="summary"
        ),
        metrics="results/{dataset}/qc/metrics.tsv",
        distributions=report_item(
            "results/{dataset}/qc/qc_distributions.png",
            "qc_distributions",
            "1. QC",
            figure="distributions",
        ),
        scatter=report_item(
            "results/{dataset}/qc/counts_vs_genes.png",
            "qc_counts_vs_genes",
            "1. QC",
            figure="counts vs genes",
        ),
    params:
        dataset=lambda wc: dataset_cfg(wc.dataset),
        qc=lambda wc: qc_cfg(wc.dataset),
        seed=config["seed"],
    log:
        "logs/{dataset}/qc.log",
    benchmark:
        "results/{dataset}/benchmarks/qc.tsv"
    conda:
        "../../envs/qc.yaml"
    resources:
        **cpu_resources(),
    script:
        "../../scripts/qc.py"
