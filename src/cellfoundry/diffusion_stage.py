"""The diffusion stage: data of the two token spaces, the LightningModule, the diffusion
checkpoint, sampling to samples.h5ad and the guidance check.

Token spaces (config `diffusion.token_space`):
- latent: x_0 = Xpressor latent tokens [N, M, D] of each cell, standardised per (token, channel)
  with statistics of the training cells; samples are decoded by the Xpressor decoder.
- gene: x_0 = log1p(CP10k) expression [N, G], standardised per gene; the GeneDiT encodes it to
  tokens and decodes back to genes.

Decoded cells: `layers["mean"]` holds the mean counts of the decoded distribution for a library
size drawn per cell from training cells with the same condition labels; `X` holds counts sampled
from it (NB/ZINB for an Xpressor count decoder, Poisson otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from cellfoundry.diffusion import (
    EMA,
    ConditionalDenoiser,
    NoiseSchedule,
    RateLogger,
    diffusion_loss,
    guided_denoise_fn,
    sample,
)
from cellfoundry.models.conditions import ConditionCodec, ConditionModel, ConditionSpec, collate_conditions
from cellfoundry.models.dit import DiTConfig, GeneDiT, LatentDiT
from cellfoundry.utils import UserError, atomic_output

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cellfoundry-diffusion/1"
TARGET_SUM = 1e4


# -- data ----------------------------------------------------------------------------------------


def counts_matrix(adata: ad.AnnData) -> sp.csr_matrix:
    """Raw counts [N, G] as float32 CSR (X, per the data contract)."""
    x = adata.X
    return sp.csr_matrix(x, dtype=np.float32) if not sp.issparse(x) else x.tocsr().astype(np.float32)


def log1p_cp10k(counts: sp.csr_matrix | np.ndarray) -> np.ndarray:
    """Counts [N, G] -> log1p(counts / total * 1e4) dense float32 [N, G]."""
    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts, dtype=np.float32)
    total = dense.sum(1, keepdims=True)
    return np.log1p(dense / np.maximum(total, 1.0) * TARGET_SUM).astype(np.float32)


@dataclass
class Normalizer:
    """x_0 = (x - mean) / std with statistics of the training cells (mean, std shaped like a cell)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, min_std: float) -> "Normalizer":
        return cls(x.mean(0).astype(np.float32), np.maximum(x.std(0), min_std).astype(np.float32))

    def forward(self, x):
        return (x - self.mean) / self.std

    def inverse(self, x):
        return x * self.std + self.mean

    def to_dict(self):
        return {"mean": torch.from_numpy(self.mean), "std": torch.from_numpy(self.std)}

    @classmethod
    def from_dict(cls, d):
        return cls(d["mean"].numpy(), d["std"].numpy())


class CellDataset(Dataset):
    """(x_0 [*shape] float32, condition arrays of the cell) for the training cells."""

    def __init__(self, x0: np.ndarray, conditions: Mapping[str, np.ndarray]):
        self.x0 = x0
        self.conditions = dict(conditions)

    def __len__(self):
        return len(self.x0)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(self.x0[i], dtype=np.float32)), {k: torch.as_tensor(v[i]) for k, v in self.conditions.items()}


def condition_specs(dataset_conditions: Sequence[Mapping[str, Any]]) -> list[ConditionSpec]:
    keys = ("name", "kind", "columns", "continuous", "delimiter", "none_value", "guidance_scale")
    specs = [ConditionSpec(**{k: c[k] for k in keys if k in c}) for c in dataset_conditions]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"condition names must be unique within a dataset; got {names}.")
    return specs


