# Diffusion stage: a conditional DiT trained on the train split, over the Xpressor latent tokens
# (token_space: latent) or over all genes through a learned encoder/decoder (token_space: gene),
# then samples decoded to expression with their condition labels, and a guidance check.


# filtered.h5ad always; the Xpressor latents, checkpoint and gene vocabulary in the latent space.
DIFFUSION_INPUTS = {"h5ad": rules.qc.output.h5ad}
if config["diffusion"]["token_space"] == "latent":
    DIFFUSION_INPUTS.update(
        latents=rules.xpressor_encode.output.latents,
        xpressor=rules.xpressor_train.output.ckpt,
        vocab=vocab_path(),  # the Xpressor's own vocabulary (an SE model folder's, when set)
    )


rule diffusion_train:
    input:
        **DIFFUSION_INPUTS,
    output:
        ckpt="results/{dataset}/diffusion/model.ckpt",
    params:
        # training depends on everything but the sampling settings
        settings={k: v for k, v in config["diffusion"].items() if k not in ("sample", "enabled")},
        conditions=lambda wc: dataset_cfg(wc.dataset)["conditions"],
        work_dir=lambda wc: f"results/{wc.dataset}/diffusion/train",
        seed=config["seed"],
        device=config["device"],
    log:
        "logs/{dataset}/diffusion_train.log",
    benchmark:
        "results/{dataset}/benchmarks/diffusion_train.tsv"
    conda:
        torch_env()
    threads: 2
    resources:
        **training_gpu_resources("diffusion", "diffusion.trainer"),
    script:
        "../../scripts/diffusion_train.py"


rule diffusion_sample:
    input:
        **DIFFUSION_INPUTS,
        ckpt=rules.diffusion_train.output.ckpt,
    output:
        samples="results/{dataset}/diffusion/samples.h5ad",
        summary=report_item(
            "results/{dataset}/diffusion/summary.json",
            "diffusion_summary",
            "5. Diffusion",
            figure="guidance check",
        ),
    params:
        # batch_size is read by the script from the config: not a re-run trigger
        sample={k: v for k, v in config["diffusion"]["sample"].items() if k != "batch_size"},
        seed=config["seed"],
        device=config["device"],
    log:
        "logs/{dataset}/diffusion_sample.log",
    benchmark:
        "results/{dataset}/benchmarks/diffusion_sample.tsv"
    conda:
        torch_env()
    threads: 2
    resources:
        **inference_gpu_resources("diffusion"),
    script:
        "../../scripts/diffusion_sample.py"
