# Gene vocabulary and top-gene tokenization: each QC'd cell becomes the "cell sentence" the SE
# model reads (results/{dataset}/tokens/). With se.model_folder set, the model's own
# protein_embeddings.pt is the vocabulary and build_vocab does not run.


rule build_vocab:
    input:
        expand("results/{dataset}/qc/filtered.h5ad", dataset=DATASETS),
    output:
        f"{SHARED}/vocab/gene_embeddings.pt",
    log:
        "logs/shared/build_vocab.log",
    params:
        vocab=config["vocab"],
        seed=config["seed"],
    resources:
        **cpu_resources(),
    conda:
        "../../envs/tokenize.yaml"
    script:
        "../../scripts/build_vocab.py"


rule tokenize:
    input:
        cells="results/{dataset}/qc/filtered.h5ad",
        vocab=vocab_path(),
    output:
        report(
            directory("results/{dataset}/tokens"),
            patterns=["{name}.tsv"],
            caption="../report/tokenize_coverage.rst",
            category="2. Tokens",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "table": "vocabulary coverage"},
        ),
    log:
        "logs/{dataset}/tokenize.log",
    params:
        tokenize=config["tokenize"],
        seed=config["seed"],
    resources:
        **cpu_resources(),
    threads: config["tokenize"]["workers"]
    conda:
        "../../envs/tokenize.yaml"
    script:
        "../../scripts/tokenize_cells.py"
