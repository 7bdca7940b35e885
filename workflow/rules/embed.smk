# SE embedding stage: the SE model (a user's SE model folder, or our own pretraining), a
# random-weights baseline of the same size, cell embeddings (sharded over GPU jobs when
# embed.shards > 1) and a report with UMAPs and kNN label accuracy.
# embed.batch_size is not a param of rule embed (the script reads the config): it cannot change
# the embeddings, so changing it must not schedule re-runs.

SE_DIR = f"{SHARED}/se"
SE_MODELS = {"se": f"{SE_DIR}/pretrained.ckpt", "random": f"{SE_DIR}/random.ckpt"}


wildcard_constraints:
    model="|".join(SE_MODELS),
    shard=r"\d+",


if config["se"]["model_folder"]:

    rule link_se_checkpoint:
        input:
            folder=config["se"]["model_folder"],
        output:
            f"{SE_DIR}/pretrained.ckpt",
        log:
            "logs/shared/link_se_checkpoint.log",
        benchmark:
            "results/shared/benchmarks/link_se_checkpoint.tsv",
        params:
            allow_unsafe_pickle=config["se"]["allow_unsafe_pickle"],
        resources:
            **cpu_resources(),
        conda:
            torch_env()
        script:
            "../../scripts/link_se_checkpoint.py"

else:

    rule pretrain_se:
        input:
            # se.pretrain.datasets only: another dataset neither blocks nor retrains the model
            tokens=expand("results/{dataset}/tokens", dataset=training_datasets("se")),
            h5ads=expand("results/{dataset}/qc/filtered.h5ad", dataset=training_datasets("se")),
            vocab=vocab_path(),
        output:
            ckpt=f"{SE_DIR}/pretrained.ckpt",
            losses=report(
                f"{SE_DIR}/pretrain_losses.tsv",
                caption="../report/embed_pretrain.rst",
                category="3. SE embedding",
                labels={"figure": "pretraining losses"},
            ),
            datasets=training_record("se"),
        log:
            "logs/shared/pretrain_se.log",
        benchmark:
            "results/shared/benchmarks/pretrain_se.tsv",
        params:
            se={**config["se"], "pretrain": {k: v for k, v in config["se"]["pretrain"].items() if k != "datasets"}},
            datasets=training_datasets("se"),
            seed=config["seed"],
            device=config["device"],
            work_dir=lambda wc, output: str(Path(output.ckpt).parent / "pretrain"),
        resources:
            **training_gpu_resources("pretrain_se", "se.trainer"),
        threads: 2
        conda:
            torch_env()
        script:
            "../../scripts/pretrain_se.py"


rule random_se:
    input:
        ckpt=f"{SE_DIR}/pretrained.ckpt",
        vocab=vocab_path(),
    output:
        ckpt=f"{SE_DIR}/random.ckpt",
    log:
        "logs/shared/random_se.log",
    benchmark:
        "results/shared/benchmarks/random_se.tsv",
    params:
        seed=config["seed"],
        allow_unsafe_pickle=config["se"]["allow_unsafe_pickle"],
    resources:
        # a CPU job, but it holds a model as large as the embed jobs' (SE-600M: several GB)
        mem_mb=lambda wc, attempt: config["resources"]["embed"]["mem_mb"] * attempt,
        runtime=config["resources"]["cpu"]["runtime"],
    conda:
        torch_env()
    script:
        "../../scripts/random_se.py"