def read_training_data(
    filtered_h5ad: str | os.PathLike,
    token_space: str,
    conditions: Sequence[Mapping[str, Any]],
    latents_npy: str | os.PathLike | None = None,
) -> dict:
    """Everything training needs from the stage inputs.

    Returns dict with x0 (train cells, normalised, [n, M, D] or [n, G]), normalizer, codec,
    arrays (condition arrays of the train cells), obs (obs of all cells), var_names, library
    (train library sizes [n]) and train_obs (condition columns of the train cells).
    """
    adata = ad.read_h5ad(filtered_h5ad)
    if "split" not in adata.obs:
        raise UserError(f"{filtered_h5ad} has no obs['split']; re-run the qc rule.")
    train = (adata.obs["split"].astype(str) == "train").to_numpy()
    if train.sum() < 2:
        raise UserError(f"{filtered_h5ad} has fewer than 2 training cells; lower qc.test_fraction or use more cells.")
    counts = counts_matrix(adata)
    library = np.asarray(counts.sum(1)).ravel()
    if token_space == "latent":
        if latents_npy is None:
            raise ValueError("latent token space needs xpressor/latents.npy")
        latents = np.load(latents_npy, mmap_mode="r")
        if latents.shape[0] != adata.n_obs:
            raise UserError(
                f"{latents_npy} has {latents.shape[0]} cells but {filtered_h5ad} has {adata.n_obs}; "
                "re-run the xpressor rules (snakemake --forcerun xpressor_train)."
            )
        x = np.asarray(latents[train], dtype=np.float32)
    elif token_space == "gene":
        x = log1p_cp10k(counts[train])
    else:
        raise UserError(f"diffusion.token_space must be latent or gene, not {token_space!r}.")
    normalizer = Normalizer.fit(x, min_std=1e-3 if token_space == "latent" else 0.1)
    x0 = normalizer.forward(x).astype(np.float32)
    specs = condition_specs(conditions)
    train_obs = adata.obs.loc[train, [c for s in specs for c in s.all_columns]] if specs else adata.obs.loc[train, []]
    codec = ConditionCodec.fit(specs, train_obs)
    arrays = codec.encode(train_obs, strict=True)
    return dict(
        x0=x0,
        # Sampling clips x̂_0 to the training range widened by 10% (see diffusion.sample).
        x0_range=(x0.min(0) - 0.1 * np.ptp(x0, 0), x0.max(0) + 0.1 * np.ptp(x0, 0)),
        normalizer=normalizer,
        codec=codec,
        arrays=arrays,
        obs=adata.obs,
        var_names=list(map(str, adata.var_names)),
        library=library[train].astype(np.float32),
        train_obs=train_obs,
    )


# -- model ---------------------------------------------------------------------------------------


def build_denoiser(settings: Mapping[str, Any], codec: ConditionCodec, token_shape: Sequence[int]) -> ConditionalDenoiser:
    """The ConditionalDenoiser for the token space (token_shape = [M, D] latent or [G] gene)."""
    cross = bool(settings["cross_attention"])
    if settings["token_space"] == "latent":
        num_tokens, token_dim = token_shape
    else:
        num_tokens, token_dim = settings["gene_tokens"], settings["gene_token_dim"]
    cfg = DiTConfig(
        num_tokens=int(num_tokens),
        token_dim=int(token_dim),
        hidden=settings["hidden"],
        depth=settings["depth"],
        heads=settings["heads"],
        mlp_ratio=settings["mlp_ratio"],
        cross_attention=cross,
    )
    net = LatentDiT(cfg) if settings["token_space"] == "latent" else GeneDiT(cfg, int(token_shape[0]), settings["gene_encoder_hidden"])
    return ConditionalDenoiser(net, ConditionModel(codec, settings["hidden"]), cross)


def make_schedule(settings: Mapping[str, Any]) -> NoiseSchedule:
    return NoiseSchedule(settings["schedule"], settings["timesteps"])


class DiffusionModule(pl.LightningModule):
    """Training of the conditional denoiser: MSE on ε or v, conditions dropped with probability
    cond_drop_prob (per condition and cell) for classifier-free guidance, EMA weights."""

    def __init__(self, settings: dict, codec: dict, token_shape: list[int]):
        super().__init__()
        self.save_hyperparameters()
        self.settings = settings
        self.model = build_denoiser(settings, ConditionCodec.from_dict(codec), token_shape)
        self.ema = EMA(self.model, settings["ema_decay"])
        self.schedule = make_schedule(settings)

    def training_step(self, batch, batch_idx):
        x0, cond = batch
        k = self.model.conditions.n_conditions
        keep = torch.rand(x0.shape[0], k, device=x0.device) >= self.settings["cond_drop_prob"] if k else None
        loss = diffusion_loss(lambda x, t: self.model(x, t, cond, keep), x0, self.schedule, self.settings["prediction"])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def on_train_start(self):
        self._rate_start = (time.perf_counter(), self.global_step)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: a checkpoint saved after this step (ModelCheckpoint's
        # hook runs before the module's) must hold the EMA of this step's weights. Lightning
        # counts the step after this hook, so + 1: the steps taken, as the EMA warm-up expects
        self.ema.update(self.model, self.global_step + 1)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # a rate line in the rule's log (Lightning's progress bar goes to stderr only)
        every = self.settings["log_every_n_steps"]
        if self.global_step % every == 0 and self.trainer.is_global_zero:
            start, first = self._rate_start
            rate = (self.global_step - first) / max(time.perf_counter() - start, 1e-9)
            loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
            log.info("step %d/%d train_loss %.4f (%.1f steps/s)", self.global_step, self.trainer.max_steps, loss, rate)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.settings["lr"], weight_decay=self.settings["weight_decay"])


def train_loader(data: dict, batch_size: int, seed: int) -> DataLoader:
    """Shuffled full batches that cellfoundry.train.fit resumes exactly."""
    from cellfoundry.train import resumable_loader

    dataset = CellDataset(data["x0"], data["arrays"])
    return resumable_loader(dataset, min(batch_size, len(dataset)), seed, drop_last=True)


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
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


@dataclass
class DiffusionCheckpoint:
    model: ConditionalDenoiser
    settings: dict
    codec: ConditionCodec
    normalizer: Normalizer
    payload: dict


def load_diffusion(path: str | os.PathLike, map_location: str = "cpu") -> DiffusionCheckpoint:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a cellfoundry diffusion checkpoint; re-run diffusion_train.")
    codec = ConditionCodec.from_dict(payload["codec"])
    model = build_denoiser(payload["settings"], codec, payload["token_shape"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return DiffusionCheckpoint(model, payload["settings"], codec, Normalizer.from_dict(payload["normalizer"]), payload)


# -- sampling ------------------------------------------------------------------------------------


def requests_to_obs(requests: Sequence[Mapping[str, Any]], codec: ConditionCodec) -> pd.DataFrame:
    """Config sampling requests [{n, obs: {column: value}}] -> one obs row per cell to generate.
    Columns not given are missing (the model is unconditional in that attribute)."""
    rows = []
    known = set(codec.columns)
    for req in requests:
        values = dict(req.get("obs", {}))
        unknown_cols = set(values) - known
        if unknown_cols:
            raise UserError(
                f"diffusion.sample.requests names obs column(s) {sorted(unknown_cols)} that no condition uses; "
                f"condition columns: {sorted(known) or 'none (unconditional model)'}."
            )
        rows += [values] * int(req["n"])
    obs = pd.DataFrame(rows, index=range(len(rows)))
    for col in codec.columns:
        if col not in obs.columns:
            obs[col] = None
    return obs.reset_index(drop=True)


def default_request_obs(obs: pd.DataFrame, codec: ConditionCodec) -> pd.DataFrame:
    """The condition labels of the test split (one generated cell per test cell); with held-out
    combinations (QC's obs["holdout"]), of the held-out cells only: the cells to predict."""
    test = obs[obs["split"].astype(str) == "test"]
    if "holdout" in obs and obs["holdout"].astype(bool).any():
        test = obs[obs["holdout"].astype(bool)]
    if len(test) == 0:
        raise UserError("the test split is empty; set diffusion.sample.requests or qc.test_fraction > 0.")
    out = pd.DataFrame(index=range(len(test)))
    for col in codec.columns:
        values = test[col].astype(object)
        out[col] = values.where(values.notna(), None).tolist()
    return out


def draw_library_sizes(request_obs: pd.DataFrame, payload: Mapping, rng: np.random.Generator) -> np.ndarray:
    """One library size per requested cell, drawn from training cells with the same labels in the
    requested (non-missing) columns; from all training cells when none match."""
    library = payload["library"].numpy()
    train = pd.DataFrame(payload["train_labels"]) if payload["train_labels"] else pd.DataFrame(index=range(len(library)))
    out = np.empty(len(request_obs), dtype=np.float32)
    cache: dict[tuple, np.ndarray] = {}
    for i in range(len(request_obs)):
        row = request_obs.iloc[i]
        items = tuple(
            (c, str(row[c])) for c in train.columns if c in row.index and row[c] is not None and not isinstance(row[c], (list, tuple, np.ndarray)) and not pd.isna(row[c])
        )
        if items not in cache:
            mask = np.ones(len(library), dtype=bool)
            for c, v in items:
                mask &= train[c].astype(str).to_numpy() == v
            cache[items] = library[mask] if mask.any() else library
        out[i] = rng.choice(cache[items])
    return out


def generate_tokens(
    ckpt: DiffusionCheckpoint,
    request_obs: pd.DataFrame,
    *,
    guidance_scale: float,
    sampler: str,
    steps: int,
    eta: float,
    seed: int,
    batch_size: int,
    device: str = "cpu",
    strict: bool = True,
    clip_x0: bool = True,
) -> np.ndarray:
    """Denoised, de-normalised tokens of the requested cells: [n, M, D] latent or [n, G] log1p.

    Per-attribute scales (condition `guidance_scale`) override `guidance_scale`.
    """
    arrays = ckpt.codec.encode(request_obs, strict=strict)
    scales = [s.guidance_scale if s.guidance_scale is not None else guidance_scale for s in ckpt.codec.specs]
    schedule = make_schedule(ckpt.settings)
    model = ckpt.model.to(device)
    shape = list(ckpt.payload["token_shape"])
    generator = torch.Generator(device=device).manual_seed(seed)
    x0_range = tuple(r.to(device) for r in ckpt.payload["x0_range"]) if clip_x0 else None
    n = len(request_obs)
    out = np.empty([n, *shape], dtype=np.float32)
    rate = RateLogger("cells", n)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        cond = {k: v.to(device) for k, v in collate_conditions(arrays, idx).items()}
        with autocast:
            x = sample(
                guided_denoise_fn(model, cond, scales),
                [len(idx), *shape],
                schedule,
                method=sampler,
                steps=steps,
                eta=eta,
                prediction=ckpt.settings["prediction"],
                generator=generator,
                device=device,
                x0_range=x0_range,
            )
        out[idx] = ckpt.normalizer.inverse(x.float().cpu().numpy())
        rate.update(len(idx))
    return out


@dataclass
class Decoded:
    mean: np.ndarray  # [n, G] expected counts
    counts: np.ndarray  # [n, G] sampled counts


def decode_gene_space(log1p_expr: np.ndarray, library: np.ndarray, rng: np.random.Generator) -> Decoded:
    """log1p(CP10k) [n, G] -> mean counts (fractions x library) and Poisson counts."""
    expr = np.expm1(np.clip(log1p_expr, 0.0, np.log1p(TARGET_SUM)))
    frac = expr / np.maximum(expr.sum(1, keepdims=True), 1e-8)
    mean = (frac * library[:, None]).astype(np.float32)
    return Decoded(mean, rng.poisson(mean).astype(np.float32))


def xpressor_decoder(xpressor_ckpt: str | os.PathLike, vocab_path: str | os.PathLike, var_names: Sequence[str]):
    """A function (latents [n, M, D], library [n], seed) -> Decoded over `var_names`, using the
    Xpressor decoder. Genes absent from the vocabulary cannot be decoded and stay zero."""
    from cellfoundry.models.xpressor import expected_counts, load_xpressor, sample_counts
    from cellfoundry.vocab import GeneVocab

    xp = load_xpressor(xpressor_ckpt)
    vocab = GeneVocab.load(vocab_path)
    index = vocab.index
    cols = np.array([i for i, g in enumerate(var_names) if g in index], dtype=np.int64)
    if len(cols) == 0:
        raise UserError(f"none of the dataset's genes is in the vocabulary {vocab_path}; check the gene symbols.")
    if len(cols) < len(var_names):
        log.warning("%d of %d genes are not in the vocabulary and are left at zero", len(var_names) - len(cols), len(var_names))
    gene_vectors = torch.as_tensor(vocab.table)[torch.as_tensor([index[var_names[i]] for i in cols])].float()
    model, loss = xp.model, xp.config.loss

    def decode(latents: np.ndarray, library: np.ndarray, seed: int, batch_size: int = 256) -> Decoded:
        n = len(latents)
        mean = np.zeros((n, len(var_names)), dtype=np.float32)
        counts = np.zeros_like(mean)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for s in range(0, n, batch_size):
                lat = torch.from_numpy(latents[s : s + batch_size]).float()
                lib = torch.from_numpy(library[s : s + batch_size]).float()
                out = model.decode(lat, gene_vectors)
                mean[s : s + len(lat), cols] = expected_counts(out, lib, loss).numpy()
                counts[s : s + len(lat), cols] = sample_counts(out, lib, loss, generator).numpy()
        return Decoded(mean, counts)

    return decode


def samples_anndata(decoded: Decoded, request_obs: pd.DataFrame, codec: ConditionCodec, var_names: Sequence[str], library: np.ndarray) -> ad.AnnData:
    """samples.h5ad: X = sampled counts (CSR float32), layers["mean"], obs = condition columns,
    obs["condition"] (readable label; obs["condition_label"] when a condition column is itself
    named "condition", e.g. Kang 2018's stimulus) and obs["library_size"]."""
    obs = pd.DataFrame(index=[f"sample_{i}" for i in range(len(request_obs))])
    for col in codec.columns:
        values = request_obs[col].tolist()
        values = ["+".join(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else v for v in values]
        obs[col] = pd.Categorical([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values])
    obs["condition_label" if "condition" in codec.columns else "condition"] = pd.Categorical(codec.labels(request_obs))
    obs["library_size"] = library.astype(np.float32)
    out = ad.AnnData(X=sp.csr_matrix(decoded.counts), obs=obs, var=pd.DataFrame(index=list(var_names)))
    out.layers["mean"] = decoded.mean
    return out


# -- guidance check ------------------------------------------------------------------------------


def fit_label_classifier(real_counts, labels: np.ndarray, seed: int, n_pcs: int = 50):
    """Logistic regression on PCA of log1p(CP10k) of real cells; returns predict(counts) -> labels."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = log1p_cp10k(real_counts)
    n_pcs = int(min(n_pcs, x.shape[0] - 1, x.shape[1]))
    clf = make_pipeline(StandardScaler(), PCA(n_pcs, random_state=seed), LogisticRegression(max_iter=2000))
    clf.fit(x, labels)
    return lambda counts: clf.predict(log1p_cp10k(counts))


def guidance_check_condition(codec: ConditionCodec) -> ConditionSpec | None:
    """The first categorical condition (the label the guidance check classifies)."""
    return next((s for s in codec.specs if s.kind == "categorical"), None)


def label_accuracy(predicted: np.ndarray, requested: pd.Series) -> float | None:
    """Fraction of cells whose predicted label equals the requested one (rows with a label)."""
    from cellfoundry.utils import unlabelled

    mask = ~unlabelled(requested.to_numpy(dtype=object))
    if not mask.any():
        return None
    return float(np.mean(predicted[mask] == requested.astype(str).to_numpy()[mask]))


# -- stage entry points (called by scripts/diffusion_*.py) ---------------------------------------


def run_train(
    filtered_h5ad: str | os.PathLike,
    model_ckpt: str | os.PathLike,
    train_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    conditions: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    device: str,
    latents_npy: str | os.PathLike | None = None,
    xpressor_ckpt: str | os.PathLike | None = None,
) -> None:
    """Train the conditional denoiser on the train split and write model.ckpt (EMA weights).

    Lightning writes `train_dir`/checkpoints/last.ckpt (a re-run with the same settings resumes
    from it, exactly) and the loss to `train_dir`/logs/version_<attempt>/metrics.csv (one per
    attempt, cellfoundry.train.read_metrics gathers them). Under DDP every rank runs
    this function; only global rank 0 writes model.ckpt."""
    from cellfoundry.train import build_trainer, fit
    from cellfoundry.utils import file_sha256, resolve_device

    device = resolve_device(device)  # a GPU job whose torch sees no GPU stops here, before any work
    settings = dict(settings)
    pl.seed_everything(seed, workers=True)
    data = read_training_data(filtered_h5ad, settings["token_space"], conditions, latents_npy)
    log.info(
        "diffusion over %s tokens: %d training cells, x0 shape %s, conditions %s",
        settings["token_space"], len(data["x0"]), list(data["x0"].shape[1:]), data["codec"].names or "none (unconditional model)",
    )
    module = DiffusionModule(settings, data["codec"].to_dict(), list(data["x0"].shape[1:]))
    # Resume only a run of the same model on the same data: everything but the step count and
    # the logging/checkpoint cadence, plus the conditions and the data shape.
    identity = {
        "settings": {k: v for k, v in settings.items() if k not in ("max_steps", "log_every_n_steps", "trainer")},
        "codec": data["codec"].to_dict(),
        "x0_shape": list(data["x0"].shape),
    }
    trainer_cfg = settings.get("trainer", {})
    trainer = build_trainer(
        train_dir,
        max_steps=settings["max_steps"],
        devices=trainer_cfg.get("devices", 1),
        num_nodes=trainer_cfg.get("num_nodes", 1),
        device=device,
        checkpoint_every_n_steps=trainer_cfg.get("checkpoint_every_n_steps", 50),
        gradient_clip_val=settings["grad_clip"],
        log_every_n_steps=settings["log_every_n_steps"],
    )
    fit(trainer, module, train_loader(data, settings["batch_size"], seed), out_dir=train_dir, settings=identity)
    if trainer.is_global_zero:
        extra = {"xpressor_sha256": file_sha256(xpressor_ckpt) if xpressor_ckpt else None}
        save_diffusion(model_ckpt, module, data, extra)
        log.info("wrote %s", model_ckpt)


def run_sample(
    model_ckpt: str | os.PathLike,
    filtered_h5ad: str | os.PathLike,
    samples_h5ad: str | os.PathLike,
    summary_json: str | os.PathLike,
    sample_cfg: Mapping[str, Any],
    *,
    seed: int,
    device: str,
    xpressor_ckpt: str | os.PathLike | None = None,
    vocab_path: str | os.PathLike | None = None,
    latents_npy: str | os.PathLike | None = None,
    threads: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict:
    """Generate cells (default: the test split's condition labels), decode them to expression,
    write samples.h5ad, and measure whether guidance matters (summary.json). `config` (the
    stage's config section, default `sample_cfg`) goes into the provenance record of samples.h5ad."""
    from cellfoundry.provenance import KEY as PROVENANCE_KEY, provenance
    from cellfoundry.utils import resolve_device, set_torch_threads

    set_torch_threads(threads)
    device = resolve_device(device)
    ckpt = load_diffusion(model_ckpt)
    codec, settings = ckpt.codec, ckpt.settings
    adata = ad.read_h5ad(filtered_h5ad)
    var_names = ckpt.payload["var_names"]
    if list(map(str, adata.var_names)) != list(var_names):
        raise UserError(f"{model_ckpt} was trained on other genes than {filtered_h5ad}; re-run diffusion_train.")
    if sample_cfg["requests"]:
        request_obs = requests_to_obs(sample_cfg["requests"], codec)
        strict = True
    else:
        request_obs = default_request_obs(adata.obs, codec)
        # a test-only label (never seen in training) is sampled unconditionally; a held-out
        # combination's parts are all seen in training (QC checks), so an unknown one is an error
        strict = "holdout" in adata.obs and adata.obs["holdout"].astype(bool).any()
    if settings["token_space"] == "latent":
        if xpressor_ckpt is None or vocab_path is None:
            raise ValueError("latent token space needs the Xpressor checkpoint and the vocabulary")
        decoder = xpressor_decoder(xpressor_ckpt, vocab_path, var_names)
    else:
        def decoder(tokens, library, seed):
            return decode_gene_space(tokens, library, np.random.default_rng(seed))

    def generate(scale: float) -> tuple[Decoded, np.ndarray, np.ndarray]:
        """(decoded cells, library sizes, generated tokens) at guidance `scale`."""
        tokens = generate_tokens(
            ckpt, request_obs, guidance_scale=scale, sampler=sample_cfg["sampler"], steps=sample_cfg["steps"],
            eta=sample_cfg["eta"], seed=seed, batch_size=sample_cfg["batch_size"], device=device, strict=strict,
            clip_x0=sample_cfg["clip_x0"],
        )
        library = draw_library_sizes(request_obs, ckpt.payload, np.random.default_rng(seed))
        return decoder(tokens, library, seed), library, tokens

    scale = float(sample_cfg["guidance_scale"])
    log.info("sampling %d cells (%s, %d steps, eta %.2f, guidance %.2f)", len(request_obs), sample_cfg["sampler"], sample_cfg["steps"], sample_cfg["eta"], scale)
    decoded, library, tokens = generate(scale)
    samples = samples_anndata(decoded, request_obs, codec, var_names, library)
    samples.uns[PROVENANCE_KEY] = provenance(
        "diffusion_sample", config if config is not None else {"sample": sample_cfg},
        checkpoints={"diffusion": model_ckpt, "xpressor": xpressor_ckpt if settings["token_space"] == "latent" else None},
        vocab=vocab_path if settings["token_space"] == "latent" else None,
        inputs={"cells": filtered_h5ad},
    )
    with atomic_output(samples_h5ad) as tmp:
        samples.write_h5ad(tmp)
    summary: dict[str, Any] = {
        "n_samples": int(samples.n_obs),
        "token_space": settings["token_space"],
        "sampler": sample_cfg["sampler"],
        "steps": int(sample_cfg["steps"]),
        "eta": float(sample_cfg["eta"]),
        "guidance_scale": scale,
        "conditions": codec.names,
        "requests": "config" if sample_cfg["requests"] else "held-out combinations" if "holdout" in adata.obs and adata.obs["holdout"].astype(bool).any() else "test split labels",
    }
    spec = guidance_check_condition(codec)
    if sample_cfg["guidance_check"] and spec is not None:
        runs = {f"guided (scale {scale:g})": (decoded, tokens)}
        for s, name in ((1.0, "conditional (scale 1)"), (0.0, "unconditional (scale 0)")):
            if s != scale:
                d, _, t = generate(s)
                runs[name] = (d, t)
        real_latents = np.load(latents_npy, mmap_mode="r") if latents_npy is not None and settings["token_space"] == "latent" else None
        summary["guidance_check"] = guidance_check(adata, spec, request_obs, runs, seed, real_latents, decoder)
    with atomic_output(summary_json) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def guidance_check(
    adata: ad.AnnData,
    spec: ConditionSpec,
    request_obs: pd.DataFrame,
    runs: Mapping[str, tuple[Decoded, np.ndarray]],
    seed: int,
    real_latents: np.ndarray | None = None,
    decoder: Callable | None = None,
) -> dict:
    """Does guidance matter? Classifiers trained on real training cells label the generated cells;
    reported is the fraction assigned the label they were generated for, per run (guided scale,
    scale 1 = plain conditional, scale 0 = unconditional with the same requested labels).

    expression: logistic regression on PCA of log1p(CP10k) of the decoded mean counts; with
    `decoded_real_test_accuracy` (real test cells' latents through the same decoder) as the
    ceiling the decoder allows. latent (latent space only): logistic regression on the flattened
    latent tokens, which measures the diffusion model without the decoder in between.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    column = spec.columns[0]
    split = adata.obs["split"].astype(str).to_numpy()
    from cellfoundry.utils import unlabelled

    labels = adata.obs[column].astype(str).to_numpy()
    known = ~unlabelled(adata.obs[column].to_numpy(dtype=object))  # the codec's "missing" (NaN, empty)
    counts = counts_matrix(adata)
    train = (split == "train") & known
    test = (split == "test") & known
    requested = request_obs[column]
    predict = fit_label_classifier(counts[train], labels[train], seed)
    expression = {
        "classifier": "logistic regression on 50 PCs of standardised log1p(CP10k) of real train cells; samples: decoded mean counts",
        "real_test_accuracy": float(np.mean(predict(counts[test]) == labels[test])) if test.any() else None,
        "accuracy": {name: label_accuracy(predict(d.mean), requested) for name, (d, _) in runs.items()},
    }
    result: dict[str, Any] = {"condition": spec.name, "column": column, "expression": expression}
    if real_latents is not None and test.any():
        lib = np.asarray(counts[test].sum(1)).ravel().astype(np.float32)
        decoded_real = decoder(np.asarray(real_latents[test], dtype=np.float32), lib, seed)
        expression["decoded_real_test_accuracy"] = float(np.mean(predict(decoded_real.mean) == labels[test]))
        flat = np.asarray(real_latents, dtype=np.float32).reshape(len(real_latents), -1)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(flat[train], labels[train])
        result["latent"] = {
            "classifier": "logistic regression on the standardised, flattened latent tokens of real train cells",
            "real_test_accuracy": float(np.mean(clf.predict(flat[test]) == labels[test])),
            "accuracy": {name: label_accuracy(clf.predict(t.reshape(len(t), -1)), requested) for name, (_, t) in runs.items()},
        }
    for space in ("expression", "latent"):
        for name, acc in result.get(space, {}).get("accuracy", {}).items():
            log.info("guidance check (%s classifier): %s -> %.3f of samples classified as their requested %s", space, name, acc if acc is not None else float("nan"), column)
    return result
