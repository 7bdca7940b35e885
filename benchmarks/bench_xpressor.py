"""Xpressor training throughput and peak memory at the demo size (synthetic inputs, random SE).

Prints optimiser steps/s of one Xpressor training step (forward, backward, AdamW) with cached SE
outputs and with the frozen SE model run every step, the same for the pooled baselines, and
encoding throughput. Peak memory: the process's peak RSS on the CPU, torch's peak allocation on
CUDA.

    .venv/bin/python benchmarks/bench_xpressor.py [--device cpu|cuda] [--threads 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import asdict

import numpy as np
import scipy.sparse as sp
import torch

from cellfoundry.models.se import SEConfig, StateEmbedding
from cellfoundry.models.xpressor import XpressorConfig
from cellfoundry.xpressor.data import BaseCache, CellBatches, CellData, collate, compute_base_cache
from cellfoundry.xpressor.module import TrainSettings, XpressorModule


def demo_sized_inputs(n_cells: int, n_genes: int, length: int, token_dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gene_ids = np.concatenate(
        [np.full((n_cells, 1), -2), np.stack([rng.permutation(n_genes)[: length - 1] for _ in range(n_cells)])], axis=1
    ).astype(np.int32)
    values = rng.random((n_cells, length), dtype=np.float32)
    counts = sp.csr_matrix(rng.poisson(0.5, size=(n_cells, n_genes)).astype(np.float32))
    labels = {"cell_type": rng.integers(0, 10, n_cells)}
    data = CellData(
        gene_ids,
        values,
        counts,
        np.arange(n_genes),
        [f"G{i}" for i in range(n_genes)],
        np.array(["train"] * n_cells),
        labels,
        {"cell_type": [str(i) for i in range(10)]},
    )
    return data, torch.randn(n_genes, token_dim)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_steps(module: XpressorModule, batches: list[dict], steps: int, device: str) -> float:
    module = module.to(device).train()
    opt = module.configure_optimizers()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = module.losses(batch)["loss"]
        loss.backward()
        opt.step()

    batches = [
        {
            k: (
                v.to(device)
                if isinstance(v, torch.Tensor)
                else {kk: vv.to(device) for kk, vv in v.items()}
                if isinstance(v, dict)
                else v
            )
            for k, v in b.items()
        }
        for b in batches
    ]
    for b in batches[:3]:  # warm-up
        step(b)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    if device == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cells", type=int, default=650)
    parser.add_argument("--genes", type=int, default=765)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--genes-per-step", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # The demo's sizes (config/config.yaml): SE 64-wide, 2 layers, L = 256; Xpressor 64-wide.
    se_cfg = SEConfig(token_dim=64, d_model=64, nhead=4, d_hid=128, nlayers=2, output_dim=32, pad_length=args.length)
    base = StateEmbedding(se_cfg).eval()
    data, table = demo_sized_inputs(args.cells, args.genes, args.length, 64)
    settings = TrainSettings(  # the demo's recipe (config/config.yaml xpressor.train)
        lr=2e-3,
        weight_decay=0.01,
        batch_size=args.batch_size,
        max_epochs=20,
        patience=5,
        gradient_clip=1.0,
        val_fraction=0.1,
        unfreeze_last_layer=False,
        genes_per_step=args.genes_per_step,
    )
    print(
        f"device {args.device}, threads {args.threads}, cells {args.cells}, genes {args.genes}, L {args.length}, "
        f"batch {args.batch_size}, genes/step {args.genes_per_step}"
    )

    start = time.perf_counter()
    cache: BaseCache = compute_base_cache(base, table, data, 64, args.device)
    print(f"SE outputs (cache): {args.cells / (time.perf_counter() - start):.1f} cells/s")
    idx = np.arange(args.cells)
    for label, use_cache in (("cached SE outputs", True), ("SE run every step", False)):
        items = CellBatches(data, idx, cache if use_cache else None)
        batches = [
            collate([items[i] for i in range(s, min(s + args.batch_size, args.cells))])
            for s in range(0, args.batch_size * 8, args.batch_size)
        ]
        for method in ("xpressor", "cls"):
            xcfg = XpressorConfig.from_dict(  # fields not set here: CHECKPOINT_DEFAULTS, as before
                dict(
                    d_base=64,
                    gene_dim=64,
                    n_latent=8,
                    d_model=64,
                    n_blocks=2,
                    n_heads=4,
                    gene_adapter=True,
                    adapter_hidden=256,
                    labels=data.label_classes if method == "xpressor" else {},
                    label_dim=16,
                    pooling=None if method == "xpressor" else method,
                )
            )
            module = XpressorModule(base, table, data.decode_genes, xcfg.to_dict(), asdict(settings))
            rate = time_steps(module, batches, args.steps, args.device)
            print(
                f"train {method:8s} ({label}): {rate:.2f} steps/s = {rate * args.batch_size:.0f} cells/s; "
                f"peak memory {peak_memory_mb(args.device):.0f} MB"
            )


if __name__ == "__main__":
    main()
