rule qc:
    input:
        dataset_input,
        gene_map=lambda wc: dataset_cfg(wc.dataset)["gene_map"] or [],
        # gene_symbols: auto scores the candidates against a vocabulary known before QC
        vocab=lambda wc: vocab_path() if config["se"]["model_folder"] and dataset_cfg(wc.dataset)["gene_symbols"] == "auto" else [],
    output:
        h5ad="results/{dataset}/qc/filtered.h5ad",
        summary=report(
            "results/{dataset}/qc/summary.json",
            caption="../report/qc_summary.rst",
            category="1. QC",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "summary"},
        ),
        metrics="results/{dataset}/qc/metrics.tsv",
        distributions=report(
            "results/{dataset}/qc/qc_distributions.png",
            caption="../report/qc_distributions.rst",
            category="1. QC",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "distributions"},
        ),
        scatter=report(
            "results/{dataset}/qc/counts_vs_genes.png",
            caption="../report/qc_counts_vs_genes.rst",
            category="1. QC",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "counts vs genes"},
        ),
    log:
        "logs/{dataset}/qc.log",
    benchmark:
        "results/{dataset}/benchmarks/qc.tsv",
    params:
        dataset=lambda wc: dataset_cfg(wc.dataset),
        qc=lambda wc: qc_cfg(wc.dataset),
        seed=config["seed"],
    resources:
        **cpu_resources(),
    conda:
        "../../envs/qc.yaml"
    script:
        "../../scripts/qc.py"
