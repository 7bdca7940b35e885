"""Sampling of the diffusion stage: the cells to generate (config requests or the test split's
labels), their tokens by guided DDIM/DDPM, decoding to genes and the samples AnnData.

Decoded cells: `layers["mean"]` holds the mean counts of the decoded distribution for a library
size drawn per cell from training cells with the same condition labels; `X` holds counts sampled
from it (NB/ZINB for an Xpressor count decoder, Poisson in the gene token space).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellfoundry.diffusion.module import DiffusionCheckpoint, make_schedule
from cellfoundry.diffusion.process import guided_denoise_fn, invert, sample
from cellfoundry.evaluate.prediction import stimulus_shift
from cellfoundry.models.conditions import ConditionCodec, collate_conditions
from cellfoundry.progress import Progress
from cellfoundry.split import combination_label, combination_mask, control_labels
from cellfoundry.utils import UserError, autocast
from cellfoundry.xpressor.decode import BATCH_CELLS, DecodedBatch

log = logging.getLogger(__name__)

TARGET_SUM = 1e4


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


def _held_out_groups(request_obs: pd.DataFrame) -> Iterator[tuple[dict, np.ndarray]]:
    """(combination, its rows) for each distinct combination of labels among the requests."""
    keys = request_obs.astype(str).agg("\x1f".join, axis=1).to_numpy()
    for key in pd.unique(keys):
        rows = np.flatnonzero(keys == key)
        yield {c: v for c, v in request_obs.iloc[rows[0]].items() if v is not None and not pd.isna(v)}, rows


def control_sources(
    obs: pd.DataFrame, request_obs: pd.DataFrame, none_values: Mapping[str, str], rng: np.random.Generator
) -> np.ndarray:
    """Row in `obs` of the real cell that each requested held-out cell is edited from: a seeded
    draw among the non-held-out cells with the request's control labels (its stimulus columns at
    their none_value; the no-change baseline's cells), without replacement while they last."""
    usable = ~obs["holdout"].astype(bool).to_numpy()
    sources = np.empty(len(request_obs), dtype=np.int64)
    for combo, rows in _held_out_groups(request_obs):
        pool = np.flatnonzero(combination_mask(obs, control_labels(obs, combo, none_values)) & usable)
        if len(pool) == 0:
            raise UserError(
                f"held-out combination {{{combination_label(combo)}}} has no control cells to edit; "
                "set diffusion.sample.heldout_from: noise."
            )
        sources[rows] = rng.choice(pool, size=len(rows), replace=len(rows) > len(pool))
    return sources


def library_factors(obs: pd.DataFrame, request_obs: pd.DataFrame, none_values: Mapping[str, str]) -> np.ndarray:
    """Per requested held-out cell, the factor by which its stimulus changes a cell's library size
    where it was seen (exp of stimulus_shift on log total_counts of the non-held-out cells); 1
    where no group saw it beside controls. IFN-beta, for one, adds 7-11% on Kang 2018."""
    usable = ~obs["holdout"].astype(bool).to_numpy()
    log_library = np.log(np.maximum(obs["total_counts"].to_numpy(np.float64), 1.0))[:, None]
    factors = np.ones(len(request_obs), dtype=np.float32)
    for combo, rows in _held_out_groups(request_obs):
        shift = stimulus_shift(log_library, obs, combo, control_labels(obs, combo, none_values), usable)
        if shift is not None:
            factors[rows] = np.exp(shift[0])
    return factors


def draw_library_sizes(request_obs: pd.DataFrame, payload: Mapping, rng: np.random.Generator) -> np.ndarray:
    """One library size per requested cell, drawn from training cells with the same labels in the
    requested (non-missing) columns; from all training cells when none match."""
    library = payload["library"].numpy()
    train = (
        pd.DataFrame(payload["train_labels"]) if payload["train_labels"] else pd.DataFrame(index=range(len(library)))
    )
    out = np.empty(len(request_obs), dtype=np.float32)
    cache: dict[tuple, np.ndarray] = {}
    for i in range(len(request_obs)):
        row = request_obs.iloc[i]
        items = tuple(
            (c, str(row[c]))
            for c in train.columns
            if c in row.index
            and row[c] is not None
            and not isinstance(row[c], (list, tuple, np.ndarray))
            and not pd.isna(row[c])
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
    sources: tuple[np.ndarray, pd.DataFrame] | None = None,
) -> np.ndarray:
    """Denoised, de-normalised tokens of the requested cells: [n, M, D] latent or [n, G] log1p.

    Per-attribute scales (condition `guidance_scale`) override `guidance_scale`.
    sources: (tokens, obs) of one real cell per request, de-normalised like the output. Each is
    edited instead of drawn from noise: inverted by DDIM under its own labels (scale 1), then
    denoised by DDIM with η = 0 under the requested ones (the sampler and eta are not used).
    """
    arrays = ckpt.codec.encode(request_obs, strict=strict)
    scales = [s.guidance_scale if s.guidance_scale is not None else guidance_scale for s in ckpt.codec.specs]
    schedule = make_schedule(ckpt.settings)
    model = ckpt.model.to(device)
    shape = list(ckpt.payload["token_shape"])
    generator = torch.Generator(device=device).manual_seed(seed)
    x0_range = tuple(r.to(device) for r in ckpt.payload["x0_range"]) if clip_x0 else None
    source_arrays = ckpt.codec.encode(sources[1], strict=True) if sources is not None else None
    n = len(request_obs)
    out = np.empty([n, *shape], dtype=np.float32)
    progress = Progress(n, verb="generated", unit="cells")
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        cond = {k: v.to(device) for k, v in collate_conditions(arrays, idx).items()}
        with autocast(device):
            x_T = None
            if sources is not None:
                own = {k: v.to(device) for k, v in collate_conditions(source_arrays, idx).items()}
                x_T = invert(
                    guided_denoise_fn(model, own, [1.0] * len(scales)),
                    torch.from_numpy(ckpt.normalizer.forward(sources[0][idx]).astype(np.float32)).to(device),
                    schedule,
                    steps=steps,
                    prediction=ckpt.settings["prediction"],
                    x0_range=x0_range,
                )
            x = sample(
                guided_denoise_fn(model, cond, scales),
                [len(idx), *shape],
                schedule,
                method="ddim" if sources is not None else sampler,
                steps=steps,
                eta=0.0 if sources is not None else eta,
                prediction=ckpt.settings["prediction"],
                generator=generator,
                device=device,
                x_T=x_T,
                x0_range=x0_range,
            )
        out[idx] = ckpt.normalizer.inverse(x.float().cpu().numpy())
        progress.update(len(idx))
    return out


