"""The diffusion stage's rule entry points: `run_diffusion_train` (the conditional denoiser on the
train split -> model.ckpt) and `run_diffusion_sample` (generated cells -> samples.h5ad and
summary.json with the guidance check). Token spaces, data and model: see the package's other
modules."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cellfoundry.diffusion.data import DiffusionDataModule, read_training_data
from cellfoundry.diffusion.module import DiffusionModule, load_diffusion, save_diffusion
from cellfoundry.diffusion.sample import (
    control_sources,
    default_request_obs,
    draw_library_sizes,
    gene_space_decoder,
    generate_tokens,
    library_factors,
    requests_to_obs,
    samples_obs,
    write_samples,
)
from cellfoundry.evaluate.generation import (
    GUIDANCE_CHECK_MAX_CELLS,
    GuidanceClassifier,
    guidance_check,
    guidance_check_condition,
    subsample,
)
from cellfoundry.utils import (
    UserError,
    atomic_output,
    log1p_normalise,
    start_stage,
)
from cellfoundry.xpressor.decode import predict_means, xpressor_decoder

log = logging.getLogger(__name__)


def run_diffusion_train(
    h5ad: str | os.PathLike,
    checkpoint: str | os.PathLike,
    work_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    conditions: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    device: str,
    threads: int | None = None,
    latents: str | os.PathLike | None = None,
    xpressor_checkpoint: str | os.PathLike | None = None,
) -> None:
    """Train the conditional denoiser on the train split of `h5ad` (QC's filtered.h5ad; with
    `latents`, Xpressor's latents.npy, in the latent token space) and write `checkpoint` (EMA
    weights; it records the SHA-256 of `xpressor_checkpoint`).

    Lightning writes `work_dir`/checkpoints/last.ckpt (a re-run with the same settings resumes
    from it, exactly) and the loss to `work_dir`/logs/version_<attempt>/metrics.csv (one per
    attempt, cellfoundry.trainer.read_metrics gathers them). Under DDP every rank runs
    this function; only global rank 0 writes `checkpoint`."""
    from cellfoundry.trainer import build_trainer, fit
    from cellfoundry.utils import file_sha256

    device = start_stage(seed, device, threads)
    settings = dict(settings)
    data = read_training_data(h5ad, settings["token_space"], conditions, latents)
    log.info(
        "diffusion over %s tokens: %d training cells, x0 shape %s, conditions %s",
        settings["token_space"],
        len(data["x0"]),
        list(data["x0"].shape[1:]),
        data["codec"].names or "none (unconditional model)",
    )
    module = DiffusionModule(settings, data["codec"].to_dict(), list(data["x0"].shape[1:]))
    recipe = settings["train"]
    trainer_cfg = settings["trainer"]
    trainer = build_trainer(
        work_dir,
        max_steps=recipe["max_steps"],
        devices=trainer_cfg["devices"],
        num_nodes=trainer_cfg["num_nodes"],
        device=device,
        checkpoint_every_n_steps=trainer_cfg["checkpoint_every_n_steps"],
        gradient_clip_val=recipe["gradient_clip"],
        log_every_n_steps=recipe["log_every_n_steps"],
    )
    # resumed only by a run of the same model on the same data (the hyperparameters of both)
    fit(trainer, module, datamodule=DiffusionDataModule(data, recipe["batch_size"], seed), out_dir=work_dir)
    if trainer.is_global_zero:
        extra = {"xpressor_sha256": file_sha256(xpressor_checkpoint) if xpressor_checkpoint else None}
        save_diffusion(checkpoint, module, data, extra)
        log.info("wrote %s", checkpoint)


def run_diffusion_sample(
    checkpoint: str | os.PathLike,
    h5ad: str | os.PathLike,
    samples: str | os.PathLike,
    summary: str | os.PathLike,
    settings: Mapping[str, Any],
    *,
    seed: int,
    device: str,
    threads: int | None = None,
    xpressor_checkpoint: str | os.PathLike | None = None,
    vocab: str | os.PathLike | None = None,
    latents: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict:
    """Generate cells from the diffusion `checkpoint` (default: the test split's condition labels
    of `h5ad`), decode them to expression (latent space: the Xpressor decoder of
    `xpressor_checkpoint` over the gene vectors of `vocab`), write `samples` (samples.h5ad) and
    measure whether guidance matters (`summary`, summary.json; returned). `settings` is the
    diffusion.sample section; `config` (default {"sample": settings}) goes into the provenance
    record of samples.h5ad."""
    from cellfoundry.provenance import KEY as PROVENANCE_KEY
    from cellfoundry.provenance import provenance

    device = start_stage(seed, device, threads)
    ckpt = load_diffusion(checkpoint)
    codec, model_settings = ckpt.codec, ckpt.settings
    cells = ad.read_h5ad(h5ad, backed="r")  # obs, and the counts of the guidance check's rows
    var_names = ckpt.payload["var_names"]
    if list(map(str, cells.var_names)) != list(var_names):
        raise UserError(f"{checkpoint} was trained on other genes than {h5ad}; re-run diffusion_train.")
    holdout = "holdout" in cells.obs and cells.obs["holdout"].astype(bool).any()
    if settings["requests"]:
        request_obs = requests_to_obs(settings["requests"], codec)
        strict = True
    else:
        request_obs = default_request_obs(cells.obs, codec)
        # a test-only label (never seen in training) is sampled unconditionally; a held-out
        # combination's parts are all seen in training (QC checks), so an unknown one is an error
        strict = holdout
    latent_space = model_settings["token_space"] == "latent"
    if latent_space:
        if xpressor_checkpoint is None or vocab is None:
            raise ValueError("latent token space needs the Xpressor checkpoint and the vocabulary")
        decoder = xpressor_decoder(xpressor_checkpoint, vocab, var_names)
    else:
        decoder = gene_space_decoder

    # held-out combinations are edited from real control cells, or drawn from noise like any request
    edit = holdout and not settings["requests"] and settings["heldout_from"] == "control"
    if edit:
        none_values = {col: s.none_value for s in codec.specs if s.none_value is not None for col in s.columns}
        source_rows = control_sources(cells.obs, request_obs, none_values, np.random.default_rng(seed))
        unique, inverse = np.unique(source_rows, return_inverse=True)
        source_counts = sp.csr_matrix(cells.X[unique], dtype=np.float32)[inverse]
        source_tokens = (
            np.asarray(np.load(latents, mmap_mode="r")[source_rows], dtype=np.float32)
            if latent_space
            else log1p_normalise(source_counts)
        )
        source_obs = cells.obs.iloc[source_rows][codec.columns].reset_index(drop=True)
        source_library = np.asarray(source_counts.sum(1), dtype=np.float32).ravel()
        source_library *= library_factors(cells.obs, request_obs, none_values)

    def generate(scale: float, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(generated tokens, library sizes) of the requested cells `at` (rows of request_obs) at
        guidance `scale`; an edited cell has its source cell's library size times the stimulus's
        library factor."""
        requests = request_obs.iloc[at].reset_index(drop=True)
        tokens = generate_tokens(
            ckpt,
            requests,
            guidance_scale=scale,
            sampler=settings["sampler"],
            steps=settings["steps"],
            eta=settings["eta"],
            seed=seed,
            batch_size=settings["batch_size"],
            device=device,
            strict=strict,
            clip_x0=settings["clip_x0"],
            sources=(source_tokens[at], source_obs.iloc[at]) if edit else None,
        )
        if edit:
            return tokens, source_library[at]
        return tokens, draw_library_sizes(requests, ckpt.payload, np.random.default_rng(seed))

    scale = float(settings["heldout_guidance_scale" if edit else "guidance_scale"])
    log.info(
        "%s %d cells (%s, %d steps, eta %.2f, guidance %.2f)",
        "editing real control cells into" if edit else "sampling",
        len(request_obs),
        "DDIM inversion" if edit else settings["sampler"],
        settings["steps"],
        0.0 if edit else settings["eta"],
        scale,
    )
    tokens, library = generate(scale, np.arange(len(request_obs)))
    spec = guidance_check_condition(codec) if settings["guidance_check"] else None
    # the check's classifier labels the guided cells' decoded means as they are written
    classifier = GuidanceClassifier.fit(cells, spec, seed) if spec is not None else None
    guided_labels = []
    record = provenance(
        "diffusion_sample",
        config if config is not None else {"sample": settings},
        checkpoints={"diffusion": checkpoint, "xpressor": xpressor_checkpoint if latent_space else None},
        vocab=vocab if latent_space else None,
        inputs={"cells": h5ad},
    )
    log.info("decoding %d cells over %d genes into %s", len(tokens), len(var_names), samples)
    with atomic_output(samples) as tmp:
        write_samples(
            tmp,
            decoder(tokens, library, seed),
            samples_obs(request_obs, codec, library, cells.obs_names[source_rows] if edit else None),
            var_names,
            {PROVENANCE_KEY: record},
            on_batch=(lambda batch: guided_labels.append(classifier.predict(batch.mean))) if classifier else None,
        )
    result: dict[str, Any] = {
        "n_samples": len(request_obs),
        "token_space": model_settings["token_space"],
        "sampler": settings["sampler"],
        "steps": int(settings["steps"]),
        "eta": float(settings["eta"]),
        "guidance_scale": scale,
        "conditions": codec.names,
        "requests": "config" if settings["requests"] else "held-out combinations" if holdout else "test split labels",
        "start": "real control cells (DDIM inversion)" if edit else "noise",
    }
    if classifier is not None:
        # the other scales on a seeded subsample of the requests (the check is a fraction)
        rows = subsample(np.arange(len(request_obs)), GUIDANCE_CHECK_MAX_CELLS, np.random.default_rng(seed))
        checked = request_obs.iloc[rows].reset_index(drop=True)
        runs = {f"guided (scale {scale:g})": (np.concatenate(guided_labels)[rows], tokens[rows])}
        for s, name in ((1.0, "conditional (scale 1)"), (0.0, "unconditional (scale 0)")):
            if s != scale:
                log.info("guidance check: sampling %d cells at scale %g", len(checked), s)
                t, lib = generate(s, rows)
                runs[name] = (predict_means(decoder(t, lib, seed, with_counts=False), classifier.predict), t)
        real_latents = np.load(latents, mmap_mode="r") if latents is not None and latent_space else None
        result["guidance_check"] = guidance_check(classifier, checked, runs, seed, real_latents, decoder)
    with atomic_output(summary) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result
