# Xpressor stage: latent tokens on the frozen SE model. xpressor_train fits Xpressor (and the
# CLS / mean-pooled baselines with the same decoder) on the train split and measures held-out
# reconstruction; xpressor_encode writes every cell's latent tokens and X_xpressor.


rule xpressor_train:
    input:
        se=f"{SHARED}/se/pretrained.ckpt",
        vocab=vocab_path(),
        tokens="results/{dataset}/tokens",
        h5ad="results/{dataset}/qc/filtered.h5ad",
    output:
        ckpt="results/{dataset}/xpressor/model.ckpt",
        metrics=report(
            "results/{dataset}/xpressor/reconstruction.tsv",
            caption="../report/xpressor_reconstruction.rst",
            category="4. Xpressor",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "held-out reconstruction (table)"},
        ),
    log:
        "logs/{dataset}/xpressor_train.log",
    benchmark:
        "results/{dataset}/benchmarks/xpressor_train.tsv",
    params:
        # inference_batch_size cannot change results: the script reads it from the config so
        # that changing it schedules no re-run
        xpressor={k: v for k, v in config["xpressor"].items() if k != "inference_batch_size"},
        labels=config["xpressor"]["labels"],
        dataset=lambda wc: dataset_cfg(wc.dataset),
        seed=config["seed"],
        device=config["device"],
        # resume state of an interrupted run (not an output: it must survive a failed job)
        work_dir=lambda wc: f"results/{wc.dataset}/xpressor/train",
    resources:
        **training_gpu_resources("xpressor", "xpressor.trainer"),
    threads: 2
    conda:
        torch_env()
    script:
        "../../scripts/xpressor_train.py"


rule xpressor_encode:
    input:
        se=f"{SHARED}/se/pretrained.ckpt",
        vocab=vocab_path(),
        tokens="results/{dataset}/tokens",
        h5ad="results/{dataset}/qc/filtered.h5ad",
        ckpt="results/{dataset}/xpressor/model.ckpt",
        metrics="results/{dataset}/xpressor/reconstruction.tsv",
    output:
        latents="results/{dataset}/xpressor/latents.npy",
        h5ad="results/{dataset}/xpressor/embedding.h5ad",
        summary=report(
            "results/{dataset}/xpressor/summary.json",
            caption="../report/xpressor_summary.rst",
            category="4. Xpressor",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "summary"},
        ),
        plot=report(
            "results/{dataset}/xpressor/summary.png",
            caption="../report/xpressor_summary_plot.rst",
            category="4. Xpressor",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "reconstruction and kNN accuracy"},
        ),
    log:
        "logs/{dataset}/xpressor_encode.log",
    benchmark:
        "results/{dataset}/benchmarks/xpressor_encode.tsv",
    params:
        knn_k=config["xpressor"]["knn_k"],
        device=config["device"],
    resources:
        **inference_gpu_resources("xpressor"),
    threads: 2
    conda:
        torch_env()
    script:
        "../../scripts/xpressor_encode.py"
