"""The diffusion stage's model: the conditional denoiser built from settings, its training
LightningModule (ε/v loss, condition dropout for classifier-free guidance, EMA weights) and
the model.ckpt save/load pair."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from cellfoundry.checkpoints import load_stage_checkpoint, save_checkpoint
from cellfoundry.diffusion.data import Normalizer
from cellfoundry.diffusion.process import EMA, NoiseSchedule, diffusion_loss
from cellfoundry.models.conditions import ConditionCodec, ConditionModel
from cellfoundry.models.denoiser import ConditionalDenoiser
from cellfoundry.models.dit import DiTConfig, GeneDiT, LatentDiT
from cellfoundry.utils import UserError

CHECKPOINT_FORMAT = "cellfoundry-diffusion/1"


def build_denoiser(
    settings: Mapping[str, Any], codec: ConditionCodec, token_shape: Sequence[int]
) -> ConditionalDenoiser:
    """The ConditionalDenoiser for the token space (token_shape = [M, D] latent or [G] gene).
    `settings`: the config's `diffusion` section (the DiT's own field names hidden / depth / heads
    are mapped from its d_model / n_layers / n_heads)."""
    cross = bool(settings["cross_attention"])
    if settings["token_space"] == "latent":
        num_tokens, token_dim = token_shape
    else:
        num_tokens, token_dim = settings["gene_tokens"], settings["gene_token_dim"]
    cfg = DiTConfig(
        num_tokens=int(num_tokens),
        token_dim=int(token_dim),
        hidden=settings["d_model"],
        depth=settings["n_layers"],
        heads=settings["n_heads"],
        mlp_ratio=settings["mlp_ratio"],
        cross_attention=cross,
    )
    net = (
        LatentDiT(cfg)
        if settings["token_space"] == "latent"
        else GeneDiT(cfg, int(token_shape[0]), settings["gene_encoder_hidden"])
    )
    return ConditionalDenoiser(net, ConditionModel(codec, settings["d_model"]), cross)


def make_schedule(settings: Mapping[str, Any]) -> NoiseSchedule:
    return NoiseSchedule(settings["schedule"], settings["timesteps"])


class DiffusionModule(pl.LightningModule):
    """Training of the conditional denoiser: MSE on ε or v, conditions dropped with probability
    cond_drop_prob (per condition and cell) for classifier-free guidance, EMA weights. `settings`:
    the config's `diffusion` section; the recipe is its `train` part."""

    #: Hyperparameters a resumed run may change: the step budget (training can be extended), the
    #: logging cadence and the devices.
    RESUMABLE_CHANGES = ("settings.train.max_steps", "settings.train.log_every_n_steps", "settings.trainer")

    def __init__(self, settings: dict, codec: dict, token_shape: list[int]):
        super().__init__()
        self.save_hyperparameters()
        self.settings = settings
        self.model = build_denoiser(settings, ConditionCodec.from_dict(codec), token_shape)
        self.ema = EMA(self.model, settings["train"]["ema_decay"])
        self.schedule = make_schedule(settings)

    def training_step(self, batch, batch_idx):
        x0, cond = batch
        k = self.model.conditions.n_conditions
        keep = torch.rand(x0.shape[0], k, device=x0.device) >= self.settings["train"]["cond_drop_prob"] if k else None
        loss = diffusion_loss(lambda x, t: self.model(x, t, cond, keep), x0, self.schedule, self.settings["prediction"])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: a checkpoint saved after this step (ModelCheckpoint's
        # hook runs before the module's) must hold the EMA of this step's weights. Lightning
        # counts the step after this hook, so + 1: the steps taken, as the EMA warm-up expects
        self.ema.update(self.model, self.global_step + 1)

    def configure_optimizers(self):
        recipe = self.settings["train"]
        return torch.optim.AdamW(self.model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])


def save_diffusion(path: str | os.PathLike, module: DiffusionModule, data: dict, extra: Mapping[str, Any]) -> None:
    """model.ckpt: EMA weights of the denoiser, settings, condition vocabularies, normalisation
    statistics, train library sizes with their condition labels (plain tensors and Python values,
    loadable with weights_only=True)."""
    train_obs = data["train_obs"].astype(object).where(data["train_obs"].notna(), None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "settings": dict(module.settings),
        "codec": data["codec"].to_dict(),
        "token_shape": list(data["x0"].shape[1:]),
        "normalizer": data["normalizer"].to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in module.ema.shadow.state_dict().items()},
        "library": torch.from_numpy(data["library"]),
        "x0_range": [torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32)) for r in data["x0_range"]],
        "train_labels": {c: [None if v is None else str(v) for v in train_obs[c]] for c in train_obs.columns},
        "var_names": data["var_names"],
        **dict(extra),
    }
    save_checkpoint(path, payload)


@dataclass
class DiffusionCheckpoint:
    model: ConditionalDenoiser
    settings: dict
    codec: ConditionCodec
    normalizer: Normalizer
    payload: dict


def load_diffusion(path: str | os.PathLike, map_location: str = "cpu") -> DiffusionCheckpoint:
    payload = load_stage_checkpoint(path, CHECKPOINT_FORMAT, "diffusion", "diffusion_train", map_location)
    if "d_model" not in payload["settings"]:  # written before the config keys were renamed (issue 15)
        raise UserError(
            f"diffusion checkpoint {path} was written with the old config keys (diffusion.hidden, depth, "
            "heads); retrain it (snakemake --forcerun diffusion_train)."
        )
    codec = ConditionCodec.from_dict(payload["codec"])
    model = build_denoiser(payload["settings"], codec, payload["token_shape"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return DiffusionCheckpoint(model, payload["settings"], codec, Normalizer.from_dict(payload["normalizer"]), payload)
