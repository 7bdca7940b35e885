# Evaluation: every stage measured beside its baselines on the same cells (spec: evaluation.md).

EVALUATION = "6. Evaluation"


rule evaluate_embeddings:
    input:
        qc=rules.qc.output.h5ad,
        se=EMBEDDINGS["se"],
        random=EMBEDDINGS["random"],
        xpressor=rules.xpressor_encode.output.h5ad,
    output:
        table=report_item(
            "results/{dataset}/eval/embeddings.tsv",
            "evaluate_embeddings_table",
            EVALUATION,
            "{dataset}: embeddings",
            figure="embedding metrics (table)",
        ),
        json=report_item(
            "results/{dataset}/eval/embeddings.json",
            "evaluate_embeddings_json",
            EVALUATION,
            "{dataset}: embeddings",
            figure="embeddings summary (JSON)",
        ),
        bars=report_item(
            "results/{dataset}/eval/embeddings_metrics.png",
            "evaluate_embeddings_bars",
            EVALUATION,
            "{dataset}: embeddings",
            figure="embedding metrics (bars)",
        ),
        umap=report_item(
            "results/{dataset}/eval/embeddings_umap.png",
            "evaluate_embeddings_umap",
            EVALUATION,
            "{dataset}: embeddings",
            figure="UMAPs",
        ),
    params:
        evaluate=config["evaluate"],
        cell_type=lambda wc: dataset_cfg(wc.dataset).get("cell_type"),
        batch=lambda wc: dataset_cfg(wc.dataset).get("batch"),
        seed=config["seed"],
    log:
        "logs/{dataset}/evaluate_embeddings.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_embeddings.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        **cpu_resources(),
    script:
        "../../scripts/evaluate_embeddings.py"


rule evaluate_xpressor:
    input:
        qc=rules.qc.output.h5ad,
        summary=rules.xpressor_encode.output.summary,
        table=rules.xpressor_train.output.metrics,
        model=rules.xpressor_train.output.ckpt,
        latents=rules.xpressor_encode.output.latents,
        vocab=vocab_path(),
    output:
        table=report_item(
            "results/{dataset}/eval/reconstruction.tsv",
            "evaluate_reconstruction_table",
            EVALUATION,
            "{dataset}: Xpressor reconstruction",
            figure="reconstruction metrics (table)",
        ),
        json=report_item(
            "results/{dataset}/eval/reconstruction.json",
            "evaluate_reconstruction_json",
            EVALUATION,
            "{dataset}: Xpressor reconstruction",
            figure="reconstruction summary (JSON)",
        ),
        bars=report_item(
            "results/{dataset}/eval/reconstruction_metrics.png",
            "evaluate_reconstruction_bars",
            EVALUATION,
            "{dataset}: Xpressor reconstruction",
            figure="reconstruction metrics (bars)",
        ),
        scatter=report_item(
            "results/{dataset}/eval/reconstruction_scatter.png",
            "evaluate_reconstruction_scatter",
            EVALUATION,
            "{dataset}: Xpressor reconstruction",
            figure="decoded vs observed",
        ),
    params:
        evaluate=config["evaluate"],
        device=config["device"],
        seed=config["seed"],
    log:
        "logs/{dataset}/evaluate_xpressor.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_xpressor.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        **cpu_resources(),
    script:
        "../../scripts/evaluate_xpressor.py"


rule evaluate_generation:
    input:
        # latent space: the real test cells' latents, decoded as samples are (the ceiling row)
        **{k: v for k, v in DIFFUSION_INPUTS.items() if k != "h5ad"},
        qc=rules.qc.output.h5ad,
        samples=rules.diffusion_sample.output.samples,
    output:
        table=report_item(
            "results/{dataset}/eval/generation.tsv",
            "evaluate_generation_table",
            EVALUATION,
            "{dataset}: generated cells",
            figure="generation metrics (table)",
        ),
        json=report_item(
            "results/{dataset}/eval/generation.json",
            "evaluate_generation_json",
            EVALUATION,
            "{dataset}: generated cells",
            figure="generation summary (JSON)",
        ),
        bars=report_item(
            "results/{dataset}/eval/generation_metrics.png",
            "evaluate_generation_bars",
            EVALUATION,
            "{dataset}: generated cells",
            figure="generation metrics (bars)",
        ),
        umap=report_item(
            "results/{dataset}/eval/generation_umap.png",
            "evaluate_generation_umap",
            EVALUATION,
            "{dataset}: generated cells",
            figure="UMAP real + generated",
        ),
    params:
        evaluate=config["evaluate"],
        cell_type=lambda wc: dataset_cfg(wc.dataset).get("cell_type"),
        condition_columns=lambda wc: [
            col
            for cond in dataset_cfg(wc.dataset).get("conditions", [])
            for col in cond["columns"] + cond["continuous"]
        ],
        seed=config["seed"],
    log:
        "logs/{dataset}/evaluate_generation.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_generation.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        **cpu_resources(),
    script:
        "../../scripts/evaluate_generation.py"


# only for datasets with datasets.<name>.split.holdout (all_input asks for it then)
rule evaluate_prediction:
    input:
        qc=rules.qc.output.h5ad,
        samples=rules.diffusion_sample.output.samples,
    output:
        table=report_item(
            "results/{dataset}/eval/prediction.tsv",
            "evaluate_prediction_table",
            EVALUATION,
            "{dataset}: held-out conditions",
            figure="prediction metrics (table)",
        ),
        json="results/{dataset}/eval/prediction.json",
        scatter=report_item(
            "results/{dataset}/eval/prediction_scatter.png",
            "evaluate_prediction_scatter",
            EVALUATION,
            "{dataset}: held-out conditions",
            figure="predicted vs real means",
        ),
    params:
        evaluate=config["evaluate"],
        holdout=lambda wc: dataset_cfg(wc.dataset)["split"]["holdout"],
        conditions=lambda wc: dataset_cfg(wc.dataset)["conditions"],
        seed=config["seed"],
    log:
        "logs/{dataset}/evaluate_prediction.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_prediction.tsv"
    conda:
        "../../envs/evaluate.yaml"
    resources:
        **cpu_resources(),
    script:
        "../../scripts/evaluate_prediction.py"