if config["embed"]["shards"] > 1:

    rule embed:
        input:
            ckpt=lambda wc: SE_MODELS[wc.model],
            vocab=vocab_path(),
            tokens="results/{dataset}/tokens",
            cells="results/{dataset}/qc/filtered.h5ad",
        output:
            temp("results/{dataset}/embed/shards/{model}.{shard}.npy"),
        log:
            "logs/{dataset}/embed_{model}.{shard}.log",
        benchmark:
            "results/{dataset}/benchmarks/embed_{model}.{shard}.tsv",
        params:
            device=config["device"],
            shards=config["embed"]["shards"],
            shard=lambda wc: int(wc.shard),
            allow_unsafe_pickle=config["se"]["allow_unsafe_pickle"],
        resources:
            **gpu_resources("embed"),
        threads: 2
        conda:
            torch_env()
        script:
            "../../scripts/embed.py"

    rule embed_gather:
        input:
            shards=expand(
                "results/{{dataset}}/embed/shards/{{model}}.{shard}.npy",
                shard=range(config["embed"]["shards"]),
            ),
            cells="results/{dataset}/qc/filtered.h5ad",
        output:
            "results/{dataset}/embed/{model}.h5ad",
        log:
            "logs/{dataset}/embed_gather_{model}.log",
        benchmark:
            "results/{dataset}/benchmarks/embed_gather_{model}.tsv",
        params:
            # recorded in the output's provenance (the shards do not carry it)
            ckpt=lambda wc: SE_MODELS[wc.model],
            vocab=vocab_path(),
            tokens=lambda wc: f"results/{wc.dataset}/tokens",
        resources:
            **cpu_resources(),
        conda:
            torch_env()
        script:
            "../../scripts/embed_gather.py"

else:

    rule embed:
        input:
            ckpt=lambda wc: SE_MODELS[wc.model],
            vocab=vocab_path(),
            tokens="results/{dataset}/tokens",
            cells="results/{dataset}/qc/filtered.h5ad",
        output:
            "results/{dataset}/embed/{model}.h5ad",
        log:
            "logs/{dataset}/embed_{model}.log",
        benchmark:
            "results/{dataset}/benchmarks/embed_{model}.tsv",
        params:
            device=config["device"],
            shards=1,
            shard=None,
            allow_unsafe_pickle=config["se"]["allow_unsafe_pickle"],
        resources:
            **gpu_resources("embed"),
        threads: 2
        conda:
            torch_env()
        script:
            "../../scripts/embed.py"


rule embed_knn:
    input:
        embeddings=expand("results/{{dataset}}/embed/{model}.h5ad", model=SE_MODELS),
        cells="results/{dataset}/qc/filtered.h5ad",
    output:
        report(
            "results/{dataset}/embed/knn_accuracy.json",
            caption="../report/embed_knn.rst",
            category="3. SE embedding",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "kNN label accuracy"},
        ),
    log:
        "logs/{dataset}/embed_knn.log",
    benchmark:
        "results/{dataset}/benchmarks/embed_knn.tsv",
    params:
        models=list(SE_MODELS),
        label=lambda wc: dataset_cfg(wc.dataset).get("cell_type"),
        knn_neighbors=config["embed"]["knn_neighbors"],
        pca_components=config["embed"]["pca_components"],
        max_cells=config["embed"]["report_max_cells"],
        seed=config["seed"],
    resources:
        **cpu_resources(),
    conda:
        torch_env()
    script:
        "../../scripts/embed_knn.py"


rule embed_umap:
    input:
        embedding="results/{dataset}/embed/{model}.h5ad",
    output:
        report(
            "results/{dataset}/embed/{model}_umap.png",
            caption="../report/embed_umap.rst",
            category="3. SE embedding",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "model": "{model}", "figure": "UMAP"},
        ),
    log:
        "logs/{dataset}/embed_umap_{model}.log",
    benchmark:
        "results/{dataset}/benchmarks/embed_umap_{model}.tsv",
    params:
        labels=lambda wc: [c for c in (dataset_cfg(wc.dataset)["cell_type"], dataset_cfg(wc.dataset)["batch"]) if c],
        max_cells=config["embed"]["report_max_cells"],
        seed=config["seed"],
    resources:
        **cpu_resources(),
    conda:
        torch_env()
    script:
        "../../scripts/embed_umap.py"
