"""Small shared helpers: logging to a rule's log, atomic outputs, seeding, devices, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger("cellfoundry")


class UserError(Exception):
    """An error the user caused and can fix; its message says what to change."""


def setup_logging(log_path: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Send cellfoundry's (and warnings') logging to `log_path` (a rule's log) and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        # Append: a retried job (e.g. after preemption) keeps the earlier attempt's lines.
        handlers.append(logging.FileHandler(log_path, mode="a"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)
    if log_path:
        sys.excepthook = _log_uncaught


def _log_uncaught(exc_type, exc, tb) -> None:
    """Send an uncaught exception to the log, so it lands in the rule's log file and not only on
    the job's stderr: a UserError as its message, anything else with its traceback."""
    if isinstance(exc, UserError):
        log.error("%s", exc)
    else:
        log.critical("unexpected error", exc_info=(exc_type, exc, tb))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `path` only if the block succeeds.

    Works for files and directories, so an interrupted job never leaves an output that looks
    complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix so writers that infer the format from it (matplotlib, anndata) still work.
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic CPU kernels."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.manual_seed(seed)


def set_torch_threads(threads: int | None) -> None:
    """Use `threads` for torch's CPU kernels (None/0: leave torch's default), never more than
    OMP_NUM_THREADS when set: more threads than free cores makes small kernels wait on each other
    (10x slower seen)."""
    if not threads:
        return
    import torch

    limit = os.environ.get("OMP_NUM_THREADS")
    if limit and limit.isdigit():
        threads = min(threads, int(limit))
    torch.set_num_threads(max(1, int(threads)))


def start_stage(seed: int, device: str | None = None, threads: int | None = None) -> str | None:
    """The first call of every rule's run_<rule>: resolves `device` (so a GPU job whose torch sees
    no GPU stops before any work), sets torch's CPU threads and seeds Python, NumPy and torch.
    Returns the resolved device (None when the stage takes none)."""
    resolved = resolve_device(device) if device is not None else None
    set_torch_threads(threads)
    seed_everything(seed)
    return resolved


def given_gpus(environ=os.environ) -> str | None:
    """'NAME=value' of the first variable through which SLURM (or the user) gave this process
    GPUs, or None. Device lists (CUDA_VISIBLE_DEVICES=0 is GPU 0) are empty, -1 or NoDevFiles
    when none; SLURM_GPUS* counts ("2", "a100:2") are 0 when none."""
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        value = environ.get(key, "").strip()
        if value not in ("", "-1", "NoDevFiles"):
            return f"{key}={value}"
    for key in sorted(k for k in environ if k.startswith("SLURM_GPUS")):
        value = environ[key].strip()
        if value and value.rsplit(":", 1)[-1] not in ("0", "none"):
            return f"{key}={value}"
    return None


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible and usable, else 'cpu'.

    Stops when this job was given GPUs (given_gpus) or device is cuda but torch sees no CUDA
    device: a CPU build of PyTorch in a GPU job would otherwise train on the CPU unnoticed.
    device cpu is a deliberate CPU run and is never refused."""
    import torch

    if name not in ("auto", "cuda") or torch.cuda.is_available():
        return "cuda" if name == "auto" else name
    given = "device: cuda is set" if name == "cuda" else given_gpus()
    if given is None:
        return "cpu"  # a laptop or CPU node: auto falls back
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    raise UserError(
        f"{given} but torch {torch.__version__} ({build}) in the env {sys.prefix} sees no CUDA GPU; "
        "GPU rules need envs/gpu.yaml with conda_torch: cuda (rebuild it: snakemake --conda-create-envs-only) "
        "and a working NVIDIA driver on the node (nvidia-smi), or set device: cpu to run on the CPU on purpose."
    )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def unlabelled(labels) -> np.ndarray:
    """[N] bool, True where a label is missing: None, NaN, empty, or "nan" (pandas' rendering of
    NaN after astype(str)). The one definition for QC's split, condition groups and label metrics."""
    import pandas as pd

    values = pd.Series(np.asarray(labels, dtype=object))
    text = values.astype(str).str.strip().str.lower()
    return (values.isna() | text.isin(["", "nan"])).to_numpy()


def autocast(device: str):
    """bf16 autocast on CUDA, a no-op (fp32) elsewhere: the one mixed-precision rule of every
    stage's inference."""
    import torch

    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def log1p_normalise(counts, library=None, target_sum: float = 1e4) -> np.ndarray:
    """log1p(counts / library * target_sum), dense [n, G]: counts dense or sparse, `library` [n]
    (default: the row sums of `counts`; pass the totals over all genes when `counts` holds a
    subset), an empty cell's library taken as 1. Float inputs keep their dtype, others become
    float64."""
    import scipy.sparse as sp

    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    if not np.issubdtype(dense.dtype, np.floating):
        dense = dense.astype(np.float64)
    library = dense.sum(1) if library is None else np.asarray(library, dtype=dense.dtype)
    return np.log1p(dense / np.maximum(library, 1.0)[:, None] * target_sum)
