# SE embedding stage: the SE model (a user's SE model folder, or our own pretraining), a
# random-weights baseline of the same size, cell embeddings (sharded over GPU jobs when
# embed.shards > 1) and a report with UMAPs and kNN label accuracy.
# embed.batch_size is not a param of rule embed (the script reads the config): it cannot change
# the embeddings, so changing it must not schedule re-runs.

SE_DIR = f"{SHARED}/se"
SE_MODELS = {"se": f"{SE_DIR}/pretrained.ckpt", "random": f"{SE_DIR}/random.ckpt"}
# A model's embeddings of a dataset's cells: rule embed's output, or with embed.shards > 1 each
# embed job writes one shard ({shard}) and embed_gather joins them into it.
EMBEDDING = "results/{dataset}/embed/{model}.h5ad"
EMBEDDINGS = dict(zip(SE_MODELS, expand(EMBEDDING, model=SE_MODELS, allow_missing=True)))
SHARDS = config["embed"]["shards"]
EMBED_JOB = "{model}.{shard}" if SHARDS > 1 else "{model}"


wildcard_constraints:
    model="|".join(SE_MODELS),
    shard=r"\d+",


if config["se"]["model_folder"]:

    rule link_se_checkpoint:
        input:
            folder=config["se"]["model_folder"],
        output:
            SE_MODELS["se"],
        params:
            allow_unsafe_pickle=config["se"]["allow_unsafe_pickle"],
        log:
            "logs/shared/link_se_checkpoint.log",
        benchmark:
            "results/shared/benchmarks/link_se_checkpoint.tsv"
        conda:
            torch_env()
        resources:
            **cpu_resources(),
        script:
            "../../scripts/link_se_checkpoint.py"

else:

    rule pretrain_se:
        input:
            # se.pretrain.datasets only: another dataset neither blocks nor retrains the model
            tokens=expand(rules.tokenize.output[0], dataset=training_datasets("se")),
            h5ads=expand(rules.qc.output.h5ad, dataset=training_datasets("se")),
            vocab=vocab_path(),
        output:
            ckpt=SE_MODELS["se"],
            losses=report_item(
                f"{SE_DIR}/pretrain_losses.tsv",
                "embed_pretrain",
                "3. SE embedding",
                subcategory=None,
                figure="pretraining losses",
            ),
            datasets=training_record("se"),
        params:
            se={
                **config["se"],
                "pretrain": {k: v for k, v in config["se"]["pretrain"].items() if k != "datasets"},
            },
            datasets=training_datasets("se"),
            seed=config["seed"],
            device=config["device"],
            work_dir=lambda wc, output: str(Path(output.ckpt).parent / "pretrain"),
        log:
            "logs/shared/pretrain_se.log",
        benchmark:
            "results/shared/benchmarks/pretrain_se.tsv"
        conda:
            torch_env()
        threads: 2
        resources:
            **training_gpu_resources("pretrain_se", "se.trainer"),
        script:
            "../../scripts/pretrain_se.py"


rule random_se:
    input:
        ckpt=SE_MODELS["se"],
        vocab=vocab_path(),
    output:
        ckpt=SE_MODELS["random"],
    params:
        seed=config["seed"],
        allow_unsafe_pickle=config["se"]["allow_unsafe_pickle"],
    log:
        "logs/shared/random_se.log",
    benchmark:
        "results/shared/benchmarks/random_se.tsv"
    conda:
        torch_env()
    resources:
        # a CPU job, but it holds a model as large as the embed jobs' (SE-600M: several GB)
        mem_mb=lambda wc, attempt: config["resources"]["embed"]["mem_mb"] * attempt,
        runtime=config["resources"]["cpu"]["runtime"],
    script:
        "../../scripts/random_se.py"


rule embed:
    input:
        ckpt=lambda wc: SE_MODELS[wc.model],
        vocab=vocab_path(),
        tokens=rules.tokenize.output[0],
        cells=rules.qc.output.h5ad,
    output:
        temp(f"results/{{dataset}}/embed/shards/{EMBED_JOB}.npy") if SHARDS > 1 else EMBEDDING,
    params:
        device=config["device"],
        shards=SHARDS,
        shard=lambda wc: int(wc.shard) if SHARDS > 1 else None,
        allow_unsafe_pickle=config["se"]["allow_unsafe_pickle"],
    log:
        f"logs/{{dataset}}/embed_{EMBED_JOB}.log",
    benchmark:
        f"results/{{dataset}}/benchmarks/embed_{EMBED_JOB}.tsv"
    conda:
        torch_env()
    threads: 2
    resources:
        **gpu_resources("embed"),
    script:
        "../../scripts/embed.py"


if SHARDS > 1:

    rule embed_gather:
        input:
            shards=expand(rules.embed.output[0], shard=range(SHARDS), allow_missing=True),
            cells=rules.qc.output.h5ad,
        output:
            EMBEDDING,
        params:
            # recorded in the output's provenance (the shards do not carry it)
            ckpt=lambda wc: SE_MODELS[wc.model],
            vocab=vocab_path(),
            tokens=lambda wc: expand(rules.tokenize.output[0], dataset=wc.dataset)[0],
        log:
            "logs/{dataset}/embed_gather_{model}.log",
        benchmark:
            "results/{dataset}/benchmarks/embed_gather_{model}.tsv"
        conda:
            torch_env()
        resources:
            **cpu_resources(),
        script:
            "../../scripts/embed_gather.py"


rule embed_knn:
    input:
        embeddings=list(EMBEDDINGS.values()),
        cells=rules.qc.output.h5ad,
    output:
        report_item(
            "results/{dataset}/embed/knn_accuracy.json",
            "embed_knn",
            "3. SE embedding",
            figure="kNN label accuracy",
        ),
    params:
        models=list(SE_MODELS),
        label=lambda wc: dataset_cfg(wc.dataset).get("cell_type"),
        knn_k=config["embed"]["knn_k"],
        pca_components=config["embed"]["pca_components"],
        max_cells=config["embed"]["report_max_cells"],
        seed=config["seed"],
    log:
        "logs/{dataset}/embed_knn.log",
    benchmark:
        "results/{dataset}/benchmarks/embed_knn.tsv"
    conda:
        torch_env()
    resources:
        **cpu_resources(),
    script:
        "../../scripts/embed_knn.py"


rule embed_umap:
    input:
        embedding=EMBEDDING,
    output:
        report_item(
            "results/{dataset}/embed/{model}_umap.png",
            "embed_umap",
            "3. SE embedding",
            model="{model}",
            figure="UMAP",
        ),
    params:
        labels=lambda wc: [
            c
            for c in (dataset_cfg(wc.dataset)["cell_type"], dataset_cfg(wc.dataset)["batch"])
            if c
        ],
        max_cells=config["embed"]["report_max_cells"],
        seed=config["seed"],
    log:
        "logs/{dataset}/embed_umap_{model}.log",
    benchmark:
        "results/{dataset}/benchmarks/embed_umap_{model}.tsv"
    conda:
        torch_env()
    resources:
        **cpu_resources(),
    script:
        "../../scripts/embed_umap.py"
