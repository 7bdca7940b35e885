"""Diffusion throughput: training steps/s and sampling cells/s of the conditional DiT.

Sizes:
  demo  the demo's latent model: 9 latent tokens x 64 (Xpressor demo width), DiT 128 wide, 4 blocks,
        batch 64, one categorical condition with 10 labels (config/config.yaml).
  seed  the seed's size: 64 tokens x 256 features, batch 32, DiT-S (384 wide, 12 blocks, 6 heads),
        in the latent space, and the gene space with 2,000 genes encoded to 64 x 256 tokens.

Sampling: DDIM 50 steps with classifier-free guidance (two network passes per step).
Usage: python benchmarks/bench_diffusion.py --size demo --device cpu
       python benchmarks/bench_diffusion.py --size seed --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import pandas as pd
import torch

from cellfoundry.diffusion.process import NoiseSchedule, diffusion_loss, guided_denoise_fn, sample
from cellfoundry.models.conditions import ConditionCodec, ConditionModel, ConditionSpec, collate_conditions
from cellfoundry.models.denoiser import ConditionalDenoiser
from cellfoundry.models.dit import DiTConfig, GeneDiT, LatentDiT

SIZES = {
    "demo": [dict(space="latent", tokens=9, dim=64, hidden=128, depth=4, heads=4, batch=64)],
    "seed": [
        dict(space="latent", tokens=64, dim=256, hidden=384, depth=12, heads=6, batch=32),
        dict(space="gene", tokens=64, dim=256, hidden=384, depth=12, heads=6, batch=32, genes=2000),
    ],
}


def build(size: dict, device: str):
    codec = ConditionCodec.fit(
        [ConditionSpec("cell_type", "categorical", ["ct"])], pd.DataFrame({"ct": [f"t{i}" for i in range(10)]})
    )
    cfg = DiTConfig(
        num_tokens=size["tokens"],
        token_dim=size["dim"],
        hidden=size["hidden"],
        depth=size["depth"],
        heads=size["heads"],
        mlp_ratio=4.0,
        cross_attention=False,
    )
    net = LatentDiT(cfg) if size["space"] == "latent" else GeneDiT(cfg, size["genes"])
    model = ConditionalDenoiser(net, ConditionModel(codec, size["hidden"])).to(device)
    shape = [size["tokens"], size["dim"]] if size["space"] == "latent" else [size["genes"]]
    return model, codec, shape


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(size: dict, device: str, train_steps: int, sample_cells: int, sample_steps: int) -> dict:
    torch.manual_seed(0)
    model, codec, shape = build(size, device)
    schedule = NoiseSchedule("linear", 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = size["batch"]
    labels = [{"ct": f"t{i % 10}"} for i in range(max(b, sample_cells))]
    arrays = codec.encode(labels)
    cond = {k: v.to(device) for k, v in collate_conditions(arrays, np.arange(b)).items()}
    x0 = torch.randn(b, *shape, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step():
        with autocast:
            keep = torch.rand(b, 1, device=device) >= 0.1
            loss = diffusion_loss(lambda x, t: model(x, t, cond, keep), x0, schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):  # warm-up
        step()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(train_steps):
        step()
    sync(device)
    train_s = time.perf_counter() - start
    train_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None

    model.eval()
    cond_s = {k: v.to(device) for k, v in collate_conditions(arrays, np.arange(sample_cells)).items()}
    with torch.no_grad(), autocast:
        sample(
            guided_denoise_fn(model, cond_s, [2.0]), [sample_cells, *shape], schedule, steps=2, device=device
        )  # warm-up
        sync(device)
        start = time.perf_counter()
        sample(
            guided_denoise_fn(model, cond_s, [2.0]), [sample_cells, *shape], schedule, steps=sample_steps, device=device
        )
        sync(device)
    sample_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    return {
        **size,
        "device": device,
        "params_M": round(n_params / 1e6, 2),
        "train_steps_per_s": round(train_steps / train_s, 2),
        "train_cells_per_s": round(train_steps * b / train_s, 1),
        "train_peak_mem_GiB": None if train_mem is None else round(train_mem, 2),
        "sample_cells": sample_cells,
        "sample_steps": sample_steps,
        "sample_cells_per_s": round(sample_cells / sample_s, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--sample-cells", type=int, default=256)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    for size in SIZES[args.size]:
        result = bench(size, args.device, args.train_steps, args.sample_cells, args.sample_steps)
        print(json.dumps({"machine": machine, "torch": torch.__version__, **result}), flush=True)


if __name__ == "__main__":
    main()
