# Evaluation: every stage measured beside its baselines on the same cells (spec: evaluation.md).


rule evaluate_embeddings:
    input:
        qc="results/{dataset}/qc/filtered.h5ad",
        se="results/{dataset}/embed/se.h5ad",
        random="results/{dataset}/embed/random.h5ad",
        xpressor="results/{dataset}/xpressor/embedding.h5ad",
    output:
        table=report(
            "results/{dataset}/eval/embeddings.tsv",
            caption="../report/evaluate_embeddings_table.rst",
            category="6. Evaluation",
            subcategory="{dataset}: embeddings",
            labels={"dataset": "{dataset}", "figure": "embedding metrics (table)"},
        ),
        json=report(
            "results/{dataset}/eval/embeddings.json",
            caption="../report/evaluate_embeddings_json.rst",
            category="6. Evaluation",
            subcategory="{dataset}: embeddings",
            labels={"dataset": "{dataset}", "figure": "embeddings summary (JSON)"},
        ),
        bars=report(
            "results/{dataset}/eval/embeddings_metrics.png",
            caption="../report/evaluate_embeddings_bars.rst",
            category="6. Evaluation",
            subcategory="{dataset}: embeddings",
            labels={"dataset": "{dataset}", "figure": "embedding metrics (bars)"},
        ),
        umap=report(
            "results/{dataset}/eval/embeddings_umap.png",
            caption="../report/evaluate_embeddings_umap.rst",
            category="6. Evaluation",
            subcategory="{dataset}: embeddings",
            labels={"dataset": "{dataset}", "figure": "UMAPs"},
        ),
    log:
        "logs/{dataset}/evaluate_embeddings.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_embeddings.tsv",
    params:
        evaluate=config["evaluate"],
        cell_type=lambda wc: dataset_cfg(wc.dataset).get("cell_type"),
        batch=lambda wc: dataset_cfg(wc.dataset).get("batch"),
        seed=config["seed"],
    resources:
        **cpu_resources(),
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../../scripts/evaluate_embeddings.py"


rule evaluate_xpressor:
    input:
        qc="results/{dataset}/qc/filtered.h5ad",
        summary="results/{dataset}/xpressor/summary.json",
        table="results/{dataset}/xpressor/reconstruction.tsv",
        model="results/{dataset}/xpressor/model.ckpt",
        latents="results/{dataset}/xpressor/latents.npy",
        vocab=vocab_path(),
    output:
        table=report(
            "results/{dataset}/eval/reconstruction.tsv",
            caption="../report/evaluate_reconstruction_table.rst",
            category="6. Evaluation",
            subcategory="{dataset}: Xpressor reconstruction",
            labels={"dataset": "{dataset}", "figure": "reconstruction metrics (table)"},
        ),
        json=report(
            "results/{dataset}/eval/reconstruction.json",
            caption="../report/evaluate_reconstruction_json.rst",
            category="6. Evaluation",
            subcategory="{dataset}: Xpressor reconstruction",
            labels={"dataset": "{dataset}", "figure": "reconstruction summary (JSON)"},
        ),
        bars=report(
            "results/{dataset}/eval/reconstruction_metrics.png",
            caption="../report/evaluate_reconstruction_bars.rst",
            category="6. Evaluation",
            subcategory="{dataset}: Xpressor reconstruction",
            labels={"dataset": "{dataset}", "figure": "reconstruction metrics (bars)"},
        ),
        scatter=report(
            "results/{dataset}/eval/reconstruction_scatter.png",
            caption="../report/evaluate_reconstruction_scatter.rst",
            category="6. Evaluation",
            subcategory="{dataset}: Xpressor reconstruction",
            labels={"dataset": "{dataset}", "figure": "decoded vs observed"},
        ),
    log:
        "logs/{dataset}/evaluate_xpressor.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_xpressor.tsv",
    params:
        evaluate=config["evaluate"],
        device=config["device"],
        seed=config["seed"],
    resources:
        **cpu_resources(),
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../../scripts/evaluate_xpressor.py"


rule evaluate_generation:
    input:
        qc="results/{dataset}/qc/filtered.h5ad",
        samples="results/{dataset}/diffusion/samples.h5ad",
        # latent space: the real test cells' latents, decoded as samples are (the ceiling row)
        **{k: v for k, v in DIFFUSION_INPUTS.items() if k != "h5ad"},
    output:
        table=report(
            "results/{dataset}/eval/generation.tsv",
            caption="../report/evaluate_generation_table.rst",
            category="6. Evaluation",
            subcategory="{dataset}: generated cells",
            labels={"dataset": "{dataset}", "figure": "generation metrics (table)"},
        ),
        json=report(
            "results/{dataset}/eval/generation.json",
            caption="../report/evaluate_generation_json.rst",
            category="6. Evaluation",
            subcategory="{dataset}: generated cells",
            labels={"dataset": "{dataset}", "figure": "generation summary (JSON)"},
        ),
        bars=report(
            "results/{dataset}/eval/generation_metrics.png",
            caption="../report/evaluate_generation_bars.rst",
            category="6. Evaluation",
            subcategory="{dataset}: generated cells",
            labels={"dataset": "{dataset}", "figure": "generation metrics (bars)"},
        ),
        umap=report(
            "results/{dataset}/eval/generation_umap.png",
            caption="../report/evaluate_generation_umap.rst",
            category="6. Evaluation",
            subcategory="{dataset}: generated cells",
            labels={"dataset": "{dataset}", "figure": "UMAP real + generated"},
        ),
    log:
        "logs/{dataset}/evaluate_generation.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_generation.tsv",
    params:
        evaluate=config["evaluate"],
        cell_type=lambda wc: dataset_cfg(wc.dataset).get("cell_type"),
        condition_columns=lambda wc: [
            col
            for cond in dataset_cfg(wc.dataset).get("conditions", [])
            for col in cond["columns"] + cond.get("continuous", [])
        ],
        seed=config["seed"],
    resources:
        **cpu_resources(),
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../../scripts/evaluate_generation.py"


rule evaluate_prediction:
    # only for datasets with datasets.<name>.split.holdout (all_input asks for it then)
    input:
        qc="results/{dataset}/qc/filtered.h5ad",
        samples="results/{dataset}/diffusion/samples.h5ad",
    output:
        table=report("results/{dataset}/eval/prediction.tsv", caption="../report/evaluate_prediction_table.rst", category="6. Evaluation", subcategory="{dataset}: held-out conditions", labels={"dataset": "{dataset}", "figure": "prediction metrics (table)"}),
        json="results/{dataset}/eval/prediction.json",
        scatter=report("results/{dataset}/eval/prediction_scatter.png", caption="../report/evaluate_prediction_scatter.rst", category="6. Evaluation", subcategory="{dataset}: held-out conditions", labels={"dataset": "{dataset}", "figure": "predicted vs real means"}),
    log:
        "logs/{dataset}/evaluate_prediction.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_prediction.tsv",
    params:
        evaluate=config["evaluate"],
        holdout=lambda wc: dataset_cfg(wc.dataset)["split"]["holdout"],
        conditions=lambda wc: dataset_cfg(wc.dataset)["conditions"],
        seed=config["seed"],
    resources:
        **cpu_resources(),
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../../scripts/evaluate_prediction.py"