def gene_space_decoder(
    log1p_expr: np.ndarray, library: np.ndarray, seed: int, with_counts: bool = True
) -> Iterator[DecodedBatch]:
    """The Decoder of gene tokens, log1p(CP10k) [n, G]: counts = expression fractions x library,
    rounded stochastically (floor, plus one with the remainder's probability: the mean is kept).
    A generated cell imitates an observed one, whose counting noise it already carries: Poisson
    counts around it would add that noise twice (on Kang 2018 they scattered the moderate genes'
    counts into fewer cells and lowered R2 of held-out means by 0.02-0.11, benchmarks/RESULTS.md)."""
    rng = np.random.default_rng(seed)
    for lo in range(0, len(log1p_expr), BATCH_CELLS):
        hi = min(len(log1p_expr), lo + BATCH_CELLS)
        expr = np.expm1(np.clip(log1p_expr[lo:hi], 0.0, np.log1p(TARGET_SUM)))
        frac = expr / np.maximum(expr.sum(1, keepdims=True), 1e-8)
        mean = (frac * library[lo:hi, None]).astype(np.float32)
        counts = None
        if with_counts:
            counts = np.floor(mean)
            counts += rng.random(mean.shape, dtype=np.float32) < mean - counts
        yield DecodedBatch(lo, hi, mean, counts)


def samples_obs(
    request_obs: pd.DataFrame, codec: ConditionCodec, library: np.ndarray, source_cells: Sequence[str] | None = None
) -> pd.DataFrame:
    """obs of samples.h5ad: the condition columns, obs["condition"] (readable label;
    obs["condition_label"] when a condition column is itself named "condition", e.g. Kang 2018's
    stimulus), obs["library_size"] and, for edited cells, obs["source_cell"] (the real cell each
    was edited from)."""
    obs = pd.DataFrame(index=[f"sample_{i}" for i in range(len(request_obs))])
    for col in codec.columns:
        values = request_obs[col].tolist()
        values = ["+".join(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else v for v in values]
        obs[col] = pd.Categorical(
            [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]
        )
    obs["condition_label" if "condition" in codec.columns else "condition"] = pd.Categorical(codec.labels(request_obs))
    obs["library_size"] = library.astype(np.float32)
    if source_cells is not None:
        obs["source_cell"] = np.asarray(source_cells, dtype=str)
    return obs


def write_samples(
    path: str | os.PathLike,
    batches: Iterable[DecodedBatch],
    obs: pd.DataFrame,
    var_names: Sequence[str],
    uns: Mapping[str, Any],
    on_batch: Callable[[DecodedBatch], None] | None = None,
) -> None:
    """samples.h5ad at `path` (a new file), written batch by batch so that no [cells x genes]
    array is held at once: X = sampled counts (CSR float32, rows appended), layers["mean"] =
    mean counts (dense float32, rows written in place), `obs`, `uns`. `on_batch` sees each
    batch as it is written."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    n, n_genes = len(obs), len(var_names)
    f = X = None
    try:
        for batch in batches:
            counts = sp.csr_matrix(batch.counts, dtype=np.float32)
            if f is None:
                first = ad.AnnData(counts, obs=obs.iloc[: batch.hi], var=pd.DataFrame(index=list(var_names)))
                first.write_h5ad(path)
                f = h5py.File(path, "a")
                X = sparse_dataset(f["X"])
                rows_per_chunk = max(1, min(n, 2**18 // max(1, n_genes)))  # ~1 MB chunks
                mean = f.require_group("layers").create_dataset(
                    "mean", shape=(n, n_genes), dtype=np.float32, chunks=(rows_per_chunk, n_genes)
                )
                mean.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            else:
                X.append(counts)
            mean[batch.lo : batch.hi] = batch.mean
            if on_batch is not None:
                on_batch(batch)
        if f is None:
            raise ValueError("no cells to write")
        del f["obs"]
        write_elem(f, "obs", obs)
        if "uns" in f:
            del f["uns"]
        write_elem(f, "uns", dict(uns))
    finally:
        if f is not None:
            f.close()
