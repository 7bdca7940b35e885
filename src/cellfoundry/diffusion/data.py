"""The diffusion stage's training data in its two token spaces (config `diffusion.token_space`):

- latent: x_0 = Xpressor latent tokens [N, M, D] of each cell, standardised per (token, channel)
  with statistics of the training cells;
- gene: x_0 = log1p(CP10k) expression [N, G], standardised per gene.

Also the condition arrays of the training cells and their shuffled, exactly resumable loader.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cellfoundry.cells import CellTable
from cellfoundry.models.conditions import ConditionCodec, ConditionSpec
from cellfoundry.resumable import resumable_loader
from cellfoundry.utils import UserError, log1p_normalise


@dataclass
class Normalizer:
    """x_0 = (x - mean) / std with statistics of the training cells (mean, std shaped like a cell)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, min_std: float) -> Normalizer:
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
        return torch.from_numpy(np.asarray(self.x0[i], dtype=np.float32)), {
            k: torch.as_tensor(v[i]) for k, v in self.conditions.items()
        }


def condition_specs(dataset_conditions: Sequence[Mapping[str, Any]]) -> list[ConditionSpec]:
    keys = ("name", "kind", "columns", "continuous", "delimiter", "none_value", "guidance_scale")
    specs = [ConditionSpec(**{k: c[k] for k in keys if k in c}) for c in dataset_conditions]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"condition names must be unique within a dataset; got {names}.")
    return specs


def read_training_data(
    h5ad: str | os.PathLike,
    token_space: str,
    conditions: Sequence[Mapping[str, Any]],
    latents: str | os.PathLike | None = None,
) -> dict:
    """Everything training needs from the stage inputs.

    Returns dict with x0 (train cells, normalised, [n, M, D] or [n, G]), normalizer, codec,
    arrays (condition arrays of the train cells), obs (obs of all cells), var_names, library
    (train library sizes [n]) and train_obs (condition columns of the train cells).
    """
    cells = CellTable.read(h5ad)
    train = cells.split == "train"
    counts = cells.counts
    library = np.asarray(counts.sum(1)).ravel()
    if token_space == "latent":
        if latents is None:
            raise ValueError("latent token space needs xpressor/latents.npy")
        stored = np.load(latents, mmap_mode="r")
        if stored.shape[0] != cells.n_cells:
            raise UserError(
                f"{latents} has {stored.shape[0]} cells but {h5ad} has {cells.n_cells}; "
                "re-run the xpressor rules (snakemake --forcerun xpressor_train)."
            )
        x = np.asarray(stored[train], dtype=np.float32)
    elif token_space == "gene":
        x = log1p_normalise(counts[train])  # float32 CSR in, float32 out
    else:
        raise UserError(f"diffusion.token_space must be latent or gene, not {token_space!r}.")
    normalizer = Normalizer.fit(x, min_std=1e-3 if token_space == "latent" else 0.1)
    x0 = normalizer.forward(x).astype(np.float32)
    specs = condition_specs(conditions)
    train_obs = cells.obs.loc[train, [c for s in specs for c in s.all_columns] if specs else []]
    codec = ConditionCodec.fit(specs, train_obs)
    arrays = codec.encode(train_obs, strict=True)
    return dict(
        x0=x0,
        # Sampling clips x̂_0 to the training range widened by 10% (see diffusion.process.sample).
        x0_range=(x0.min(0) - 0.1 * np.ptp(x0, 0), x0.max(0) + 0.1 * np.ptp(x0, 0)),
        normalizer=normalizer,
        codec=codec,
        arrays=arrays,
        obs=cells.obs,
        var_names=cells.var_names,
        library=library[train].astype(np.float32),
        train_obs=train_obs,
    )


class DiffusionDataModule(pl.LightningDataModule):
    """The training cells (read_training_data's `data`) in shuffled full batches that
    cellfoundry.trainer.fit resumes exactly. Its hyperparameters identify the data of a
    resumable run."""

    def __init__(self, data: dict, batch_size: int, seed: int):
        super().__init__()
        self.save_hyperparameters(ignore=["data"])
        x0 = np.ascontiguousarray(data["x0"])
        # the training data's content, not only its shape: new latents of the same shape (Xpressor
        # retrained) must not resume a run on the old ones
        self.hparams.update(x0_shape=list(x0.shape), x0_sha256=hashlib.sha256(memoryview(x0).cast("B")).hexdigest())
        dataset = CellDataset(x0, data["arrays"])
        self.train_loader = resumable_loader(dataset, min(batch_size, len(dataset)), seed, drop_last=True)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader
