"""SE inference throughput (cells/s) and peak memory, random weights, synthetic SE sentences.

Sizes: `demo` (the demo config's own model: d 64, 2 layers, L 256, 64-d gene vectors) and
`se600m` (SE-600M's shapes: d 2048, 16 layers, L 2048, 5120-d gene vectors, 19,790 genes).
On CUDA it runs bf16 autocast + SDPA (flash) attention and also prints the achieved TFLOP/s
(forward FLOPs counted analytically). With --reference it times arc-state's SE model on the same
weights and tokens in the same process (needs arc-state importable; see
check_reference_parity.py for such an environment). Each measurement runs in a fresh
subprocess, so peak memory (max RSS on the CPU, max allocated on CUDA) belongs to it alone.

    .venv/bin/python benchmarks/bench_embed.py --size demo --batches 20
    .venv/bin/python benchmarks/bench_embed.py --size se600m --batch-size 1 --batches 2
    PYTHONPATH=src /tmp/arcvenv/bin/python benchmarks/bench_embed.py --size demo --reference
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "demo": dict(token_dim=64, d_model=64, nhead=4, d_hid=128, nlayers=2, output_dim=32, pad_length=256, vocab=765),
    "se600m": dict(
        token_dim=5120, d_model=2048, nhead=16, d_hid=2048, nlayers=16, output_dim=2048, pad_length=2048, vocab=19790
    ),
}


def forward_flops(size: dict) -> float:
    """Forward FLOPs per cell (2 per multiply-add): encoder, layers (projections, attention,
    feed-forward) over L+1 tokens, decoder on 2 tokens."""
    s, d, h, t = size["pad_length"] + 1, size["d_model"], size["d_hid"], size["token_dim"]
    per_layer = s * (3 * d * d + d * d + 2 * d * h) + 2 * s * s * d
    return 2 * (s * t * d + size["nlayers"] * per_layer + 2 * (4 * d * d + d * size["output_dim"]))


def make_inputs(size: dict, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(size["vocab"], generator=g)[: size["pad_length"]] for _ in range(n)])
    ids[:, 0] = -2
    counts = torch.rand(n, size["pad_length"], generator=g) * 5
    table = torch.randn(size["vocab"], size["token_dim"], generator=g)
    return ids, counts, table


def measure(args) -> dict:
    """One measurement in this process (called in a subprocess by main)."""
    import torch

    from cellfoundry.models.se import SEConfig, StateEmbedding
    from cellfoundry.utils import autocast

    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    cfg = SEConfig(**{k: v for k, v in size.items() if k != "vocab"})
    device = args.device
    torch.manual_seed(0)
    with torch.device("meta"):
        model = StateEmbedding(cfg)
    model = model.to_empty(device=device)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.eval()
    ids, counts, table = make_inputs(size, args.batch_size * (args.batches + 1))
    table = table.to(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def batch(i):
        sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
        return ids[sl].to(device), counts[sl].to(device)

    if args.impl == "reference":
        run = reference_runner(model, cfg, table, device)
    else:

        def run(b_ids, b_counts):
            return model(b_ids, b_counts, table)

    with torch.inference_mode(), autocast(device):
        run(*batch(0))  # warm-up (kernels, allocator)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(1, args.batches + 1):
            out = run(*batch(i))
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    cells = args.batch_size * args.batches
    result = dict(
        size=args.size,
        impl=args.impl,
        device=device,
        batch_size=args.batch_size,
        cells=cells,
        seconds=round(elapsed, 3),
        cells_per_s=round(cells / elapsed, 2),
        out_dim=int(out.shape[-1]),
        gflop_per_cell=round(forward_flops(size) / 1e9, 2),
    )
    if device == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["tflops"] = round(forward_flops(size) * cells / elapsed / 1e12, 1)
        result["gpu"] = torch.cuda.get_device_name()
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        result["rss_growth_gib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20, 2)
        result["threads"] = args.threads
    return result


def reference_runner(model, cfg, table, device):
    """arc-state's StateEmbeddingModel with our weights, called the way its inference does."""
    import torch
    from omegaconf import OmegaConf
    from state.emb.nn.model import StateEmbeddingModel

    from cellfoundry.models.se_checkpoint import reference_cfg, save_se

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "m.ckpt"
        from cellfoundry.models.se import TrainingHeads

        save_se(ckpt, model.cpu(), cfg, training_state=TrainingHeads(cfg).state_dict(), gene_table=table.cpu())
        ref = StateEmbeddingModel.load_from_checkpoint(
            str(ckpt), dropout=0.0, strict=False, cfg=OmegaConf.create(reference_cfg(cfg)), weights_only=False
        )
    model.to(device)
    ref.pe_embedding = torch.nn.Embedding.from_pretrained(table.cpu())
    ref = ref.to(device).eval()

    def run(ids, counts):
        sentence = ids.clamp(min=0)
        n, length = sentence.shape
        batch = [
            sentence,
            torch.zeros(n, 1, dtype=torch.long, device=device),
            None,
            None,
            None,
            torch.zeros(n, length, dtype=torch.bool, device=device),
            None,
            counts,
            None,
        ]
        _, _, _, emb, ds_emb = ref._compute_embedding_for_batch(batch)
        return torch.cat([emb, ref.dataset_embedder(ds_emb)], dim=-1)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", action="store_true", help="also time arc-state's model on the same inputs")
    parser.add_argument("--impl", choices=["cellfoundry", "reference"], default="cellfoundry", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    impls = ["cellfoundry"] + (["reference"] if args.reference else [])
    for impl in impls:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--impl",
            impl,
            "--size",
            args.size,
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
            "--batches",
            str(args.batches),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(json.dumps({"impl": impl, "error": proc.stderr.strip().splitlines()[-1:]}))
            continue
        print(proc.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
