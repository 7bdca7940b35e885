# Xpressor stage: latent tokens on the frozen SE model. xpressor_train fits Xpressor (and the
# CLS / mean-pooled baselines with the same decoder) on the train split and measures held-out
# reconstruction; xpressor_encode writes every cell's latent tokens and X_xpressor.


rule xpressor_train:
    input:
        se=SE_MODELS["se"],
        vocab=vocab_path(),
        tokens=rules.tokenize.output[0],
        h5ad=rules.qc.output.h5ad,
    output:
        ckpt="results/{dataset}/xpressor/model.ckpt",
        metrics=report_item(
            "results/{dataset}/xpressor/reconstruction.tsv",
            "xpressor_reconstruction",
            "4. Xpressor",
            figure="held-out reconstruction (table)",
        ),
    params:
        # xpressor.encode.* cannot change the training: the script reads it from the config,
        # so that changing it schedules no re-run
        xpressor={k: v for k, v in config["xpressor"].items() if k != "encode"},
        labels=config["xpressor"]["labels"],
        dataset=lambda wc: dataset_cfg(wc.dataset),
        seed=config["seed"],
        device=config["device"],
        # resume state of an interrupted run (not an output: it must survive a failed job)
        work_dir=lambda wc: f"results/{wc.dataset}/xpressor/train",
    log:
        "logs/{dataset}/xpressor_train.log",
    benchmark:
        "results/{dataset}/benchmarks/xpressor_train.tsv"
    conda:
        torch_env()
    threads: 2
    resources:
        **training_gpu_resources("xpressor", "xpressor.trainer"),
    script:
        "../../scripts/xpressor_train.py"


rule xpressor_encode:
    input:
        se=SE_MODELS["se"],
        vocab=vocab_path(),
        tokens=rules.tokenize.output[0],
        h5ad=rules.qc.output.h5ad,
        ckpt=rules.xpressor_train.output.ckpt,
        metrics=rules.xpressor_train.output.metrics,
    output:
        latents="results/{dataset}/xpressor/latents.npy",
        h5ad="results/{dataset}/xpressor/embedding.h5ad",
        summary=report_item(
            "results/{dataset}/xpressor/summary.json",
            "xpressor_summary",
            "4. Xpressor",
            figure="summary",
        ),
        plot=report_item(
            "results/{dataset}/xpressor/summary.png",
            "xpressor_summary_plot",
            "4. Xpressor",
            figure="reconstruction and kNN accuracy",
        ),
    params:
        knn_k=config["xpressor"]["encode"]["knn_k"],
        device=config["device"],
    log:
        "logs/{dataset}/xpressor_encode.log",
    benchmark:
        "results/{dataset}/benchmarks/xpressor_encode.tsv"
    conda:
        torch_env()
    threads: 2
    resources:
        **inference_gpu_resources("xpressor"),
    script:
        "../../scripts/xpressor_encode.py"
