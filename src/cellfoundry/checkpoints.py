"""Checkpoint files of the package's own models: a dict of tensors and plain Python values,
written atomically with torch.save and read back with torch.load(weights_only=True), so that
opening a file never runs pickled code (only the classes of an explicit allow-list are rebuilt)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cellfoundry.utils import UserError, atomic_output


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """torch.save `payload` to `path` atomically (a crash leaves no partial file). Saved through a
    file object: given a path, torch names the archive's records after the (temporary, per-process)
    file name, so the same weights would give different bytes and checksums from run to run."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)


def load_checkpoint(
    path: str | os.PathLike,
    allowed: Sequence[Any] = (),
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
) -> Any:
    """torch.load with weights_only=True: tensors and plain Python values, plus the classes in
    `allowed`; anything else raises pickle.UnpicklingError."""
    with torch.serialization.safe_globals(list(allowed)):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def load_stage_checkpoint(
    path: str | os.PathLike, fmt: str, what: str, rule: str, map_location: str | torch.device = "cpu"
) -> dict:
    """A checkpoint written by a stage as {"format": fmt, ...}; a missing file or another format
    raises UserError naming the rule `rule` that writes the `what` checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} checkpoint {path} does not exist; run the {rule} rule first.")
    payload = load_checkpoint(path, map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise UserError(f"{path} is not a cellfoundry {what} checkpoint (expected format {fmt}); re-run {rule}.")
    return payload
