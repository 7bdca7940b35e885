# Gene vocabulary and top-gene tokenization: each QC'd cell becomes the "cell sentence" the SE
# model reads (results/{dataset}/tokens/). With se.model_folder set, the model's own
# protein_embeddings.pt is the vocabulary and build_vocab does not run. build_vocab reads the
# datasets of vocab.datasets only; the others are tokenized against that vocabulary.


rule build_vocab:
    input:
        expand(rules.qc.output.h5ad, dataset=training_datasets("vocab")),
    output:
        vocab=f"{SHARED}/vocab/gene_embeddings.pt",
        datasets=training_record("vocab"),
    params:
        # the datasets are the inputs: a null list resolved to the same names is no change
        vocab={k: v for k, v in config["vocab"].items() if k != "datasets"},
        datasets=training_datasets("vocab"),
        seed=config["seed"],
    log:
        "logs/shared/build_vocab.log",
    benchmark:
        "results/shared/benchmarks/build_vocab.tsv"
    conda:
        "../../envs/tokenize.yaml"
    resources:
        **cpu_resources(),
    script:
        "../../scripts/build_vocab.py"


rule tokenize:
    input:
        cells=rules.qc.output.h5ad,
        vocab=vocab_path(),
    output:
        report_item(
            directory("results/{dataset}/tokens"),
            "tokenize_coverage",
            "2. Tokens",
            patterns=["{name}.tsv"],
            table="vocabulary coverage",
        ),
    params:
        # workers (threads) and chunk_size do not change the tokens: the script reads them from
        # the config so that changing them schedules no re-run
        tokenize={k: v for k, v in config["tokenize"].items() if k not in ("workers", "chunk_size")},
        seed=config["seed"],
    log:
        "logs/{dataset}/tokenize.log",
    benchmark:
        "results/{dataset}/benchmarks/tokenize.tsv"
    conda:
        "../../envs/tokenize.yaml"
    threads: config["tokenize"]["workers"]
    resources:
        **cpu_resources(),
    script:
        "../../scripts/tokenize_cells.py"
